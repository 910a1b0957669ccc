"""Functional API of static mHC: validates, asks `dispatch`, builds the MLX graph.

Ops (one name each across kernels, tests and benchmarks):
  sinkhorn(H_res_raw)                     -> M [n, n]   (exp(H_res_raw - rowmax), Sinkhorn-Knopp)
  mhc_forward(x, H_pre_raw, H_post_raw, H_res_raw, rms_weight) -> out, x's shape and dtype
  stream_mix_add(x, M, bias)              -> M x + bias, x's shape and dtype

Every op takes backend="auto" (follow MLX's default device), "portable" (MLX ops, any device),
"reference" (the readable reference), "cuda" or "metal" (the precompiled kernels).
The portable path is the fastest pure-MLX formulation found: mixing and aggregation as matmuls
(element-wise over the streams with a written-out VJP for n <= ELEMENTWISE_MAX_N) and
`mx.fast.rms_norm`, all in float32 like the reference, compiled once per static argument set.
"""

from __future__ import annotations

import functools

import mlx.core as mx

from . import dispatch, reference
from .kernel_ops import single
from .reference import DEFAULT_EPS, DEFAULT_ITERS

FLOAT_DTYPES = (mx.float32, mx.float16, mx.bfloat16)


# ---------------------------------------------------------------- validation
def _check_array(name: str, a) -> None:
    if not isinstance(a, mx.array):
        raise ValueError(f"{name} must be an mlx.core.array, got {type(a).__name__}")


def check_float(name: str, a: mx.array) -> None:
    _check_array(name, a)
    if a.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} has dtype {a.dtype}: expected float32, float16 or bfloat16")


def check_shape(name: str, a: mx.array, expected: tuple[int, ...]) -> None:
    check_float(name, a)
    if tuple(a.shape) != tuple(expected):
        raise ValueError(f"{name} has shape {tuple(a.shape)}: expected {tuple(expected)}")


def check_streams(name: str, x: mx.array) -> tuple[int, int]:
    """x must be [..., n, C] with n >= 1 and C >= 1; returns (n, C)."""
    check_float(name, x)
    if x.ndim < 2:
        raise ValueError(f"{name} has shape {tuple(x.shape)}: expected [..., n, C] (at least 2 dims)")
    n, C = x.shape[-2], x.shape[-1]
    if n < 1 or C < 1:
        raise ValueError(f"{name} has shape {tuple(x.shape)}: expected n >= 1 and C >= 1")
    return n, C


def check_iters_eps(iters: int, eps: float) -> None:
    if not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters={iters!r}: expected an int >= 0")
    if not eps > 0:
        raise ValueError(f"eps={eps!r}: expected a float > 0")


def _kernels(backend: str):
    """The kernel module of a GPU backend (imported lazily: it reads the shipped manifest)."""
    if backend in ("cuda", "metal") and not getattr(mx, backend).is_available():
        raise RuntimeError(f"backend={backend!r}: MLX reports no {backend} device here (mx.{backend}.is_available() "
                           f"is False): run on such a machine with MLX's {backend} build, or pass backend='portable'")
    if backend == "cuda":
        from . import cuda

        return cuda
    if backend == "metal":
        from . import metal

        return metal
    raise ValueError(f"no kernels for backend {backend!r}")


# ---------------------------------------------------------------- portable path
@functools.lru_cache(maxsize=None)
def _portable_sinkhorn(iters: int, eps: float):
    return mx.compile(functools.partial(reference.mixing_matrix, iters=iters, eps=eps))


def _forward_graph_from_M(x, M, H_pre_raw, H_post_raw, rms_weight, eps):
    """out = M x + H_post y with y = RMSNorm(H_pre x): two matmuls and one fused norm."""
    H_pre, H_post = reference.activate_pre_post(H_pre_raw, H_post_raw)
    xf = x.astype(mx.float32)
    agg = H_pre[None, :] @ xf  # [B, 1, C]
    y = mx.fast.rms_norm(agg, rms_weight.astype(mx.float32), eps)
    out = M @ xf + H_post[:, None] * y
    return out.astype(x.dtype)


# For n <= ELEMENTWISE_MAX_N the forward is written as n^2 + n scaled adds of [B, C] slices, which
# mx.compile fuses into one pass (this project's 2-core CPU, (32, 4, 4096) bf16: 4.0 ms vs 6.6 ms
# with the two matmuls). Its VJP is written out (DESIGN.md section 1's chain rule) rather than
# left to autodiff: autodiff of the element-wise form reduces dM over B * C products outside a
# matmul, which missed the float32 tolerance (1.1e-5 vs 1e-5 at C = 8192); here dM and dH_pre
# are batched matmuls as in the matmul graph, and dx is element-wise again.
ELEMENTWISE_MAX_N = 8


def _streams(a):
    return [a[:, j, :] for j in range(a.shape[1])]


def _combine(coeffs, rows):
    """sum_j coeffs[j] * rows[j] (coeffs scalars of an array, rows [B, C] arrays)."""
    return functools.reduce(mx.add, (coeffs[j] * r for j, r in enumerate(rows)))


def _normed_aggregate(x, H_pre_raw, H_post_raw, rms_weight, eps):
    """What the element-wise forward and its VJP both need: H_pre, H_post, the float32 streams,
    agg = H_pre . x, the float32 weight and y = RMSNorm(agg) * weight."""
    H_pre, H_post = reference.activate_pre_post(H_pre_raw, H_post_raw)
    xs = _streams(x.astype(mx.float32))
    agg = _combine(H_pre, xs)
    wf = rms_weight.astype(mx.float32)
    return H_pre, H_post, xs, agg, wf, mx.fast.rms_norm(agg, wf, eps)


def _forward_elementwise_from_M(x, M, H_pre_raw, H_post_raw, rms_weight, eps):
    """_forward_graph_from_M's value, as element-wise ops over the n streams."""
    _, H_post, xs, _, _, y = _normed_aggregate(x, H_pre_raw, H_post_raw, rms_weight, eps)
    out = mx.stack([_combine(M[i], xs) + H_post[i] * y for i in range(len(xs))], axis=1)
    return out.astype(x.dtype)


@functools.lru_cache(maxsize=None)
def _elementwise_forward_fn(eps: float):
    @mx.custom_function
    def f(x, M, H_pre_raw, H_post_raw, rms_weight):
        return _forward_elementwise_from_M(x, M, H_pre_raw, H_post_raw, rms_weight, eps)

    @f.vjp
    def f_vjp(primals, cotangents, outputs):
        x, M, H_pre_raw, H_post_raw, w = primals
        G = single(cotangents).astype(mx.float32)
        H_pre, H_post, xs, agg, wf, y = _normed_aggregate(x, H_pre_raw, H_post_raw, w, eps)
        Gs = _streams(G)
        _, (dagg, dw) = mx.vjp(lambda a, b: mx.fast.rms_norm(a, b, eps), [agg, wf], [_combine(H_post, Gs)])
        dx = mx.stack([_combine(M[:, j], Gs) + H_pre[j] * dagg for j in range(len(xs))], axis=1)
        xT = x.astype(mx.float32).transpose(0, 2, 1)  # [B, C, n]
        dM = mx.sum(G @ xT, axis=0)  # sum over tokens of dout x^T, as the matmul graph's VJP
        dH_pre = mx.sum(dagg[:, None, :] @ xT, axis=0)[0]
        dH_post = mx.sum(G * y[:, None, :], axis=(0, 2))
        _, (dpre_raw, dpost_raw) = mx.vjp(reference.activate_pre_post, [H_pre_raw, H_post_raw], [dH_pre, dH_post])
        return (dx.astype(x.dtype), dM.astype(M.dtype), dpre_raw.astype(H_pre_raw.dtype),
                dpost_raw.astype(H_post_raw.dtype), dw.astype(w.dtype))

    return f


def _forward_graph(x, H_pre_raw, H_post_raw, H_res_raw, rms_weight, iters, eps):
    M = reference.mixing_matrix(H_res_raw, iters, eps)
    if x.shape[1] <= ELEMENTWISE_MAX_N:
        return _elementwise_forward_fn(eps)(x, M, H_pre_raw, H_post_raw, rms_weight)
    return _forward_graph_from_M(x, M, H_pre_raw, H_post_raw, rms_weight, eps)


@functools.lru_cache(maxsize=None)
def _portable_forward(iters: int, eps: float):
    return mx.compile(functools.partial(_forward_graph, iters=iters, eps=eps))


def _mix_add_graph(x, M, bias):
    return (M.astype(mx.float32) @ x.astype(mx.float32) + bias.astype(mx.float32)).astype(x.dtype)


_portable_mix_add = mx.compile(_mix_add_graph)


# ---------------------------------------------------------------- ops
def sinkhorn(H_res_raw: mx.array, iters: int = DEFAULT_ITERS, eps: float = DEFAULT_EPS, *,
             backend: str = "auto") -> mx.array:
    """M = Sinkhorn-Knopp(exp(H_res_raw - rowmax)), float32 [n, n] (DESIGN.md section 1)."""
    check_float("H_res_raw", H_res_raw)
    if H_res_raw.ndim != 2 or H_res_raw.shape[0] != H_res_raw.shape[1] or H_res_raw.shape[0] < 1:
        raise ValueError(f"H_res_raw has shape {tuple(H_res_raw.shape)}: expected a square [n, n], n >= 1")
    check_iters_eps(iters, eps)
    choice = dispatch.choose("sinkhorn", H_res_raw.shape[0], 1, backend)
    if choice.strategy == "reference":
        return reference.mixing_matrix(H_res_raw, iters, eps)
    if choice.strategy == "portable":
        return _portable_sinkhorn(iters, float(eps))(H_res_raw)
    return _kernels(choice.backend).sinkhorn(H_res_raw, iters, float(eps))


def mhc_forward(x: mx.array, H_pre_raw: mx.array, H_post_raw: mx.array, H_res_raw: mx.array,
                rms_weight: mx.array, iters: int = DEFAULT_ITERS, eps: float = DEFAULT_EPS, *,
                backend: str = "auto") -> mx.array:
    """Static mHC forward on x [..., n, C]: out = M x + H_post * RMSNorm(H_pre . x) * rms_weight.

    Returns x's shape and dtype; accumulates in float32. Differentiable in x and every parameter.
    """
    n, C = check_streams("x", x)
    check_shape("H_pre_raw", H_pre_raw, (n,))
    check_shape("H_post_raw", H_post_raw, (n,))
    check_shape("H_res_raw", H_res_raw, (n, n))
    check_shape("rms_weight", rms_weight, (C,))
    check_iters_eps(iters, eps)
    lead = x.shape[:-2]
    x3 = x.reshape(-1, n, C)
    if x3.shape[0] == 0:
        return mx.zeros(x.shape, x.dtype)
    choice = dispatch.choose("mhc_forward", n, C, backend, B=x3.shape[0], dtype=x.dtype)
    if choice.strategy == "reference":
        out = reference.mhc_forward(x3, H_pre_raw, H_post_raw, H_res_raw, rms_weight, iters, eps).astype(x.dtype)
    elif choice.strategy == "portable":
        out = _portable_forward(iters, float(eps))(x3, H_pre_raw, H_post_raw, H_res_raw, rms_weight)
    else:
        out = _kernels(choice.backend).mhc_forward(
            x3, H_pre_raw, H_post_raw, H_res_raw, rms_weight, iters, float(eps), choice.strategy)
    return out.reshape(*lead, n, C)


def stream_mix_add(x: mx.array, M: mx.array, bias: mx.array, *, backend: str = "auto") -> mx.array:
    """out[..., i, c] = sum_j M[i, j] x[..., j, c] + bias[..., i, c]; x's dtype, float32 accumulation."""
    n, C = check_streams("x", x)
    check_shape("M", M, (n, n))
    check_shape("bias", bias, tuple(x.shape))
    lead = x.shape[:-2]
    x3, b3 = x.reshape(-1, n, C), bias.reshape(-1, n, C)
    if x3.shape[0] == 0:
        return mx.zeros(x.shape, x.dtype)
    choice = dispatch.choose("stream_mix_add", n, C, backend, B=x3.shape[0])
    if choice.strategy == "reference":
        out = reference.stream_mix_add(x3, M, b3).astype(x.dtype)
    elif choice.strategy == "portable":
        out = _portable_mix_add(x3, M, b3)
    else:
        out = _kernels(choice.backend).stream_mix_add(x3, M, b3)
    return out.reshape(*lead, n, C)
from .dynamic import mhc_coeffs, mhc_coeffs_pre, mhc_post_res, mhc_pre  # noqa: E402,F401  (dynamic mHC)
