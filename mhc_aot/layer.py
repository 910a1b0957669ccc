"""MHCLayer and MHCRewire: drop-in modules with the `mhc-mlx` API (DESIGN.md section 1)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import ops, reference
from .reference import DEFAULT_EPS, DEFAULT_ITERS

# Identity init: sigmoid(-12) ~ 6e-6, so H_pre ~ 0, H_post ~ 0 and M ~ I (exp(-12) off the diagonal).
_IDENTITY_LOGIT = 12.0


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}: expected an int >= 1")
    return value


class MHCLayer(nn.Module):
    """Static mHC on x [..., n, C]: out = M x + H_post * RMSNorm(H_pre . x) * rms_weight.

    Parameters (float32): H_pre_raw [n], H_post_raw [n], H_res_raw [n, n], rms_weight [C].
    backend: "auto" (kernels on GPU, portable MLX ops on CPU), "portable", "reference",
    "cuda" or "metal"; see `mhc_aot.dispatch`.
    """

    def __init__(self, n: int, C: int, sinkhorn_iters: int = DEFAULT_ITERS, eps: float = DEFAULT_EPS,
                 identity_init: bool = True, backend: str = "auto"):
        super().__init__()
        self.n = _check_positive_int("n", n)
        self.C = _check_positive_int("C", C)
        ops.check_iters_eps(sinkhorn_iters, eps)
        if backend not in ops.dispatch.BACKENDS:
            raise ValueError(f"backend={backend!r}: expected one of {', '.join(ops.dispatch.BACKENDS)}")
        self.sinkhorn_iters = sinkhorn_iters
        self.eps = float(eps)
        self.backend = backend
        if identity_init:
            self.H_pre_raw = mx.full((n,), -_IDENTITY_LOGIT, dtype=mx.float32)
            self.H_post_raw = mx.full((n,), -_IDENTITY_LOGIT, dtype=mx.float32)
            self.H_res_raw = mx.full((n, n), -_IDENTITY_LOGIT, dtype=mx.float32) + _IDENTITY_LOGIT * mx.eye(n)
        else:
            self.H_pre_raw = mx.zeros((n,), dtype=mx.float32)
            self.H_post_raw = mx.zeros((n,), dtype=mx.float32)
            self.H_res_raw = mx.zeros((n, n), dtype=mx.float32)
        self.rms_weight = mx.ones((C,), dtype=mx.float32)

    def _check_input(self, x: mx.array) -> None:
        ops.check_float("x", x)
        if x.ndim < 2 or x.shape[-2] != self.n or x.shape[-1] != self.C:
            raise ValueError(f"MHCLayer(n={self.n}, C={self.C}) got x of shape {tuple(x.shape)}: "
                             f"expected [..., {self.n}, {self.C}]")

    def mixing_matrix(self) -> mx.array:
        """The current M = Sinkhorn(exp(H_res_raw)), float32 [n, n]."""
        return ops.sinkhorn(self.H_res_raw, self.sinkhorn_iters, self.eps, backend=self.backend)

    def __call__(self, x: mx.array) -> mx.array:
        self._check_input(x)
        return ops.mhc_forward(x, self.H_pre_raw, self.H_post_raw, self.H_res_raw, self.rms_weight,
                               self.sinkhorn_iters, self.eps, backend=self.backend)

    def post_combine(self, x: mx.array, y_inner: mx.array) -> mx.array:
        """H_post * (y_inner + (M * H_pre) x) as one mix + add: M' = diag(H_post) M diag(H_pre)."""
        self._check_input(x)
        for name, shape in (("H_pre_raw", (self.n,)), ("H_post_raw", (self.n,)), ("H_res_raw", (self.n, self.n))):
            ops.check_shape(name, getattr(self, name), shape)  # else a (1,) would broadcast silently
        H_pre, H_post = reference.activate_pre_post(self.H_pre_raw, self.H_post_raw)
        M_folded = H_post[:, None] * self.mixing_matrix() * H_pre[None, :]
        bias = y_inner * H_post[:, None].astype(y_inner.dtype)
        return ops.stream_mix_add(x, M_folded, bias, backend=self.backend)

    def _extra_repr(self) -> str:
        return f"n={self.n}, C={self.C}, sinkhorn_iters={self.sinkhorn_iters}, eps={self.eps}, backend={self.backend!r}"


class MHCRewire(nn.Module):
    """Wrap any block F with mHC residuals: out = H_post * (F(H_pre * x) + (M * H_pre) x).

    x [..., dims] is viewed as [..., n, dims / n]; F maps [..., dims] to [..., dims].
    """

    def __init__(self, inner: nn.Module, dims: int, n: int = 32, **mhc_kwargs):
        super().__init__()
        _check_positive_int("dims", dims)
        _check_positive_int("n", n)
        if dims % n != 0:
            raise ValueError(f"dims={dims} must be divisible by n={n}")
        self.inner = inner
        self.dims = dims
        self.n = n
        self.mhc = MHCLayer(n=n, C=dims // n, **mhc_kwargs)

    def __call__(self, x: mx.array) -> mx.array:
        ops.check_float("x", x)
        if x.ndim < 1 or x.shape[-1] != self.dims:
            raise ValueError(f"MHCRewire(dims={self.dims}) got x of shape {tuple(x.shape)}: "
                             f"expected [..., {self.dims}]")
        streams = x.reshape(*x.shape[:-1], self.n, self.dims // self.n)
        H_pre, _ = reference.activate_pre_post(self.mhc.H_pre_raw, self.mhc.H_post_raw)
        y_inner = self.inner((streams * H_pre[:, None].astype(x.dtype)).reshape(x.shape))
        if tuple(y_inner.shape) != tuple(x.shape):
            raise ValueError(f"MHCRewire: inner module returned shape {tuple(y_inner.shape)}: "
                             f"expected x's shape {tuple(x.shape)}")
        out = self.mhc.post_combine(streams, y_inner.reshape(streams.shape))
        return out.reshape(x.shape)
