"""The GPU timeline of queued DynamicMHC calls (device only): every kernel's start, duration and the gap
before it, from CUPTI through PyTorch's profiler (scripts/gpu_cupti.py says why CUPTI).

  python scripts/gpu_timeline.py                      # T = 8192, n = 4, C = 4096, 12 calls, one layer a call
  python scripts/gpu_timeline.py 8192:4:4096 --layers 8 --calls 3
  python scripts/gpu_timeline.py 4096:4:2048 --backward
  python scripts/gpu_timeline.py --calls 50 --ns 10,50,200    # and what a batch's start and end cost

The calls run as `mhc bench --layer dynamic` runs them (mx.compile'd, throughput mode: queued with
mx.async_eval, one synchronise), after `mhc bench`'s own timing of the same runner in the same process
with its settings (bench.default_settings: on a GPU 7 batches of 50 calls; printed first). Prints each
kernel (start relative to the first, duration, gap before it), then per kernel name the median duration
and gap, then the span a call, and the profiled batch's host side on the same clock: the GPU idle from the
batch's start to its first kernel (the host making the first call) and from its last kernel to the end of its
synchronise. Writes the Chrome trace to $OUT/timeline_T_n_C.json (or ./).

--ns N1,N2,...: before profiling, time batches of each N calls (two rounds of --repeats batches, the bench's
loop) and fit t(N) = a + N c between neighbours: c is a call's steady cost, a what a batch's start and end add
(session 61, H100, two processes: c 357.5-358.2 µs with a ~360-390 µs, and 366.0-370.2 with a ~370-580, the
latter ~8-12 µs a call above the GPU time of the profiled batch).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from mhc_aot import bench

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_cupti  # noqa: E402  (CUPTI's events of a queued batch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", default="8192:4:4096", help="T:n:C")
    ap.add_argument("--layers", type=int, default=1, help="layers a call (bench.make_runner's stack)")
    ap.add_argument("--calls", type=int, default=12, help="queued calls profiled")
    ap.add_argument("--backward", action="store_true", help="forward + backward")
    ap.add_argument("--phi-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--ns", default="", help="batch lengths to time and fit, e.g. 10,50,200 (none by default)")
    ap.add_argument("--repeats", type=int, default=5, help="batches a round for each of --ns")
    args = ap.parse_args()
    gpu_cupti.require()
    T, n, C = (int(v) for v in args.config.split(":"))
    case = bench.Case("throughput", T, n, C, "bfloat16", args.backward, layer="dynamic", phi_dtype=args.phi_dtype)
    runner = bench.make_runner("kernels", case, bench.make_inputs(case), layers=args.layers)
    s = bench.default_settings("throughput")
    timing = bench.time_runner(runner, "throughput", s.iters, s.warmup, s.repeats)
    print(f"bench timing (throughput, {s.repeats} batches of {s.iters} calls): median {timing.median_us:.1f} us a call",
          flush=True)
    if args.ns:
        fit_batches(runner, [int(v) for v in args.ns.split(",")], args.repeats)
    events, batch = gpu_cupti.profile_batch(runner, args.calls, gpu_cupti.trace_path(f"timeline_{T}_{n}_{C}"))
    t0 = events[0]["ts"]
    for e, gap in gpu_cupti.launches(events):
        print(f"{e['ts'] - t0:10.1f}  dur {e['dur']:7.1f}  gap {gap:7.1f}  stream {e['args'].get('stream')}  "
              f"{e['name'][:60]}")
    for name, v in gpu_cupti.per_kernel(events).items():
        gaps = sorted(g for _, g in v)
        # the largest gaps and durations too: a median hides a stall that a long batch pays now and then
        print(f"per kernel: {name}: {len(v)} launches, duration median {statistics.median(d for d, _ in v):.1f} us "
              f"(max {max(d for d, _ in v):.1f}), gap before median {statistics.median(gaps):.1f} us, sum {sum(gaps):.1f}, "
              f"largest {', '.join(f'{g:.1f}' for g in gaps[-3:][::-1])}")
    span = gpu_cupti.span(events)
    end = t0 + span
    print(f"span {span:.1f} us over {args.calls} calls: {span / args.calls:.1f} us a call (first kernel's start to "
          f"last kernel's end)")
    if batch is not None:  # the profiler slows the host, so these read above an unprofiled batch's
        b1 = batch["ts"] + batch["dur"]
        print(f"the batch (host, profiled): {batch['dur']:.1f} us, {batch['dur'] / args.calls:.1f} a call; the GPU idle "
              f"{t0 - batch['ts']:.1f} us before its first kernel and {b1 - end:.1f} us after its last")


def fit_batches(runner, ns: list[int], repeats: int) -> None:
    """Batches of each N calls timed by bench.time_runner, the bench's own loop (two rounds, the lengths
    alternating), then t(N) = a + N c fitted between neighbouring lengths."""
    totals: dict[int, list[float]] = {}
    for _ in range(2):
        for N in ns:
            timing = bench.time_runner(runner, "throughput", N, warmup=0, repeats=repeats)
            totals.setdefault(N, []).extend(v * N * 1e6 for v in timing.samples_s)  # a batch's whole length
    med = {N: statistics.median(v) for N, v in totals.items()}
    for N in ns:
        print(f"batches of {N}: median {med[N]:.0f} us, {med[N] / N:.1f} us a call ({len(totals[N])} batches)")
    for a, b in zip(ns, ns[1:]):
        c = (med[b] - med[a]) / (b - a)
        print(f"fit {a} -> {b} calls: {c:.1f} us a call, {med[a] - a * c:.0f} us a batch", flush=True)


if __name__ == "__main__":
    main()
