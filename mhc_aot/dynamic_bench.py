"""Benchmark definitions of dynamic mHC, for `mhc bench --layer dynamic` (which owns timing and
output) and a standalone peer timing of Liger-Kernel's LigerMHC (torch + triton on a GPU).

What is timed, on both sides: the mHC machinery around an identity F, on x [T, n, C]:
  forward = coefficients (projection, RMS scale, activations, Sinkhorn) + pre + post_res
  fwd+bwd = forward + the gradients of x, phi, b and the three alphas for a fixed cotangent
Bytes for GB/s (DESIGN.md section 6): x read once + out written once = 2 T n C itemsize.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .dynamic import DynamicMHC


def make_dynamic_step(T: int, n: int, C: int, dtype: mx.Dtype = mx.bfloat16, backend: str = "auto",
                      backward: bool = False, seed: int = 0):
    """A zero-argument callable running one forward (or forward + backward) of DynamicMHC around
    nn.Identity on fresh x [T, n, C]; returns the arrays to evaluate. Build once, call per timing."""
    layer = DynamicMHC(nn.Identity(), n, C, backend=backend, key=mx.random.key(seed))
    x = mx.random.normal((T, n, C), key=mx.random.key(seed + 1)).astype(dtype)
    mx.eval(layer.parameters(), x)
    if not backward:
        return lambda: layer(x)
    G = mx.random.normal((T, n, C), key=mx.random.key(seed + 2)).astype(dtype)

    def loss(params, x):
        layer.update(params)
        return mx.sum(layer(x).astype(mx.float32) * G)

    grad = mx.grad(loss, argnums=(0, 1))
    params = layer.trainable_parameters()
    return lambda: grad(params, x)


def bytes_moved(T: int, n: int, C: int, dtype: mx.Dtype = mx.bfloat16) -> int:
    return 2 * T * n * C * dtype.size


def liger_reference_timing(T: int, n: int, C: int, dtype: str = "bfloat16", backward: bool = False,
                           warmup: int = 5, iters: int = 20, tmax: int = 20) -> float:
    """Median microseconds of LigerMHC's functional chain (liger_mhc_coeffs + liger_mhc_pre +
    liger_mhc_post_res, F = identity) on the CUDA device, with the same shapes and settings
    (phi in x's dtype as in Liger's benchmark, benchmark/scripts/benchmark_mhc.py). Needs torch
    with CUDA and liger-kernel; raises ImportError / RuntimeError saying which is missing."""
    import statistics

    import torch
    from liger_kernel.transformers.functional import liger_mhc_coeffs, liger_mhc_post_res, liger_mhc_pre

    if not torch.cuda.is_available():
        raise RuntimeError("liger_reference_timing needs a CUDA device for torch (torch.cuda.is_available() is False)")
    dt = getattr(torch, dtype)
    dev = "cuda"
    M = n * n + 2 * n
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(T, n, C, device=dev, dtype=dt, generator=g, requires_grad=backward)
    phi = (0.02 * torch.randn(n * C, M, device=dev, dtype=dt, generator=g)).requires_grad_(backward)
    b = torch.zeros(M, device=dev, dtype=torch.float32, requires_grad=backward)
    alphas = [torch.tensor(1.0, device=dev, requires_grad=backward) for _ in range(3)]
    G = torch.randn(T, n, C, device=dev, dtype=dt, generator=g)
    allow_fp32 = dt == torch.float32

    def step():
        h_pre, h_post, h_res = liger_mhc_coeffs(x, phi, b, *alphas, allow_fp32=allow_fp32, tmax=tmax)
        x_in = liger_mhc_pre(x, h_pre)
        out = liger_mhc_post_res(x, x_in, h_post, h_res)
        if backward:
            for p in (x, phi, b, *alphas):
                p.grad = None
            out.backward(G)
        return out

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000.0)
    return statistics.median(times)
