"""Median timings of the CUDA kernels against the mx.compile'd portable path, in one process.

Development measurement used by scripts/gpu_check.sh until `mhc bench` lands (issue 4): not a
test. Modes as DESIGN.md section 6: latency (evaluate each call) and throughput (queue calls
with async_eval, synchronise at the end). Effective GB/s counts x read once + out written once.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import mlx.core as mx

from mhc_aot import ops
from mhc_aot.testing import random_input, random_params

CONFIGS = [  # (mode, B, n, C): the seed README's tables plus the two large shapes of issue 3
    *[("latency", 1, 32, C) for C in (256, 1024, 2048, 4096, 8192)],
    ("throughput", 32, 32, 2048), ("throughput", 32, 32, 512), ("throughput", 32, 4, 4096),
    ("throughput", 4096, 4, 4096), ("throughput", 1024, 32, 2048),
]


def median_us(fn, mode: str, iters: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        mx.eval(fn())
    samples = []
    for _ in range(5 if mode == "throughput" else 1):
        if mode == "latency":
            for _ in range(iters):
                t = time.perf_counter()
                mx.eval(fn())
                samples.append(time.perf_counter() - t)
        else:
            t = time.perf_counter()
            outs = []
            for _ in range(iters):
                o = fn()
                mx.async_eval(o)
                outs.append(o)
            mx.eval(outs)
            samples.append((time.perf_counter() - t) / iters)
    return statistics.median(samples) * 1e6


def main() -> None:
    rows = []
    for mode, B, n, C in CONFIGS:
        p = random_params(n, C, 0)
        x = random_input((B, n, C), mx.bfloat16, 0)
        dout = random_input((B, n, C), mx.bfloat16, 1)
        args = (x, p["H_pre_raw"], p["H_post_raw"], p["H_res_raw"], p["rms_weight"])
        row = {"mode": mode, "B": B, "n": n, "C": C, "dtype": "bfloat16"}
        for backend in ("cuda", "portable"):
            fwd = lambda: ops.mhc_forward(*args, backend=backend)  # noqa: E731
            grad = mx.grad(lambda *a: (ops.mhc_forward(*a, backend=backend) * dout).astype(mx.float32).sum(),
                           argnums=(0, 1, 2, 3, 4))
            row[f"{backend}_fwd_us"] = median_us(fwd, mode, 50)
            row[f"{backend}_fwdbwd_us"] = median_us(lambda: grad(*args), mode, 20)
        row["fwd_GBps"] = 2 * x.nbytes / row["cuda_fwd_us"] / 1e3
        rows.append(row)
        print(f"{mode:10s} B={B:5d} n={n:3d} C={C:5d} | cuda fwd {row['cuda_fwd_us']:8.1f} us "
              f"({row['fwd_GBps']:7.1f} GB/s) fwd+bwd {row['cuda_fwdbwd_us']:8.1f} | portable "
              f"{row['portable_fwd_us']:8.1f} / {row['portable_fwdbwd_us']:8.1f} | speedup "
              f"x{row['portable_fwd_us'] / row['cuda_fwd_us']:.1f} / x{row['portable_fwdbwd_us'] / row['cuda_fwdbwd_us']:.1f}",
              flush=True)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump({"device": mx.device_info().get("device_name"), "mlx": mx.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
