"""Liger-Kernel's LigerMHC as a peer in `mhc bench --layer dynamic --compare liger` (torch +
Triton on a CUDA GPU). mhc_aot.bench owns the timing loop and output; this builds the runner.

What is timed, as for the DynamicMHC rows: the mHC machinery around an identity F on x [T, n, C]:
  forward = liger_mhc_coeffs (projection, RMS scale, activations, Sinkhorn) + liger_mhc_pre +
            liger_mhc_post_res
  fwd+bwd = forward + out.backward(G): the gradients of x, phi, b and the three alphas.
phi is in x's dtype as in Liger's own benchmark (benchmark/scripts/benchmark_mhc.py); tmax = 20
Sinkhorn iterations, DynamicMHC's default.
"""

from __future__ import annotations


def liger_runner(case, tmax: int = 20):
    """A bench.Runner for LigerMHC on `case` (T = case.B tokens). Needs torch with CUDA and
    liger-kernel: bench.availability("liger", "dynamic") says which package is missing, this
    raises BenchError without CUDA."""
    import liger_kernel
    import torch
    from liger_kernel.transformers.functional import liger_mhc_coeffs, liger_mhc_post_res, liger_mhc_pre

    from .bench import BenchError, torch_runner

    if not torch.cuda.is_available():  # checked here, in the peer's child: bench never imports torch
        raise BenchError("liger (LigerMHC) runs only on CUDA: torch.cuda.is_available() is False here")
    T, n, C = case.B, case.n, case.C
    dt = getattr(torch, case.dtype)
    dev = "cuda"
    M = n * n + 2 * n
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(T, n, C, device=dev, dtype=dt, generator=g, requires_grad=case.backward)
    phi = (0.02 * torch.randn(n * C, M, device=dev, dtype=dt, generator=g)).requires_grad_(case.backward)
    b = (0.5 * torch.randn(M, device=dev, dtype=torch.float32, generator=g)).requires_grad_(case.backward)
    alphas = [torch.tensor(a, device=dev, requires_grad=case.backward) for a in (1.1, 0.9, 1.3)]
    G = torch.randn(T, n, C, device=dev, dtype=dt, generator=g)
    allow_fp32 = dt == torch.float32

    def forward():
        h_pre, h_post, h_res = liger_mhc_coeffs(x, phi, b, *alphas, allow_fp32=allow_fp32, tmax=tmax)
        x_in = liger_mhc_pre(x, h_pre)
        return liger_mhc_post_res(x, x_in, h_post, h_res)

    if case.backward:
        leaves = [x, phi, b, *alphas]

        def call():
            return torch.autograd.grad(forward(), leaves, G)
    else:
        def call():
            with torch.no_grad():
                return forward()

    version = getattr(liger_kernel, "__version__", "")
    return torch_runner("liger", call, note=f"LigerMHC (liger-kernel {version}, torch {torch.__version__})"
                        .replace(" ,", ","))
