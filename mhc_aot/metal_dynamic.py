"""Metal launchers of dynamic mHC (metal_src/mhc_dynamic_*.metal) through `mhc_aot.metal`'s launch
helper (the preloaded metallib, the scalars buffer, NaN-poisoned outputs under
`testing.poisoned_outputs()`). Gradients: `mx.custom_function` VJPs, as mhc_aot/cuda_dynamic.py.

  mhc_coeffs    forward: the projection z = vec(x) @ phi and the sums of squares as MLX ops (one
                float32 matmul), then coeffs: RMS scale, activations, Sinkhorn and (with_pre) x_in,
                a threadgroup per token (the CUDA kernel's mode 0), n <= COEFFS_N_LIMIT
                backward: coeffs_bwd (activations' and Sinkhorn's derivatives, a threadgroup per token),
                then dx = dz phi^T + factor x + h_pre dx_in and dphi = x^T dz as MLX matmuls
  mhc_pre       pre (x_in = h_pre . x, one pass) / pre_bwd (dx and the dots dx_in . x, per token)
  mhc_post_res  post_res (x and f read once) / post_res_bwd (per token)
Larger n take MLX ops by dispatch rule (mhc_aot/dispatch.py); with n between the two limits,
DynamicMHC takes MLX-op coefficients and x_in from the pre kernel (dynamic._coeffs).

NOT RUN ON APPLE HARDWARE: as mhc_aot/metal.py says, checked on Linux by the syntax-and-type check
and by running the kernels and these launchers under the CPU emulation of tests/metal_emulation.py
(tests/test_dynamic.py).
"""

from __future__ import annotations

import functools

import mlx.core as mx

from . import metal
from .kernel_ops import compiled_call, dtype_tag, scalars_of, single

F32 = mx.float32
THREADS = metal.THREADS
VEC = 4  # metal_src/mhc_common.h: columns a thread takes in the token passes
COEFFS_N_LIMIT = 32  # metal_src/mhc_dynamic_coeffs.metal: streams its threadgroup arrays hold (generic kernel)
COEFFS_BWD_POOL = 7168  # metal_src/mhc_dynamic_coeffs_bwd.metal: its threadgroup floats (28 KB)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _column_grid(T: int, C: int) -> tuple[int, int, int]:
    """Grid (threads) of the one-pass kernels: VEC columns a thread, threadgroup y = the token."""
    return (_cdiv(_cdiv(C, VEC), THREADS) * THREADS, T, 1)


# ---------------------------------------------------------------- mhc_coeffs (+ pre)
def _coeffs_fwd(x3, phi32, b32, ap, apo, ar, cfg, with_pre: bool):
    """[h_pre, h_post, h_res, x_in (or an unwritten [1]), mix, invr]: mix and invr for the backward."""
    T, n, C = x3.shape
    M = n * n + 2 * n
    xk = x3.reshape(T, n * C).astype(F32)
    # the projection's one "split" (the kernel sums S of them): MLX's float32 matmul and sum of squares
    part, sq = (xk @ phi32)[None], mx.sum(xk * xk, axis=-1)[None]
    return metal._launch("mhc_dynamic_coeffs", dtype_tag(x3.dtype), n, [x3, part, sq, b32, ap, apo, ar],
                         [(T, n), (T, n), (T, n, n), (T, C) if with_pre else (1,), (T, M), (T,)],
                         [F32, F32, F32, x3.dtype, F32, F32],
                         [n, C, T, 1, cfg.tmax, cfg.rms_eps, cfg.pre_eps, cfg.sinkhorn_eps, cfg.post_mult,
                          int(with_pre), 0, 0], (T * THREADS, 1, 1))


@functools.lru_cache(maxsize=None)
def _coeffs_fn(cfg, with_pre: bool, zero_dh_pre: bool = False):
    @mx.custom_function
    def f(x3, phi32, b32, ap, apo, ar):
        return tuple(_coeffs_fwd(x3, phi32, b32, ap, apo, ar, cfg, with_pre))

    @f.vjp
    def f_vjp(primals, cotangents, outputs):
        return _coeffs_bwd(primals, cotangents, outputs, cfg, with_pre, zero_dh_pre)

    return f


def coeffs_bwd_floats(n: int, tmax: int, nmax: int) -> int:
    """Threadgroup floats mhc_dynamic_coeffs_bwd uses for one token (its header's layout)."""
    M, nr = n * n + 2 * n, max(nmax, 1)
    return 2 * M + n * n + n + (THREADS // 32) * nr + nr + (tmax + 1) * n * n + 2 * tmax * n


def _coeffs_bwd(primals, cotangents, outputs, cfg, with_pre: bool, zero_dh_pre: bool = False):
    """The coefficients' backward: the per-token math (the activations' and the Sinkhorn's derivatives,
    the stream dots of x_in's cotangent) by mhc_dynamic_coeffs_bwd, the products with x and phi as MLX
    float32 matmuls (dx = dz phi^T + factor x + h_pre dx_in, dphi = x^T dz), db and dalpha as column
    sums. Documented exit: a Sinkhorn history over the kernel's threadgroup pool (large n or tmax)
    takes MLX's VJP of the portable graph. zero_dh_pre (the layer, which discards h_pre): h_pre's zero
    cotangent is not passed (MLX would fill it in a launch); the kernel does not read that slot."""
    x3, phi32, b32, ap, apo, ar = primals
    T, n, C = x3.shape
    K, M, tag = n * C, n * n + 2 * n, dtype_tag(x3.dtype)
    if coeffs_bwd_floats(n, cfg.tmax, metal._kernel("mhc_dynamic_coeffs_bwd", tag, n).nmax) > COEFFS_BWD_POOL:
        from . import dynamic

        return dynamic._portable_coeffs_vjp(primals, cotangents, cfg, with_pre)
    h_pre, mix, invr = outputs[0], outputs[4], outputs[5]
    dh_post, dh_res = (c.astype(F32) for c in cotangents[1:3])
    dh_pre = mix if zero_dh_pre else cotangents[0].astype(F32)  # mix: an unread slot
    # with_pre false: x3 itself fills the unread dx_in slot, mix the unread dots slot (no placeholder op)
    g_in = cotangents[3].astype(x3.dtype) if with_pre else x3
    dz, factor, rows = metal._launch("mhc_dynamic_coeffs_bwd", tag, n,
                                     [x3, mix, invr, b32, ap, apo, ar, dh_pre, dh_post, dh_res, g_in, mix],
                                     [(T, M), (T,), (T, M + 3)], [F32, F32, F32],
                                     [n, C, T, cfg.tmax, cfg.sinkhorn_eps, cfg.post_mult, int(with_pre),
                                      int(not zero_dh_pre), 0, 0],
                                     (T * THREADS, 1, 1))
    xk = x3.reshape(T, K).astype(F32)
    dx = dz @ phi32.T + factor[:, None] * xk
    if with_pre:  # the pre-aggregation's own x-gradient
        dx = dx + (h_pre[:, :, None] * g_in.astype(F32)[:, None, :]).reshape(T, K)
    sums = mx.sum(rows, axis=0)
    return (dx.astype(x3.dtype).reshape(T, n, C), xk.T @ dz, sums[:M], *scalars_of(sums, M, (ap, apo, ar)))


def coeffs(x3, phi, b, alpha_pre, alpha_post, alpha_res, cfg, with_pre: bool, strategy: str = "fused",
           alias: bool = False):
    """(h_pre, h_post, h_res[, x_in][, x]) of x3 [T, n, C]; alias: x itself last (the layer's post_res
    reads it; on Metal nothing joins the two x-gradients), and the layer discards h_pre, whose cotangent
    the backward then takes as zero (cuda_dynamic.coeffs)."""
    n = x3.shape[1]
    if n > COEFFS_N_LIMIT:
        raise ValueError(f"mhc_coeffs with n={n} streams: the Metal coefficient kernel serves n <= {COEFFS_N_LIMIT} "
                         f"(its per-token matrices live in threadgroup memory); pass backend='portable'")
    outs = compiled_call(_coeffs_fn(cfg, with_pre, alias and with_pre), x3, phi.astype(F32), b.astype(F32),
                         alpha_pre.astype(F32), alpha_post.astype(F32), alpha_res.astype(F32))
    picked = tuple(outs[:4]) if with_pre else tuple(outs[:3])
    return (*picked, x3) if alias else picked


# ---------------------------------------------------------------- mhc_pre
def _pre_fwd(x3, hp):
    T, n, C = x3.shape
    (out,) = metal._launch("mhc_dynamic_pre", dtype_tag(x3.dtype), n, [x3, hp], [(T, C)], [x3.dtype], [n, C],
                           _column_grid(T, C))
    return out


def _pre_bwd(x3, hp, g):
    T, n, C = x3.shape
    dx, dhp = metal._launch("mhc_dynamic_pre_bwd", dtype_tag(x3.dtype), n, [x3, hp, g], [(T, n, C), (T, n)],
                            [x3.dtype, F32], [n, C, 1], (T * THREADS, 1, 1))
    return dx, dhp


@mx.custom_function
def _pre_fn(x3, hp):
    return _pre_fwd(x3, hp)


@_pre_fn.vjp
def _pre_vjp(primals, cotangents, outputs):
    x3, hp = primals
    return _pre_bwd(x3, hp, single(cotangents).astype(x3.dtype))


def pre(x3, h_pre, strategy: str = "fused"):
    metal._check_n(x3.shape[1], "mhc_pre")
    return compiled_call(_pre_fn, x3, h_pre.astype(F32))


# ---------------------------------------------------------------- mhc_post_res
@mx.custom_function
def _post_res_fn(x3, f2, hp, hr):
    T, n, C = x3.shape
    (out,) = metal._launch("mhc_dynamic_post_res", dtype_tag(x3.dtype), n, [x3, f2, hp, hr], [(T, n, C)],
                           [x3.dtype], [n, C], _column_grid(T, C))
    return out


@_post_res_fn.vjp
def _post_res_vjp(primals, cotangents, outputs):
    x3, f2, hp, hr = primals
    T, n, C = x3.shape
    g = single(cotangents).astype(x3.dtype)
    return tuple(metal._launch("mhc_dynamic_post_res_bwd", dtype_tag(x3.dtype), n, [x3, f2, hp, hr, g],
                               [(T, n, C), (T, C), (T, n), (T, n, n)], [x3.dtype, x3.dtype, F32, F32], [n, C],
                               (T * THREADS, 1, 1)))


def post_res(x3, f2, h_post, h_res, strategy: str = "fused"):
    metal._check_n(x3.shape[1], "mhc_post_res")
    if f2.dtype != x3.dtype:
        # the kernels read f in x's dtype; Liger reads f in its own dtype: keep its values exact
        from . import dynamic

        return dynamic._portable_post_res(x3, f2, h_post, h_res)
    return compiled_call(_post_res_fn, x3, f2, h_post.astype(F32), h_res.astype(F32))
