"""Pure-MLX reference for static mHC: the source of truth for every test.

Readable on purpose: each function is one line of DESIGN.md section 1, accumulating in float32.
Shapes: x [B, n, C]; H_pre_raw [n]; H_post_raw [n]; H_res_raw [n, n]; rms_weight [C].
The kernels and the portable path in `ops` must match these functions within DESIGN.md section 5.
"""

from __future__ import annotations

import mlx.core as mx

DEFAULT_ITERS = 20
DEFAULT_EPS = 1e-5


def sinkhorn_knopp(H: mx.array, iters: int = DEFAULT_ITERS, eps: float = DEFAULT_EPS) -> mx.array:
    """`iters` rounds of row then column normalisation of a positive [n, n] matrix.

    A row whose sum is <= eps is left unchanged; a column whose sum is <= eps becomes zero
    (the `mhc-mlx` convention, kept so weights move between the packages unchanged).
    """
    P = H.astype(mx.float32)
    for _ in range(iters):
        row_sum = mx.sum(P, axis=1, keepdims=True)
        P = P * mx.where(row_sum > eps, 1.0 / row_sum, 1.0)
        col_sum = mx.sum(P, axis=0, keepdims=True)
        P = P * mx.where(col_sum > eps, 1.0 / col_sum, 0.0)
    return P


def mixing_matrix(H_res_raw: mx.array, iters: int = DEFAULT_ITERS, eps: float = DEFAULT_EPS) -> mx.array:
    """M = sinkhorn(exp(H_res_raw - rowmax)): the ~doubly stochastic residual mixing (paper eq. 8-9)."""
    logits = H_res_raw.astype(mx.float32)
    return sinkhorn_knopp(mx.exp(logits - mx.max(logits, axis=1, keepdims=True)), iters, eps)


def activate_pre_post(H_pre_raw: mx.array, H_post_raw: mx.array) -> tuple[mx.array, mx.array]:
    """H_pre = sigmoid(raw) in (0, 1); H_post = 2 sigmoid(raw) in (0, 2) (paper eq. 8)."""
    return mx.sigmoid(H_pre_raw.astype(mx.float32)), 2.0 * mx.sigmoid(H_post_raw.astype(mx.float32))


def stream_aggregate(x: mx.array, H_pre: mx.array) -> mx.array:
    """agg[b, c] = sum_j H_pre[j] x[b, j, c]: [B, n, C] -> [B, C]."""
    return mx.sum(x.astype(mx.float32) * H_pre.astype(mx.float32)[None, :, None], axis=1)


def rms_norm(agg: mx.array, weight: mx.array, eps: float = DEFAULT_EPS) -> mx.array:
    """y = agg * rsqrt(mean_c(agg^2) + eps) * weight over the last axis."""
    a = agg.astype(mx.float32)
    inv_rms = mx.rsqrt(mx.mean(a * a, axis=-1, keepdims=True) + eps)
    return a * inv_rms * weight.astype(mx.float32)


def stream_distribute(y: mx.array, H_post: mx.array) -> mx.array:
    """dist[b, i, c] = H_post[i] y[b, c]: [B, C] -> [B, n, C]."""
    return y.astype(mx.float32)[:, None, :] * H_post.astype(mx.float32)[None, :, None]


def stream_mix(x: mx.array, M: mx.array) -> mx.array:
    """mixed[b, i, c] = sum_j M[i, j] x[b, j, c], written as the broadcast sum that it is."""
    return mx.sum(M.astype(mx.float32)[None, :, :, None] * x.astype(mx.float32)[:, None, :, :], axis=2)


def mhc_forward(
    x: mx.array,
    H_pre_raw: mx.array,
    H_post_raw: mx.array,
    H_res_raw: mx.array,
    rms_weight: mx.array,
    iters: int = DEFAULT_ITERS,
    eps: float = DEFAULT_EPS,
) -> mx.array:
    """out = M x + H_post * RMSNorm(H_pre . x) for x [B, n, C]; float32 result."""
    H_pre, H_post = activate_pre_post(H_pre_raw, H_post_raw)
    M = mixing_matrix(H_res_raw, iters, eps)
    y = rms_norm(stream_aggregate(x, H_pre), rms_weight, eps)
    return stream_mix(x, M) + stream_distribute(y, H_post)


def stream_mix_add(x: mx.array, M: mx.array, bias: mx.array) -> mx.array:
    """out = M x + bias: the MHCRewire post-combine (bias [B, n, C]); float32 result."""
    return stream_mix(x, M) + bias.astype(mx.float32)
