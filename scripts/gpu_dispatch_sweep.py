"""Measures the forward strategies against each other on the GPU, for the column rules in
mhc_aot/dispatch.py (COLUMN_FEW_TOKENS, COLUMN_MID_B).

For each (n, C) and B: median µs of the `fused` and the `column` forward (Sinkhorn excluded) in
both of `mhc bench`'s modes: queued (throughput: many calls, one synchronisation) and evaluated
(latency: each call evaluated alone, where a one-CTA-per-token kernel cannot hide behind the
next call's host work). Prints one line per shape and, per mode, the B values where column wins.
  python scripts/gpu_dispatch_sweep.py
"""

from __future__ import annotations

import statistics
import time

import mlx.core as mx

from mhc_aot import cuda, ops
from mhc_aot.testing import random_input, random_params


def median_us(fn, queued: bool, iters=30, reps=5):
    for _ in range(5):
        mx.eval(fn())
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        if queued:
            mx.eval([fn() for _ in range(iters)])
        else:
            for _ in range(iters):
                mx.eval(fn())
        samples.append((time.perf_counter() - t) / iters)
    return statistics.median(samples) * 1e6


for n, C in ((4, 4096), (8, 1024), (32, 512), (32, 2048), (32, 4096), (32, 8192), (64, 2048)):
    p = random_params(n, C, 0)
    M = ops.sinkhorn(p["H_res_raw"], backend="cuda")
    mx.eval(M)
    wins = {"queued": [], "evaluated": []}
    for B in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024):
        x = random_input((B, n, C), mx.bfloat16, B)
        line = []
        for mode, queued in (("queued", True), ("evaluated", False)):
            t = {s: median_us(lambda: cuda._forward_fn(s, 1e-5)(x, M, p["H_pre_raw"], p["H_post_raw"],
                                                                p["rms_weight"])[0], queued)
                 for s in ("fused", "column")}
            if t["column"] < t["fused"]:
                wins[mode].append(B)
            line.append(f"{mode} fused {t['fused']:7.1f} column {t['column']:7.1f}")
        print(f"n={n:3d} C={C:5d} B={B:5d}: " + " | ".join(line), flush=True)
    print(f"n={n} C={C}: column wins at B in {wins}", flush=True)
