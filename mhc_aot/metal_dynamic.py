"""Metal launchers of dynamic mHC's token passes (metal_src/mhc_dynamic_pre*.metal,
metal_src/mhc_dynamic_post_res*.metal) through `mhc_aot.metal`'s launch helper (the preloaded
metallib, the scalars buffer, NaN-poisoned outputs under `testing.poisoned_outputs()`). Gradients:
`mx.custom_function` VJPs that launch the backward kernels, as mhc_aot/cuda_dynamic.py does.

  mhc_pre       pre (x_in = h_pre . x, one pass) / pre_bwd (dx and the dots dx_in . x, per token)
  mhc_post_res  post_res (x and f read once) / post_res_bwd (per token)

The coefficients (mhc_coeffs) have no Metal kernels yet: on Metal they run as MLX ops by a dispatch
rule (mhc_aot/dispatch.py), their projection as MLX's matmul; DynamicMHC then takes x_in from the
pre kernel here (dynamic._coeffs).

NOT RUN ON APPLE HARDWARE: as mhc_aot/metal.py says, checked on Linux by the syntax-and-type check
and by running the kernels and these launchers under the CPU emulation of tests/test_metal_sources.py.
"""

from __future__ import annotations

import mlx.core as mx

from . import metal
from .kernel_ops import compiled_call, dtype_tag, single

F32 = mx.float32
THREADS = metal.THREADS
VEC = 4  # metal_src/mhc_common.h: columns a thread takes in the token passes


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _column_grid(T: int, C: int) -> tuple[int, int, int]:
    """Grid (threads) of the one-pass kernels: VEC columns a thread, threadgroup y = the token."""
    return (_cdiv(_cdiv(C, VEC), THREADS) * THREADS, T, 1)


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
