"""Measures the forward strategies against each other on the GPU, to set dispatch.COLUMN_MIN_N / COLUMN_MIN_B / COLUMN_MIN_C.

For each (n, C) and B: median µs of the `fused` and the `column` forward (Sinkhorn excluded),
queued (throughput mode). Prints one line per shape and the largest B at which `column` wins (the 2026-11-23 H100 run is
summarised above dispatch.FUSED_MAX_C).
  python scripts/gpu_dispatch_sweep.py
"""

from __future__ import annotations

import statistics
import time

import mlx.core as mx

from mhc_aot import cuda, ops
from mhc_aot.testing import random_input, random_params


def median_us(fn, iters=30, reps=5):
    for _ in range(5):
        mx.eval(fn())
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        outs = [fn() for _ in range(iters)]
        mx.eval(outs)
        samples.append((time.perf_counter() - t) / iters)
    return statistics.median(samples) * 1e6


for n, C in ((4, 4096), (32, 2048), (32, 512), (32, 8192), (8, 1024)):
    p = random_params(n, C, 0)
    M = ops.sinkhorn(p["H_res_raw"], backend="cuda")
    mx.eval(M)
    crossover = 0
    for B in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        x = random_input((B, n, C), mx.bfloat16, B)
        t = {s: median_us(lambda: cuda._forward_fn(s, 1e-5)(x, M, p["H_pre_raw"], p["H_post_raw"], p["rms_weight"])[0])
             for s in ("fused", "column")}
        if t["column"] < t["fused"]:
            crossover = B
        print(f"n={n:3d} C={C:5d} B={B:4d}: fused {t['fused']:7.1f} us  column {t['column']:7.1f} us", flush=True)
    print(f"n={n} C={C}: column wins up to B={crossover}", flush=True)
