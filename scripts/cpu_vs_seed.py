"""Portable path vs the `mhc-mlx` package's compiled reference on MLX's CPU backend (issue 2).

Median microseconds per forward call (each call evaluated), bfloat16 x, same parameters for both;
also checks the outputs agree within DESIGN.md's bfloat16 tolerance. Not a test: a measurement.
  python scripts/cpu_vs_seed.py
"""

from __future__ import annotations

import statistics
import time

import mlx.core as mx
import mhc_mlx

from mhc_aot import ops
from mhc_aot.testing import random_input, random_params, rel_error, tolerance


def median_us(fn, iters=30, warmup=3):
    for _ in range(warmup):
        mx.eval(fn())
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        mx.eval(fn())
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e6


print(f"MLX {mx.__version__}, device {mx.default_device()}, dtype bfloat16")
print(f"{'B':>4} {'n':>3} {'C':>5} | {'mhc-aot portable us':>20} | {'mhc-mlx compiled ref us':>24} | speedup | rel diff")
for B, n, C in ((32, 32, 2048), (32, 4, 4096), (32, 32, 512)):
    p = random_params(n, C, 0)
    x = random_input((B, n, C), mx.bfloat16, 0)
    seed = mhc_mlx.MHCLayer(n, C, use_metal=False, compile_reference=True, identity_init=False)
    seed.H_pre_raw, seed.H_post_raw, seed.H_res_raw, seed.rms_weight = (p["H_pre_raw"], p["H_post_raw"],
                                                                        p["H_res_raw"], p["rms_weight"])
    ours = median_us(lambda: ops.mhc_forward(x, **p, backend="portable"))
    theirs = median_us(lambda: seed(x))
    diff = rel_error(ops.mhc_forward(x, **p, backend="portable"), seed(x).astype(mx.float32))
    assert diff < tolerance(mx.bfloat16), diff
    print(f"{B:>4} {n:>3} {C:>5} | {ours:>20.0f} | {theirs:>24.0f} | x{theirs / ours:5.1f} | {diff:.1e}")
