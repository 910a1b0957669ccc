"""The gradient wiring that the GPU backends (mhc_aot.cuda, mhc_aot.metal) share.

One `mx.custom_function` per op: its forward launches the backend's kernels, its VJP launches the
backend's backward kernels or, under the backend's documented rule, takes MLX's own VJP of a
pure-MLX graph. A backend supplies only its `Launchers`; `build` returns the ops.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable

import mlx.core as mx

from . import manifest, testing

F32 = mx.float32

# mhc_forward runs as one mx.compile'd graph (Sinkhorn + forward kernel) per static argument set:
# after the first call of a shape, a call replays the traced launches without re-entering Python
# per kernel (on the H100, building the two launches in Python cost ~110 us per call, more than the
# kernels of the small configs). The test suite's CPU emulations turn this off: their numpy
# stand-in kernels cannot be traced.
COMPILE_FORWARD = True


@functools.lru_cache(maxsize=None)
def _compiled(fn, poisoned: bool):
    # `poisoned` is part of the key: whether launches fill outputs with NaN first is decided when
    # the graph is traced, so a poisoned test call never replays an unpoisoned trace
    return mx.compile(lambda *args: fn(*args))


def compiled_call(fn, *args):
    """fn(*args) as one mx.compile'd graph per fn (a stable object: cache it) and shape, unless
    COMPILE_FORWARD is off: a call replays its traced launches instead of building each in Python."""
    if not COMPILE_FORWARD:
        return fn(*args)
    return _compiled(fn, testing.poison_requested())(*args)


def single(arrays):
    """The array of a one-input/one-output custom_function: MLX passes it bare, not in a tuple."""
    return arrays[0] if isinstance(arrays, (list, tuple)) else arrays


def scalars_of(v: mx.array, start: int, like) -> list[mx.array]:
    """v[start + i] in the shape of like[i] (a scalar's cotangent), as slices of v: an integer index
    is a Gather kernel each (three of them ~11 us of the dynamic layer's backward, H200), a slice is
    a view."""
    return [v[start + i:start + i + 1].reshape(a.shape) for i, a in enumerate(like)]


def dtype_tag(dtype: mx.Dtype) -> str:
    """f32 / f16 / bf16: the MHC_DTYPE of a variant (the dispatch rules' tags)."""
    return manifest.DTYPE_TAGS[str(dtype).split(".")[-1]]


@dataclass(frozen=True)
class Launchers:
    sinkhorn_fwd: Callable  # (L, iters, eps) -> M
    sinkhorn_bwd: Callable  # (L, dM, iters, eps) -> dL
    forward: dict  # strategy -> (x, M, hpre_raw, hpost_raw, w, eps) -> (out, inv_rms)
    backward: Callable  # (x, M, hpre_raw, hpost_raw, w, inv_rms, dout) -> (dx, dM, dH_pre_raw, dH_post_raw, dw)
    backward_in_mlx: Callable  # (n, C) -> bool: the backend's documented rule for MLX's own VJP
    mlx_graph: Callable  # (x, M, hpre_raw, hpost_raw, w, eps) -> out: the graph that rule differentiates
    mix_add: Callable  # (x, M, bias) -> M x + bias
    mix_add_dM: Callable  # (x, dout) -> sum over tokens and columns of dout x^T, [n, n]
    check_n: Callable = lambda n, what: None  # raises ValueError for n the kernels do not serve
    # strategy -> (x, L, hpre_raw, hpost_raw, w, iters, eps) -> (out, inv_rms, M): forward kernels
    # that run the Sinkhorn of L = H_res_raw themselves (one launch for the whole op)
    forward_from_logits: dict = field(default_factory=dict)


def build(k: Launchers) -> SimpleNamespace:
    """sinkhorn, mhc_forward, stream_mix_add (the backend API that ops.py calls) and forward_fn."""

    @functools.lru_cache(maxsize=None)
    def sinkhorn_fn(iters: int, eps: float):
        @mx.custom_function
        def f(L):
            return k.sinkhorn_fwd(L, iters, eps)

        @f.vjp
        def f_vjp(primals, cotangents, outputs):
            return (k.sinkhorn_bwd(single(primals), single(cotangents), iters, eps),)

        return f

    def sinkhorn(H_res_raw, iters, eps):
        return sinkhorn_fn(iters, eps)(H_res_raw.astype(F32))

    @functools.lru_cache(maxsize=None)
    def forward_fn(strategy: str, eps: float):
        launch = k.forward[strategy]

        @mx.custom_function
        def f(x, M, hpre_raw, hpost_raw, w):
            return tuple(launch(x, M, hpre_raw, hpost_raw, w, eps))

        @f.vjp
        def f_vjp(primals, cotangents, outputs):
            x, M, hpre_raw, hpost_raw, w = primals
            return backward_from_M(x, M, hpre_raw, hpost_raw, w, outputs[1], cotangents[0].astype(x.dtype), eps)

        return f

    def backward_from_M(x, M, hpre_raw, hpost_raw, w, inv_rms, dout, eps):
        """(dx, dM, dH_pre_raw, dH_post_raw, dw): the backend's backward kernels, or MLX's VJP of
        mlx_graph where the backend's documented rule says so."""
        if k.backward_in_mlx(x.shape[1], x.shape[2]):
            _, vjps = mx.vjp(lambda *a: k.mlx_graph(*a, eps), [x, M, hpre_raw, hpost_raw, w], [dout])
            return tuple(vjps)
        return k.backward(x, M, hpre_raw, hpost_raw, w, inv_rms, dout)

    @functools.lru_cache(maxsize=None)
    def logits_forward_fn(strategy: str, iters: int, eps: float):
        """As forward_fn, for a kernel that takes L = H_res_raw and returns M with out and inv_rms:
        its VJP chains the Sinkhorn backward onto dM."""
        launch = k.forward_from_logits[strategy]

        @mx.custom_function
        def f(x, L, hpre_raw, hpost_raw, w):
            return tuple(launch(x, L, hpre_raw, hpost_raw, w, iters, eps))

        @f.vjp
        def f_vjp(primals, cotangents, outputs):
            x, L, hpre_raw, hpost_raw, w = primals
            _, inv_rms, M = outputs
            dx, dM, dpre, dpost, dw = backward_from_M(x, M, hpre_raw, hpost_raw, w, inv_rms,
                                                      cotangents[0].astype(x.dtype), eps)
            return dx, k.sinkhorn_bwd(L, dM, iters, eps), dpre, dpost, dw

        return f

    def forward_graph(x, H_pre_raw, H_post_raw, H_res_raw, rms_weight, iters, eps, strategy):
        if strategy in k.forward_from_logits:
            out, _, _ = logits_forward_fn(strategy, iters, eps)(
                x, H_res_raw.astype(F32), H_pre_raw.astype(F32), H_post_raw.astype(F32), rms_weight.astype(F32))
            return out
        M = sinkhorn(H_res_raw, iters, eps)
        out, _ = forward_fn(strategy, eps)(x, M, H_pre_raw.astype(F32), H_post_raw.astype(F32),
                                           rms_weight.astype(F32))
        return out

    @functools.lru_cache(maxsize=None)
    def graph_for(iters: int, eps: float, strategy: str):
        return functools.partial(forward_graph, iters=iters, eps=eps, strategy=strategy)

    def mhc_forward(x, H_pre_raw, H_post_raw, H_res_raw, rms_weight, iters, eps, strategy):
        k.check_n(x.shape[1], "mhc_forward")
        return compiled_call(graph_for(iters, eps, strategy), x, H_pre_raw, H_post_raw, H_res_raw, rms_weight)

    @mx.custom_function
    def mix_add_fn(x, M, bias):
        return k.mix_add(x, M, bias)

    @mix_add_fn.vjp
    def mix_add_vjp(primals, cotangents, outputs):
        # out = M x + bias: dx = M^T dout (one more mix kernel, zero bias), dM = sum dout x^T, dbias = dout
        x, M, bias = primals
        dout = single(cotangents).astype(x.dtype)
        dx = k.mix_add(dout, M.T, mx.zeros_like(dout))
        return dx, k.mix_add_dM(x, dout), dout.astype(bias.dtype)

    def stream_mix_add(x, M, bias):
        k.check_n(x.shape[1], "stream_mix_add")
        return mix_add_fn(x, M.astype(F32), bias.astype(x.dtype))

    return SimpleNamespace(sinkhorn=sinkhorn, mhc_forward=mhc_forward, stream_mix_add=stream_mix_add,
                           forward_fn=forward_fn)
