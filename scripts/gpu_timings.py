"""Kernels vs the mx.compile'd portable path on the GPU: a thin call of mhc_aot.bench (the one
benchmark, DESIGN.md section 6; `mhc bench` runs the same code). Not a test: a measurement.

Shapes: the seed README's latency and throughput tables plus the large suite, forward and
forward + backward, bfloat16. Prints one line per shape and writes every row as JSON.
  python scripts/gpu_timings.py [timings.json]
"""

from __future__ import annotations

import json
import sys

import mlx.core as mx

from mhc_aot import bench


def main() -> None:
    copy = bench.measure_copy_bandwidth()
    rows = []
    for mode, shapes in (("latency", bench.LATENCY_SHAPES),
                         ("throughput", bench.THROUGHPUT_SHAPES + bench.LARGE_SHAPES)):
        for backward in (False, True):
            cases = bench.make_cases(mode, shapes, [bench.DEFAULT_DTYPE], backward)
            for case in cases:
                res = bench.run([case], ["portable"], copy_gbps=copy)
                k, p = res.rows
                rows += res.rows
                print(f"{mode:10s} B={case.B:5d} n={case.n:3d} C={case.C:5d} {k['pass']:16s} | kernels "
                      f"{k['median_us']:9.1f} us ({k['GBps']:7.1f} GB/s, {100 * k['copy_fraction']:3.0f}% of copy) "
                      f"| portable {p['median_us']:9.1f} us | x{k['speedup_vs_portable']:.2f} | {k['note']}",
                      flush=True)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump({"device": mx.device_info().get("device_name"), "mlx": mx.__version__, "copy_GBps": copy,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
