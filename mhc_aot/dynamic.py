"""Dynamic mHC (the paper's input-dependent form), numerically interchangeable with Liger-Kernel's
`LigerMHC`: functional ops, the `DynamicMHC` layer and conversion to and from Liger state dicts.

Ops (re-exported by `mhc_aot.ops`), on x [..., n, C]; every one differentiable in every input:
  mhc_coeffs(x, phi, b, alpha_pre, alpha_post, alpha_res) -> h_pre [..., n], h_post [..., n],
                                                             h_res [..., n, n]   (float32)
  mhc_pre(x, h_pre)                                      -> x_in [..., C]        (x's dtype)
  mhc_post_res(x, f_out, h_post, h_res)                  -> x_out [..., n, C]    (x's dtype)
  mhc_coeffs_pre(...)                                    -> mhc_coeffs(...) + (x_in,), one graph
The formulas and where each comes from in Liger-Kernel are in `dynamic_reference`.

backend: "auto" (follow MLX's default device), "portable" (MLX ops arranged for speed, compiled
once per configuration), "reference" (the readable reference), "cuda" (the precompiled kernels),
"metal" (the Metal kernels, with the projection, dx and dphi as MLX matmuls: mhc_aot/metal_dynamic.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from . import dispatch
from . import dynamic_reference as ref
from .dynamic_reference import (DEFAULT_POST_MULT, DEFAULT_PRE_EPS, DEFAULT_RMS_EPS, DEFAULT_SINKHORN_EPS,
                                DEFAULT_TMAX, n_coeffs)

F32 = mx.float32
FLOAT_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
DYNAMIC_OPS = ("mhc_coeffs", "mhc_pre", "mhc_post_res")


@dataclass(frozen=True)
class Config:
    """The non-learned settings of LigerMHC (transformers/mhc.py:86-90), hashable for caching."""

    tmax: int = DEFAULT_TMAX
    rms_eps: float = DEFAULT_RMS_EPS
    pre_eps: float = DEFAULT_PRE_EPS
    sinkhorn_eps: float = DEFAULT_SINKHORN_EPS
    post_mult: float = DEFAULT_POST_MULT

    def __post_init__(self):
        if isinstance(self.tmax, bool) or not isinstance(self.tmax, int) or self.tmax < 1:
            raise ValueError(f"tmax={self.tmax!r}: expected an int >= 1 (Liger's Sinkhorn always runs its "
                             f"first softmax + column normalisation, so tmax=0 would mean tmax=1)")
        for name in ("rms_eps", "sinkhorn_eps"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected a float > 0")
        for name in ("pre_eps", "post_mult"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"{name}={v!r}: expected a float")
        for name in ("rms_eps", "pre_eps", "sinkhorn_eps", "post_mult"):
            object.__setattr__(self, name, float(getattr(self, name)))


# ---------------------------------------------------------------- validation
def _check_float(name: str, a) -> None:
    if not isinstance(a, mx.array):
        raise ValueError(f"{name} must be an mlx.core.array, got {type(a).__name__}")
    if a.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} has dtype {a.dtype}: expected float32, float16 or bfloat16")


def _check_shape(name: str, a, expected: tuple[int, ...]) -> None:
    _check_float(name, a)
    if tuple(a.shape) != tuple(expected):
        raise ValueError(f"{name} has shape {tuple(a.shape)}: expected {tuple(expected)}")


def _check_x(x) -> tuple[int, int, tuple[int, ...]]:
    _check_float("x", x)
    if x.ndim < 2 or x.shape[-2] < 1 or x.shape[-1] < 1:
        raise ValueError(f"x has shape {tuple(x.shape)}: expected [..., n, C] with n >= 1 and C >= 1")
    return x.shape[-2], x.shape[-1], tuple(x.shape[:-2])


def _scalar(name: str, a) -> mx.array:
    """A learned scalar (alpha_*): shape () like Liger's, or (1,); returned as shape ()."""
    _check_float(name, a)
    if a.size != 1 or a.ndim > 1:
        raise ValueError(f"{name} has shape {tuple(a.shape)}: expected a scalar, shape () or (1,)")
    return a.reshape(())


def _tokens(a: mx.array, lead: tuple[int, ...], tail: tuple[int, ...]) -> mx.array:
    return a.reshape(-1, *tail) if lead else a.reshape(1, *tail)


def _choose(op: str, n: int, C: int, backend: str, T: int) -> dispatch.Choice:
    """dispatch.choose, refusing a GPU backend that MLX does not have here."""
    device = dispatch.device_backend() if backend == "auto" else backend
    if device in ("cuda", "metal") and not getattr(mx, device).is_available():
        raise RuntimeError(f"backend={device!r}: MLX reports no {device} device here (mx.{device}.is_available() "
                           f"is False): run on such a machine with MLX's {device} build, or pass backend='portable'")
    return dispatch.choose(op, n, C, backend, B=T)


def _kernels(choice: dispatch.Choice):
    if choice.backend == "cuda":
        if not mx.cuda.is_available():
            raise RuntimeError("backend='cuda': MLX reports no cuda device here (mx.cuda.is_available() is False): "
                               "run on such a machine with MLX's cuda build, or pass backend='portable'")
        from . import cuda_dynamic

        return cuda_dynamic
    if choice.backend == "metal":
        if not mx.metal.is_available():
            raise RuntimeError("backend='metal': MLX reports no metal device here (mx.metal.is_available() is "
                               "False): run on such a machine with MLX's Metal build, or pass backend='portable'")
        from . import metal_dynamic

        return metal_dynamic
    raise ValueError(f"dynamic mHC has no {choice.backend} kernels (strategy {choice.strategy!r}): "
                     f"pass backend='portable'")


# ---------------------------------------------------------------- portable path
def _projection(x3, phi, rms_eps):
    """(v @ phi) * rsqrt(mean(v^2) + eps) as one matmul (the reference writes the product out)."""
    v = x3.reshape(x3.shape[0], -1).astype(F32)
    invr = mx.rsqrt(mx.mean(v * v, axis=-1) + rms_eps)
    return (v @ phi.astype(F32)) * invr[:, None], invr


def _coeffs_graph(x3, phi, b, ap, apo, ar, cfg: Config):
    """The reference's formulas with the projection as a matmul: the RMS scale on its [T, M]
    result, element-wise activations and the batched [T, n, n] Sinkhorn, which mx.compile fuses
    into a few kernels. (On CUDA MLX runs float32 matmuls in TF32 unless MLX_ENABLE_TF32=0.)"""
    return ref.mhc_coeffs(x3, phi, b, ap, apo, ar, cfg.tmax, cfg.rms_eps, cfg.pre_eps, cfg.sinkhorn_eps,
                          cfg.post_mult, projection=_projection)


def _pre_graph(x3, h_pre):
    return (h_pre.astype(F32)[:, None, :] @ x3.astype(F32))[:, 0, :].astype(x3.dtype)


def _post_res_graph(x3, f2, h_post, h_res):
    out = h_res.astype(F32) @ x3.astype(F32) + h_post.astype(F32)[:, :, None] * f2.astype(F32)[:, None, :]
    return out.astype(x3.dtype)


@functools.lru_cache(maxsize=None)
def _portable_coeffs(cfg: Config, with_pre: bool):
    def f(x3, phi, b, ap, apo, ar):
        h = _coeffs_graph(x3, phi, b, ap, apo, ar, cfg)
        return (*h, _pre_graph(x3, h[0])) if with_pre else h

    return mx.compile(f)


def _portable_coeffs_vjp(primals, cotangents, cfg: Config, with_pre: bool):
    """MLX's VJP of the portable graph, for a kernel forward whose backward takes it by a documented
    rule: a Sinkhorn history over the backward kernel's shared (CUDA) or threadgroup (Metal) memory."""
    def graph(x3, phi32, b32, ap, apo, ar):
        h = _coeffs_graph(x3, phi32, b32, ap, apo, ar, cfg)
        return (*h, _pre_graph(x3, h[0])) if with_pre else h

    cots = list(cotangents[:4] if with_pre else cotangents[:3])
    _, vjps = mx.vjp(graph, list(primals), cots)
    return tuple(vjps)


_portable_pre = mx.compile(_pre_graph)
_portable_post_res = mx.compile(_post_res_graph)


# ---------------------------------------------------------------- ops
def _coeffs(x, phi, b, alpha_pre, alpha_post, alpha_res, cfg: Config, backend: str, with_pre: bool,
            alias: bool = False):
    """The coefficients (and x_in); alias (DynamicMHC): also x, to be read by mhc_post_res, which is
    x itself on every path, and on the kernel path an output of the coefficients op (see
    cuda_dynamic.coeffs): post_res's x-gradient then joins the coefficients' dx in one kernel."""
    n, C, lead = _check_x(x)
    M = n_coeffs(n)
    _check_shape("phi", phi, (n * C, M))
    _check_shape("b", b, (M,))
    alphas = tuple(_scalar(nm, a) for nm, a in
                   (("alpha_pre", alpha_pre), ("alpha_post", alpha_post), ("alpha_res", alpha_res)))
    x3 = _tokens(x, lead, (n, C))
    T = x3.shape[0]
    if T == 0:
        outs = (mx.zeros((*lead, n), F32), mx.zeros((*lead, n), F32), mx.zeros((*lead, n, n), F32))
        outs = (*outs, mx.zeros((*lead, C), x.dtype)) if with_pre else outs
        return (*outs, x) if alias else outs
    choice = _choose("mhc_coeffs", n, C, backend, T)
    x_post = x
    if choice.strategy == "reference":
        h = ref.mhc_coeffs(x3, phi, b, *alphas, cfg.tmax, cfg.rms_eps, cfg.pre_eps, cfg.sinkhorn_eps, cfg.post_mult)
        outs = (*h, ref.mhc_pre(x3, h[0]).astype(x.dtype)) if with_pre else h
    elif choice.strategy == "portable":
        pre = _choose("mhc_pre", n, C, backend, T) if with_pre and backend != "portable" else None
        if pre is not None and pre.strategy == "fused":
            # Metal, n above the coefficient kernel's limit: MLX-op coefficients (dispatch rule), x_in by the pre kernel
            h = _portable_coeffs(cfg, False)(x3, phi, b, *alphas)
            outs = (*h, _kernels(pre).pre(x3, h[0], pre.strategy))
        else:
            outs = _portable_coeffs(cfg, with_pre)(x3, phi, b, *alphas)
    else:
        outs = _kernels(choice).coeffs(x3, phi, b, *alphas, cfg, with_pre, choice.strategy, alias=alias)
        if alias:
            *outs, x_post = outs
            x_post = x_post.reshape(x.shape)
    shapes = [(*lead, n), (*lead, n), (*lead, n, n), (*lead, C)]
    outs = tuple(o.reshape(s) for o, s in zip(outs, shapes))
    return (*outs, x_post) if alias else outs


def mhc_coeffs(x: mx.array, phi: mx.array, b: mx.array, alpha_pre: mx.array, alpha_post: mx.array,
               alpha_res: mx.array, *, tmax: int = DEFAULT_TMAX, rms_eps: float = DEFAULT_RMS_EPS,
               pre_eps: float = DEFAULT_PRE_EPS, sinkhorn_eps: float = DEFAULT_SINKHORN_EPS,
               post_mult: float = DEFAULT_POST_MULT, backend: str = "auto"):
    """Per-token mHC coefficients, as `liger_mhc_coeffs` (transformers/functional.py:338).

    x [..., n, C]; phi [n C, n n + 2 n] (any float dtype, used in float32); b [n n + 2 n];
    alpha_* scalars. Returns float32 h_pre [..., n], h_post [..., n], h_res [..., n, n].
    """
    cfg = Config(tmax, rms_eps, pre_eps, sinkhorn_eps, post_mult)
    return _coeffs(x, phi, b, alpha_pre, alpha_post, alpha_res, cfg, backend, with_pre=False)


def mhc_coeffs_pre(x: mx.array, phi: mx.array, b: mx.array, alpha_pre: mx.array, alpha_post: mx.array,
                   alpha_res: mx.array, *, tmax: int = DEFAULT_TMAX, rms_eps: float = DEFAULT_RMS_EPS,
                   pre_eps: float = DEFAULT_PRE_EPS, sinkhorn_eps: float = DEFAULT_SINKHORN_EPS,
                   post_mult: float = DEFAULT_POST_MULT, backend: str = "auto"):
    """mhc_coeffs and mhc_pre in one graph (one pair of kernels on CUDA): (h_pre, h_post, h_res, x_in)."""
    cfg = Config(tmax, rms_eps, pre_eps, sinkhorn_eps, post_mult)
    return _coeffs(x, phi, b, alpha_pre, alpha_post, alpha_res, cfg, backend, with_pre=True)


def mhc_pre(x: mx.array, h_pre: mx.array, *, backend: str = "auto") -> mx.array:
    """x_in[..., c] = sum_j h_pre[..., j] x[..., j, c] in float32, returned in x's dtype
    (LigerMHCPreFunction, ops/mhc.py:1615-1626)."""
    n, C, lead = _check_x(x)
    _check_shape("h_pre", h_pre, (*lead, n))
    x3, h2 = _tokens(x, lead, (n, C)), _tokens(h_pre, lead, (n,))
    T = x3.shape[0]
    if T == 0:
        return mx.zeros((*lead, C), x.dtype)
    choice = _choose("mhc_pre", n, C, backend, T)
    if choice.strategy == "reference":
        out = ref.mhc_pre(x3, h2).astype(x.dtype)
    elif choice.strategy == "portable":
        out = _portable_pre(x3, h2)
    else:
        out = _kernels(choice).pre(x3, h2, choice.strategy)
    return out.reshape(*lead, C)


def mhc_post_res(x: mx.array, f_out: mx.array, h_post: mx.array, h_res: mx.array, *,
                 backend: str = "auto") -> mx.array:
    """x_out[..., o, c] = sum_i h_res[..., o, i] x[..., i, c] + h_post[..., o] f_out[..., c] in float32,
    returned in x's dtype (LigerMHCPostResFunction, ops/mhc.py:1640-1656)."""
    n, C, lead = _check_x(x)
    _check_shape("f_out", f_out, (*lead, C))
    _check_shape("h_post", h_post, (*lead, n))
    _check_shape("h_res", h_res, (*lead, n, n))
    x3 = _tokens(x, lead, (n, C))
    f2, hp, hr = _tokens(f_out, lead, (C,)), _tokens(h_post, lead, (n,)), _tokens(h_res, lead, (n, n))
    T = x3.shape[0]
    if T == 0:
        return mx.zeros(x.shape, x.dtype)
    choice = _choose("mhc_post_res", n, C, backend, T)
    if choice.strategy == "reference":
        out = ref.mhc_post_res(x3, f2, hp, hr).astype(x.dtype)
    elif choice.strategy == "portable":
        out = _portable_post_res(x3, f2, hp, hr)
    else:
        out = _kernels(choice).post_res(x3, f2, hp, hr, choice.strategy)
    return out.reshape(x.shape)


# ---------------------------------------------------------------- layer
def _first_param_dtype(module: nn.Module):
    """The dtype of F's first parameter: LigerMHC casts x_in to it (transformers/mhc.py:151-156)."""
    flat = tree_flatten(module.parameters())
    return flat[0][1].dtype if flat else None


class DynamicMHC(nn.Module):
    """Dynamic mHC around any block F: [..., C] -> [..., C], as Liger-Kernel's `LigerMHC`.

    x [..., n, C] -> h_pre, h_post, h_res = mhc_coeffs(x); f = F(x_in = h_pre . x);
    x_out = h_res x + h_post * f. Parameters (names as LigerMHC's, transformers/mhc.py:122-126):
    phi [n C, n n + 2 n] = 0.02 N(0, 1) in `phi_dtype`, b [n n + 2 n] = 0, alpha_pre = alpha_post =
    alpha_res = 1 (float32 scalars). `layer` is F (its parameters are under "layer.").
    """

    def __init__(self, layer: nn.Module, n: int, C: int, *, tmax: int = DEFAULT_TMAX,
                 rms_eps: float = DEFAULT_RMS_EPS, pre_eps: float = DEFAULT_PRE_EPS,
                 sinkhorn_eps: float = DEFAULT_SINKHORN_EPS, post_mult: float = DEFAULT_POST_MULT,
                 phi_dtype: mx.Dtype = mx.float32, backend: str = "auto", key: mx.array | None = None):
        super().__init__()
        for name, v in (("n", n), ("C", C)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r}: expected an int >= 1")
        if backend not in dispatch.BACKENDS:
            raise ValueError(f"backend={backend!r}: expected one of {', '.join(dispatch.BACKENDS)}")
        if phi_dtype not in FLOAT_DTYPES:
            raise ValueError(f"phi_dtype={phi_dtype}: expected float32, float16 or bfloat16")
        self.layer = layer
        self.n, self.C, self.backend = n, C, backend
        self.config = Config(tmax, rms_eps, pre_eps, sinkhorn_eps, post_mult)
        M = n_coeffs(n)
        self.phi = (0.02 * mx.random.normal((n * C, M), key=key)).astype(phi_dtype)
        self.b = mx.zeros((M,), F32)
        self.alpha_pre = mx.array(1.0, F32)
        self.alpha_post = mx.array(1.0, F32)
        self.alpha_res = mx.array(1.0, F32)

    def _kw(self) -> dict:
        c = self.config
        return dict(tmax=c.tmax, rms_eps=c.rms_eps, pre_eps=c.pre_eps, sinkhorn_eps=c.sinkhorn_eps,
                    post_mult=c.post_mult, backend=self.backend)

    def _check_input(self, x) -> None:
        _check_float("x", x)
        if x.ndim < 2 or x.shape[-2] != self.n or x.shape[-1] != self.C:
            raise ValueError(f"DynamicMHC(n={self.n}, C={self.C}) got x of shape {tuple(x.shape)}: "
                             f"expected [..., {self.n}, {self.C}]")

    def coefficients(self, x: mx.array):
        """(h_pre, h_post, h_res) of x, float32."""
        self._check_input(x)
        return mhc_coeffs(x, self.phi, self.b, self.alpha_pre, self.alpha_post, self.alpha_res, **self._kw())

    def __call__(self, x: mx.array) -> mx.array:
        self._check_input(x)
        c = self.config
        _, h_post, h_res, x_in, x_post = _coeffs(x, self.phi, self.b, self.alpha_pre, self.alpha_post,
                                                 self.alpha_res, c, self.backend, with_pre=True, alias=True)
        layer_dtype = _first_param_dtype(self.layer)
        if layer_dtype is not None and x_in.dtype != layer_dtype:
            x_in = x_in.astype(layer_dtype)
        f_out = self.layer(x_in)
        if tuple(f_out.shape) != tuple(x_in.shape):
            raise ValueError(f"DynamicMHC: layer returned shape {tuple(f_out.shape)}: expected x_in's shape "
                             f"{tuple(x_in.shape)} ([..., C] -> [..., C])")
        return mhc_post_res(x_post, f_out, h_post, h_res, backend=self.backend)

    def _extra_repr(self) -> str:
        return f"n={self.n}, C={self.C}, tmax={self.config.tmax}, backend={self.backend!r}"


# ---------------------------------------------------------------- Liger state dicts
MHC_KEYS = ("phi", "b", "alpha_pre", "alpha_post", "alpha_res")


def to_liger_state_dict(module: DynamicMHC, include_layer: bool = True) -> dict:
    """The parameters as numpy arrays under LigerMHC's state-dict keys ("phi", "b", "alpha_pre",
    "alpha_post", "alpha_res"; F's under "layer.<name>"), ready for
    `liger.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})`.

    numpy has no bfloat16: bfloat16 parameters come out as float32 (exactly), and loading casts
    them back to the module's dtype. Alphas are 0-d arrays, as Liger's scalar parameters.
    """
    import numpy as np

    def np_of(a: mx.array):
        return np.array(a.astype(F32) if a.dtype == mx.bfloat16 else a)

    sd = {k: np_of(getattr(module, k)) for k in MHC_KEYS}
    for k in ("alpha_pre", "alpha_post", "alpha_res"):
        sd[k] = sd[k].reshape(())
    if include_layer:
        sd.update({f"layer.{k}": np_of(v) for k, v in tree_flatten(module.layer.parameters())})
    return sd


def load_liger_state_dict(module: DynamicMHC, state_dict: dict, strict: bool = True) -> DynamicMHC:
    """Load a LigerMHC state dict (numpy arrays, or anything with `.numpy()` or `__array__`, e.g.
    `{k: v.float().cpu() for k, v in liger.state_dict().items()}`) into `module`, keeping each
    parameter's current dtype. strict=True: every key of `module` must be present and no other."""
    import numpy as np

    def np_of(v):
        if hasattr(v, "detach"):  # a torch tensor: numpy has no bfloat16, go through float32
            v = v.detach().float().cpu().numpy()
        return np.asarray(v)

    mine = {k: getattr(module, k) for k in MHC_KEYS}
    mine.update({f"layer.{k}": v for k, v in tree_flatten(module.layer.parameters())})
    if strict:
        missing, extra = sorted(set(mine) - set(state_dict)), sorted(set(state_dict) - set(mine))
        if missing or extra:
            raise ValueError(f"load_liger_state_dict: missing keys {missing}, unexpected keys {extra} "
                             f"(pass strict=False to load the common keys only)")
    updates = []
    for k, cur in mine.items():
        if k not in state_dict:
            continue
        v = np_of(state_dict[k])
        if v.size != cur.size or (tuple(v.shape) != tuple(cur.shape) and cur.ndim > 0):
            raise ValueError(f"load_liger_state_dict: {k} has shape {tuple(v.shape)}: expected {tuple(cur.shape)}")
        updates.append((k, mx.array(v.astype(np.float32) if v.dtype.kind == "f" else v).reshape(cur.shape)
                        .astype(cur.dtype)))
    module.update(tree_unflatten(updates))
    return module
