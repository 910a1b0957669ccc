"""The GPU timeline of queued DynamicMHC calls (device only): every kernel's start, duration and the gap
before it, from CUPTI through PyTorch's profiler. The device machine has Nsight Compute but no Nsight
Systems, and ncu serialises launches, so neither shows the gaps between a forward's kernels; CUPTI
records every kernel of the process, MLX's graph-launched ones included.

  python scripts/gpu_timeline.py                      # T = 8192, n = 4, C = 4096, 12 calls, one layer a call
  python scripts/gpu_timeline.py 8192:4:4096 --layers 8 --calls 3
  python scripts/gpu_timeline.py 4096:4:2048 --backward

The calls run as `mhc bench --layer dynamic` runs them (mx.compile'd, throughput mode: queued with
mx.async_eval, one synchronise), after `mhc bench`'s own timing of the same runner in the same process
with its settings (bench.default_settings: on a GPU 7 batches of 50 calls; printed first). Prints each
kernel (start relative to the first, duration, gap before it), then per kernel name the median duration
and gap, then the span a call. Writes the Chrome trace to $OUT/timeline_T_n_C.json (or ./).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import mlx.core as mx

from mhc_aot import bench


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", default="8192:4:4096", help="T:n:C")
    ap.add_argument("--layers", type=int, default=1, help="layers a call (bench.make_runner's stack)")
    ap.add_argument("--calls", type=int, default=12, help="queued calls profiled")
    ap.add_argument("--backward", action="store_true", help="forward + backward")
    ap.add_argument("--phi-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    try:
        import torch
        from torch.profiler import ProfilerActivity, profile
    except ImportError as e:
        raise SystemExit(f"gpu_timeline.py needs PyTorch's profiler (CUPTI), which the device machine has: {e}")
    if not torch.cuda.is_available():
        raise SystemExit("gpu_timeline.py: PyTorch sees no CUDA device (CUPTI records only GPU kernels)")
    T, n, C = (int(v) for v in args.config.split(":"))
    case = bench.Case("throughput", T, n, C, "bfloat16", args.backward, layer="dynamic", phi_dtype=args.phi_dtype)
    runner = bench.make_runner("kernels", case, bench.make_inputs(case), layers=args.layers)
    s = bench.default_settings("throughput")
    timing = bench.time_runner(runner, "throughput", s.iters, s.warmup, s.repeats)
    print(f"bench timing (throughput, {s.repeats} batches of {s.iters} calls): median {timing.median_us:.1f} us a call",
          flush=True)
    torch.cuda.init()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        mx.synchronize()
        out = None
        for _ in range(args.calls):
            out = runner.call()
            mx.async_eval(out)
        mx.eval(out)
        mx.synchronize()
    path = os.path.join(os.environ.get("OUT", "."), f"timeline_{T}_{n}_{C}.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        events = sorted((e for e in json.load(f)["traceEvents"] if e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy")),
                        key=lambda e: e["ts"])
    if not events:
        raise SystemExit("CUPTI recorded no kernels")
    t0 = end = events[0]["ts"]  # end: the latest end of the kernels so far
    per_name: dict[str, list[tuple[float, float]]] = {}
    for e in events:
        # a negative gap: the kernel started before an earlier one ended (concurrent branches of a graph)
        gap = e["ts"] - end
        name = e["name"][:60]
        print(f"{e['ts'] - t0:10.1f}  dur {e['dur']:7.1f}  gap {gap:7.1f}  stream {e['args'].get('stream')}  {name}")
        per_name.setdefault(name, []).append((e["dur"], gap))
        end = max(end, e["ts"] + e["dur"])
    for name, v in per_name.items():
        print(f"per kernel: {name}: {len(v)} launches, duration median {statistics.median(d for d, _ in v):.1f} us, "
              f"gap before median {statistics.median(g for _, g in v):.1f} us")
    span = end - t0
    print(f"span {span:.1f} us over {args.calls} calls: {span / args.calls:.1f} us a call (first kernel's start to "
          f"last kernel's end)")


if __name__ == "__main__":
    main()
