"""Pure-MLX reference for dynamic mHC (DESIGN.md section 1, "Dynamic mHC"): the source of truth
for every dynamic test, written to match Liger-Kernel's `LigerMHC` formula by formula.

Liger-Kernel files cited below (linkedin/Liger-Kernel, commit ead96b6):
  ops/mhc.py           = src/liger_kernel/ops/mhc.py
  transformers/mhc.py  = src/liger_kernel/transformers/mhc.py

Shapes: T tokens (leading dims flattened), n streams, C channels, K = n C, M = n n + 2 n.
  x [T, n, C]; phi [K, M]; b [M]; alpha_pre, alpha_post, alpha_res scalars (shape ()).
Layout of the M projection columns and of b (ops/mhc.py:446-447, 466-467):
  [0, n) pre logits, [n, 2n) post logits, [2n, 2n + n n) residual logits, row-major (out, in).
Every function accumulates in float32 and returns float32 (float64 where its inputs are float64:
`mhc validate`'s float64 truth for the dynamic gradients, on the CPU stream).
"""

from __future__ import annotations

import mlx.core as mx

# LigerMHC's defaults (transformers/mhc.py:86-90)
DEFAULT_TMAX = 20
DEFAULT_RMS_EPS = 1e-6
DEFAULT_PRE_EPS = 0.0
DEFAULT_SINKHORN_EPS = 1e-6
DEFAULT_POST_MULT = 2.0

F32 = mx.float32


def _acc(a: mx.array) -> mx.array:
    """a in the accumulation type: float32, or float64 for float64 inputs."""
    return a if a.dtype == mx.float64 else a.astype(F32)


def n_coeffs(n: int) -> int:
    """M = n n + 2 n columns of phi: n pre, n post and n n residual logits."""
    return n * n + 2 * n


def rms_projection(x: mx.array, phi: mx.array, rms_eps: float = DEFAULT_RMS_EPS) -> tuple[mx.array, mx.array]:
    """mix = (v @ phi) * invr with v = vec(x[t]) and invr = rsqrt(mean(v^2) + rms_eps): [T, M], [T].

    The RMS scale is applied after the skinny matmul and the mean runs over all K = n C values of
    the token (ops/mhc.py:85-111, `_mhc_mm_norm_fwd_kernel`); there is no RMS weight.
    """
    T = x.shape[0]
    v = _acc(x.reshape(T, -1))
    invr = mx.rsqrt(mx.mean(v * v, axis=-1) + rms_eps)
    # one sum of products per column, not a matmul: MLX's float32 matmuls are TF32 on CUDA by
    # default, and a [T, K, M] broadcast would hold M copies of x. phi may also be [T, K, M], a copy
    # per token (`mhc validate` takes the gradient's terms that way)
    phi = _acc(phi)
    z = mx.stack([mx.sum(v * phi[..., m], axis=-1) for m in range(phi.shape[-1])], axis=-1)
    return z * invr[:, None], invr


def split_logits(mix: mx.array, b: mx.array, alpha_pre, alpha_post, alpha_res, n: int):
    """logits = alpha * mix + b per segment (ops/mhc.py:452-453, 469): pre [T, n], post [T, n], res [T, n, n].
    b may also be [T, M] and the alphas of the logits' shapes, a copy per use (`mhc validate`)."""
    b = _acc(b)
    pre = mix[:, :n] * alpha_pre + b[..., :n]
    post = mix[:, n:2 * n] * alpha_post + b[..., n:2 * n]
    res = mix[:, 2 * n:].reshape(-1, n, n) * alpha_res + b[..., 2 * n:].reshape(*b.shape[:-1], n, n)
    return pre, post, res


def sinkhorn(logits: mx.array, tmax: int = DEFAULT_TMAX, eps: float = DEFAULT_SINKHORN_EPS) -> mx.array:
    """Liger's per-token Sinkhorn of [T, n, n] logits (ops/mhc.py:471-490):

        P = softmax over each row (max-subtracted) + eps
        P = P / (column sums + eps)
        tmax - 1 times: P = P / (row sums + eps); P = P / (column sums + eps)

    So `tmax` column normalisations and tmax row normalisations, the first of them the softmax.
    Unlike the static layer's Sinkhorn there is no threshold: eps is added to every divisor.
    """
    logits = _acc(logits)
    e = mx.exp(logits - mx.max(logits, axis=-1, keepdims=True))
    P = e / mx.sum(e, axis=-1, keepdims=True) + eps
    P = P / (mx.sum(P, axis=-2, keepdims=True) + eps)
    for _ in range(tmax - 1):
        P = P / (mx.sum(P, axis=-1, keepdims=True) + eps)
        P = P / (mx.sum(P, axis=-2, keepdims=True) + eps)
    return P


def mhc_coeffs(x: mx.array, phi: mx.array, b: mx.array, alpha_pre, alpha_post, alpha_res,
               tmax: int = DEFAULT_TMAX, rms_eps: float = DEFAULT_RMS_EPS, pre_eps: float = DEFAULT_PRE_EPS,
               sinkhorn_eps: float = DEFAULT_SINKHORN_EPS, post_mult: float = DEFAULT_POST_MULT, projection=None):
    """h_pre = sigmoid + pre_eps [T, n], h_post = post_mult sigmoid [T, n], h_res = Sinkhorn [T, n, n]
    (ops/mhc.py:455-456 and 471-498; LigerMHCCoeffsFunction, ops/mhc.py:1382). `projection`
    replaces rms_projection (the portable path passes its matmul form)."""
    n = x.shape[-2]
    mix, _ = (projection or rms_projection)(x, phi, rms_eps)
    pre, post, res = split_logits(mix, b, alpha_pre, alpha_post, alpha_res, n)
    return mx.sigmoid(pre) + pre_eps, mx.sigmoid(post) * post_mult, sinkhorn(res, tmax, sinkhorn_eps)


def mhc_pre(x: mx.array, h_pre: mx.array) -> mx.array:
    """x_in[t, c] = sum_j h_pre[t, j] x[t, j, c]: [T, n, C] -> [T, C] (ops/mhc.py:878-890)."""
    return mx.sum(_acc(x) * _acc(h_pre)[:, :, None], axis=1)


def mhc_post_res(x: mx.array, f_out: mx.array, h_post: mx.array, h_res: mx.array) -> mx.array:
    """x_out[t, o, c] = sum_i h_res[t, o, i] x[t, i, c] + h_post[t, o] f_out[t, c] (ops/mhc.py:1096-1110)."""
    mixed = mx.sum(_acc(h_res)[:, :, :, None] * _acc(x)[:, None, :, :], axis=2)
    return mixed + _acc(h_post)[:, :, None] * _acc(f_out)[:, None, :]
