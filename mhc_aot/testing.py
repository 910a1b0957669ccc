"""What every correctness check shares: the tolerance table (DESIGN.md section 5), the float64
numpy reference, relative error, fresh non-trivial inputs, and output poisoning.

Used by tests/ and by `mhc validate`, so the CLI never carries a copy of the test suite's rules.
numpy is needed only by the float64 reference (the `test` extra installs it).
"""

from __future__ import annotations

import contextlib
import math
import os

import mlx.core as mx

# Relative error ||out - ref|| / ||ref|| allowed per dtype of x (and of the output).
TOLERANCES = {mx.float32: 1e-5, mx.float16: 2e-3, mx.bfloat16: 1e-2}
# bfloat16 must also be at most this multiple of the reference's own error when run in bfloat16.
BF16_REFERENCE_FACTOR = 2.0
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}

POISON_ENV = "MHC_AOT_POISON_OUTPUTS"


def tolerance(dtype: mx.Dtype) -> float:
    return TOLERANCES[dtype]


def rel_error(out: mx.array, ref: mx.array) -> float:
    """||out - ref|| / ||ref|| in float32; inf if out has any NaN/inf (NaN never passes)."""
    o = out.astype(mx.float32).reshape(-1)
    r = ref.astype(mx.float32).reshape(-1)
    if not bool(mx.all(mx.isfinite(o)).item()):
        return math.inf
    denom = float(mx.linalg.norm(r).item())
    num = float(mx.linalg.norm(o - r).item())
    return num / denom if denom > 0 else num


def random_params(n: int, C: int, seed: int, scale: float = 1.0) -> dict[str, mx.array]:
    """Non-trivial float32 parameters (not the identity init): every term of the layer matters."""
    k = mx.random.split(mx.random.key(seed), 4)
    return {
        "H_pre_raw": scale * mx.random.normal((n,), key=k[0]),
        "H_post_raw": scale * mx.random.normal((n,), key=k[1]),
        "H_res_raw": 2.0 * scale * mx.random.normal((n, n), key=k[2]),
        "rms_weight": 1.0 + 0.5 * mx.random.normal((C,), key=k[3]),
    }


def random_input(shape: tuple[int, ...], dtype: mx.Dtype, seed: int) -> mx.array:
    return mx.random.normal(shape, key=mx.random.key(seed + 7919)).astype(dtype)


@contextlib.contextmanager
def poisoned_outputs():
    """Inside this block the kernel launchers fill every output with NaN before launch, so an
    element a kernel forgets to write shows up as NaN instead of as leftover memory."""
    old = os.environ.get(POISON_ENV)
    os.environ[POISON_ENV] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ[POISON_ENV]
        else:
            os.environ[POISON_ENV] = old


def poison_requested() -> bool:
    return os.environ.get(POISON_ENV) == "1"


# ---------------------------------------------------------------- float64 numpy reference
def numpy_forward(x, H_pre_raw, H_post_raw, H_res_raw, rms_weight, iters=20, eps=1e-5):
    """DESIGN.md section 1 in float64 numpy; inputs may be mx.arrays or numpy arrays."""
    import numpy as np

    x = np.asarray(x.astype(mx.float32) if isinstance(x, mx.array) else x, dtype=np.float64)
    H_pre_raw, H_post_raw, H_res_raw, w = (np.asarray(a, dtype=np.float64) for a in (H_pre_raw, H_post_raw, H_res_raw, rms_weight))
    H_pre = 1.0 / (1.0 + np.exp(-H_pre_raw))
    H_post = 2.0 / (1.0 + np.exp(-H_post_raw))
    M = numpy_sinkhorn(H_res_raw, iters, eps)
    agg = np.einsum("j,bjc->bc", H_pre, x)
    y = agg / np.sqrt(np.mean(agg * agg, axis=-1, keepdims=True) + eps) * w
    return np.einsum("ij,bjc->bic", M, x) + H_post[None, :, None] * y[:, None, :]


def numpy_sinkhorn(H_res_raw, iters=20, eps=1e-5):
    import numpy as np

    L = np.asarray(H_res_raw, dtype=np.float64)
    P = np.exp(L - L.max(axis=1, keepdims=True))
    for _ in range(iters):
        r = P.sum(axis=1, keepdims=True)
        P = P * np.where(r > eps, 1.0 / np.where(r > eps, r, 1.0), 1.0)
        c = P.sum(axis=0, keepdims=True)
        P = P * np.where(c > eps, 1.0 / np.where(c > eps, c, 1.0), 0.0)
    return P


# ---------------------------------------------------------------- float64 ground truth in MLX (gradients)
# DESIGN.md section 1 in MLX float64 on the CPU stream (float64 has no GPU kernels): mx.grad of
# it is the exact gradient that float32 implementations, the reference included, approximate.
def exp64(v):
    """exp in float64 arithmetic. MLX's CPU exp (and sigmoid) is only float32-accurate even on
    float64 arrays, so: Taylor series of exp(v / 1024), then squared 10 times (rel. error ~1e-13)."""
    y = v / 1024.0
    term = total = mx.ones_like(y)
    for k in range(1, 14):
        term = term * y / k
        total = total + term
    for _ in range(10):
        total = total * total
    return total


def sigmoid64(v):
    return 1.0 / (1.0 + exp64(-v))


def sinkhorn64(H_res_raw, iters=20, eps=1e-5):
    P = exp64(H_res_raw - mx.max(H_res_raw, axis=1, keepdims=True))
    for _ in range(iters):
        r = mx.sum(P, axis=1, keepdims=True)
        P = P * mx.where(r > eps, 1.0 / r, 1.0)
        c = mx.sum(P, axis=0, keepdims=True)
        P = P * mx.where(c > eps, 1.0 / c, 0.0)
    return P


def mix_add64(x, M, bias):
    return M @ x + bias


def _aggregate64(x, H_pre_raw):
    H_pre = sigmoid64(H_pre_raw)
    return mx.sum(x * (H_pre[:, None] if H_pre.ndim == 1 else H_pre), axis=-2)


def forward64(x, H_pre_raw, H_post_raw, H_res_raw, rms_weight, iters=20, eps=1e-5, pre_rms_raw=None):
    """pre_rms_raw: H_pre_raw for the aggregate inside RMSNorm's RMS, given apart from the one it scales
    (either may then be [..., n, C], a copy per token and column: a gradient's terms per use)."""
    H_post = 2.0 * sigmoid64(H_post_raw)
    agg = _aggregate64(x, H_pre_raw)
    agg_rms = agg if pre_rms_raw is None else _aggregate64(x, pre_rms_raw)
    y = agg * mx.rsqrt(mx.mean(agg_rms * agg_rms, axis=-1, keepdims=True) + eps) * rms_weight
    return mix_add64(x, sinkhorn64(H_res_raw, iters, eps), H_post[:, None] * y[..., None, :])
