"""What MLX's own kernels take to move the dynamic forward's bytes (device only): a floor for issue 6's
T = 8192 bar, timed in one process next to DynamicMHC's forward, the way `mhc bench --layer dynamic`
times it (mx.compile'd calls queued with mx.async_eval, bench.default_settings: on a GPU 7 batches of
50 calls; alternating rounds, medians of each round's median).

The forward's least traffic (identity F, bfloat16, E = T n C elements of x, s = 2 bytes):
  coefficients + x_in   x read once, x_in [T, C] written      (E + E / n) s   (268 + 67 MB at 8192, 4, 4096)
  post_res              x and F's output read, x_out written  (2 E + E / n) s (268 + 67 + 268 MB)
938 MB in all, with no arithmetic, exchange or coefficient. The floor rows move exactly that in two
launches a call, as the layer does, with MLX's compiled elementwise and reduction kernels:
  floor:sum     y = x.sum(axis=1) (a reduction over the n streams), then out = x + y[:, None, :]
  floor:slices  y = x[:, 0] + x[:, 1] + ... (one fused elementwise kernel over n strided views), then
                out = x + y[:, None, :]
and `copy` is out = x + 1 alone (x read, out written: 536 MB), the bench's copy-rate probe at this size.
Each row prints µs a call and the traffic's rate (MB / µs = TB/s). --gpu-time N: also N calls a round under
CUPTI (scripts/gpu_cupti.py), each row's GPU time a call and kernel durations, without the batch's host start
and end.

  python scripts/gpu_stream_floor.py [8192:4:4096] [--rounds 3] [--gpu-time 50]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import mlx.core as mx

from mhc_aot import bench

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_cupti  # noqa: E402  (--gpu-time)


def floor_runner(name: str, x: mx.array) -> bench.Runner:
    """Two launches a call with the forward's traffic (see the module's docstring)."""
    n = x.shape[1]
    if name == "floor:sum":
        first = mx.compile(lambda x: x.sum(axis=1))
    else:
        first = mx.compile(lambda x: sum(x[:, j, :] for j in range(n)))
    second = mx.compile(lambda x, y: x + y[:, None, :])

    def call():
        y = first(x)
        return second(x, y)

    return bench.Runner(name, call)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", default="8192:4:4096", help="T:n:C")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--phi-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--gpu-time", type=int, default=0, metavar="N", help="also N calls a round under CUPTI")
    args = ap.parse_args()
    if args.gpu_time:
        gpu_cupti.require()
    T, n, C = (int(v) for v in args.config.split(":"))
    case = bench.Case("throughput", T, n, C, "bfloat16", False, layer="dynamic", phi_dtype=args.phi_dtype)
    inp = bench.make_inputs(case)
    x = inp.x
    E, s = T * n * C, x.itemsize
    least = (3 * E + 2 * E // n) * s  # x read twice and x_out written; x_in written and read
    phi_bytes = case.phi_elements * (2 if args.phi_dtype == "bfloat16" else 4)  # read once by the layer
    traffic = {"kernels": least + phi_bytes, "floor:sum": least, "floor:slices": least, "copy": 2 * E * s}
    runners = [bench.make_runner("kernels", case, inp), floor_runner("floor:sum", x), floor_runner("floor:slices", x),
               bench.Runner("copy", mx.compile(lambda: x + 1))]
    out = runners[1].call()
    ref = x.astype(mx.float32) + x.astype(mx.float32).sum(axis=1, keepdims=True)
    err = mx.abs(out.astype(mx.float32) - ref).max().item()
    print(f"T={T} n={n} C={C} bfloat16; floor:sum against float32: max |diff| {err:.3g}", flush=True)
    st = bench.default_settings("throughput")
    got: dict[str, list[float]] = {r.name: [] for r in runners}
    gpu: dict[str, list[dict[str, float]]] = {r.name: [] for r in runners}
    for rd in range(args.rounds):
        for r in runners:
            t = bench.time_runner(r, "throughput", st.iters, st.warmup, st.repeats)
            got[r.name].append(t.median_us)
            if args.gpu_time:
                events, _ = gpu_cupti.profile_batch(r, args.gpu_time, gpu_cupti.trace_path(f"floor_{r.name}"))
                gpu[r.name].append(gpu_cupti.summary(events, args.gpu_time))
        print(f"round {rd + 1}: " + "  ".join(f"{k} {v[-1]:.1f}" for k, v in got.items()), flush=True)
    for k, v in got.items():
        med = statistics.median(v)
        print(f"{k:14s} {med:8.1f} us a call (rounds {' '.join(f'{u:.1f}' for u in v)}), "
              f"{traffic[k] / 1e6:.0f} MB, {traffic[k] / 1e6 / med:.2f} TB/s", flush=True)
        if gpu[k]:
            spans, durs = gpu_cupti.over_rounds(gpu[k])
            g = statistics.median(spans)
            print(f"{'':14s} GPU {g:8.1f} us a call, {traffic[k] / 1e6 / g:.2f} TB/s; kernel medians: {durs}",
                  flush=True)


if __name__ == "__main__":
    main()
