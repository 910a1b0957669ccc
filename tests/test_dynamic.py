"""Dynamic mHC (mhc_aot.dynamic: mhc_coeffs, mhc_pre, mhc_post_res, DynamicMHC) on every backend.

Reference: Liger-Kernel's LigerMHC written in float64 numpy, forward AND backward, ported line by
line from its autograd functions (src/liger_kernel/ops/mhc.py: LigerMHCCoeffsFunction,
_mhc_sinkhorn_bwd_kernel, mhc_mm_norm_bwd, _mhc_pre_bwd_kernel, _mhc_post_res_bwd_kernel), so
matching it is the interchangeability test (torch is not installed here). The port itself is
checked against float64 central finite differences.

Shape table (leading dims, n, C): n in 1, 2, 4, 8, 16; C = 1, odd, even and 8192; T = 1 to 16384
(SHAPES, GRAD_SHAPES); the cuda backend adds GPU_EXTRA_SHAPES / GPU_EXTRA_GRAD_SHAPES (GPU only,
up to T = 8192, C = 32768). Without a GPU the CUDA kernels still run, emulated on the CPU
(EMU_CASES, last section): every kernel, both load paths, compile-time and generic n.

Tolerance table, relative error ||out - ref|| / ||ref|| against float64:
  coefficients (float32 outputs, computed from x's exact values): TOL[float32] for every x dtype
  x_in, x_out (x's dtype): TOL[dtype] (DESIGN.md section 5); bfloat16 also <= 2 x the error of the
    reference run on the same bfloat16 inputs
  gradients: GRAD_TOL[dtype of the gradient]: float32 5e-5 (a float32 Sinkhorn backward through 20
    iterations and float32 sums over up to 16384 tokens: measured up to 3.1e-5, db at T = 16384),
    float16 2e-3, bfloat16 1e-2
  backend="portable" on a CUDA machine: at least TF32_TOL (MLX's float32 matmuls are TF32 there)
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from backends import (NEEDS_CUDA, assert_bf16_factor, assert_kernels_exact_with_tf32, gpu_param, leading, rel_error64,
                      seed_of, to64)
from cuda_emulation import ROOT, Emulator, tensor_map
from mhc_aot import DynamicMHC, dispatch, dynamic, ops, testing
from mhc_aot import dynamic_reference as ref

BACKENDS = [pytest.param("portable", id="portable"), pytest.param("reference", id="reference"), gpu_param("cuda")]
DTYPE_NAMES = tuple(testing.DTYPES)

# ---------------------------------------------------------------- shape table
SHAPES = [
    (1, 1, 1), (3, 1, 7), (5, 2, 33), ((2, 3), 4, 64), (1, 4, 4097), (2, 4, 8192), (7, 8, 129),
    (2, 16, 31), (16384, 2, 8), (300, 4, 17),
]
GRAD_SHAPES = [(1, 1, 1), (3, 2, 9), ((2, 2), 4, 33), (1, 4, 4096), (4, 8, 15), (2, 16, 7), (16384, 1, 4)]
GPU_EXTRA_SHAPES = [(8192, 4, 4096), (1, 4, 32768), (64, 16, 1025), (8192, 1, 1), (2048, 8, 2048)]
GPU_EXTRA_GRAD_SHAPES = [(2048, 4, 1024), (1, 4, 32768), (64, 16, 1025), (300, 8, 130)]

# ---------------------------------------------------------------- tolerance table
TOL = testing.TOLERANCES
GRAD_TOL = {mx.float32: 5e-5, mx.float16: 2e-3, mx.bfloat16: 1e-2}
# backend="portable" on a CUDA machine: MLX runs float32 matmuls in TF32 there by default
# (MLX_ENABLE_TF32=0 turns that off), so its float32 results are held to TF32_TOL instead.
TF32_TOL = 2e-3


def _tol(table, dtype, backend, mlx_matmul: bool = False):
    """mlx_matmul: the checked values also pass through an MLX matmul outside our kernels (the
    layer test's F = nn.Linear), so they carry TF32's error on a CUDA machine whatever the backend."""
    if (backend == "portable" or mlx_matmul) and mx.cuda.is_available() and mx.default_device().type == mx.gpu:
        return max(table[dtype], TF32_TOL)
    return table[dtype]
BF16_FACTOR = testing.BF16_REFERENCE_FACTOR
CFG = dict(tmax=20, rms_eps=1e-6, pre_eps=0.0, sinkhorn_eps=1e-6, post_mult=2.0)  # LigerMHC's defaults
# another configuration, each eps large enough that leaving it out (or misplacing it) is far outside the
# tolerances, which Liger's 1e-6 ones are not
CFG_OTHER = dict(tmax=7, rms_eps=0.05, pre_eps=1e-3, sinkhorn_eps=0.05, post_mult=3.0)


# ---------------------------------------------------------------- reference: LigerMHC in float64 numpy
def _sig(v):
    return 1.0 / (1.0 + np.exp(-v))


def liger_sinkhorn64(logits, tmax, eps):
    """_mhc_split_sinkhorn_fwd_kernel (ops/mhc.py:471-490) on [T, n, n]."""
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    mat = e / e.sum(axis=-1, keepdims=True) + eps
    mat = mat / (mat.sum(axis=-2, keepdims=True) + eps)
    for _ in range(tmax - 1):
        mat = mat / (mat.sum(axis=-1, keepdims=True) + eps)
        mat = mat / (mat.sum(axis=-2, keepdims=True) + eps)
    return mat


def liger_sinkhorn_bwd64(logits, g, tmax, eps):
    """_mhc_sinkhorn_bwd_kernel (ops/mhc.py:536-584), the recompute variant, batched over tokens."""
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    row_sum0 = e.sum(axis=-1)
    p = e / row_sum0[..., :, None]
    p_eps = p + eps
    col_sum0 = p_eps.sum(axis=-2)
    mat0 = p_eps / (col_sum0[..., None, :] + eps)
    for t in range(tmax - 1, 0, -1):
        mat, rs_t, cs_t, mat_t = mat0, row_sum0, col_sum0, mat0
        for s in range(1, tmax):
            rs = mat.sum(axis=-1)
            mat = mat / (rs[..., :, None] + eps)
            cs = mat.sum(axis=-2)
            mat = mat / (cs[..., None, :] + eps)
            if s == t:
                mat_t, rs_t, cs_t = mat, rs, cs
        denom_col = cs_t + eps
        dot_col = (g * mat_t).sum(axis=-2)
        g_row = (g - dot_col[..., None, :]) / denom_col[..., None, :]
        m_row = mat_t * denom_col[..., None, :]
        dot_row = (g_row * m_row).sum(axis=-1)
        g = (g_row - dot_row[..., :, None]) / (rs_t + eps)[..., :, None]
    dot_col0 = (g * mat0).sum(axis=-2)
    g_p = (g - dot_col0[..., None, :]) / (col_sum0 + eps)[..., None, :]
    dot_soft = (g_p * p).sum(axis=-1)
    return p * (g_p - dot_soft[..., :, None])


def liger_coeffs64(x, phi, b, ap, apo, ar, tmax=20, rms_eps=1e-6, pre_eps=0.0, sinkhorn_eps=1e-6, post_mult=2.0):
    """LigerMHCCoeffsFunction.forward on x [T, n, C]: (h_pre, h_post, h_res, saved for backward)."""
    T, n, C = x.shape
    x_mat = x.reshape(T, n * C)
    invr = 1.0 / np.sqrt((x_mat ** 2).mean(axis=-1) + rms_eps)  # ops/mhc.py:110
    mix = (x_mat @ phi) * invr[:, None]  # ops/mhc.py:111
    pre_l = mix[:, :n] * ap + b[:n]
    post_l = mix[:, n:2 * n] * apo + b[n:2 * n]
    res_l = mix[:, 2 * n:].reshape(T, n, n) * ar + b[2 * n:].reshape(n, n)
    saved = (x_mat, mix, invr, pre_l, post_l, res_l)
    return _sig(pre_l) + pre_eps, _sig(post_l) * post_mult, liger_sinkhorn64(res_l, tmax, sinkhorn_eps), saved


def liger_coeffs_bwd64(saved, phi, ap, apo, ar, gh_pre, gh_post, gh_res, n, tmax=20, sinkhorn_eps=1e-6,
                       post_mult=2.0, alpha_scales=None, **_):
    """LigerMHCCoeffsFunction.backward (ops/mhc.py:1520-1593) + mhc_mm_norm_bwd (ops/mhc.py:186-308):
    (dx [T, n C], dphi, db, dalpha_pre, dalpha_post, dalpha_res). alpha_scales (a dict), if given,
    receives each dalpha's sum of absolute terms: the scale its rounding error is relative to."""
    x_mat, mix, invr, pre_l, post_l, res_l = saved
    T, K = x_mat.shape
    grl = liger_sinkhorn_bwd64(res_l, gh_res, tmax, sinkhorn_eps).reshape(T, n * n)
    s = _sig(pre_l)
    gpl = gh_pre * s * (1 - s)
    s = _sig(post_l)
    gpol = gh_post * (post_mult * s * (1 - s))
    grad_mix = np.concatenate([gpl * ap, gpol * apo, grl * ar], axis=1)
    db = np.concatenate([gpl.sum(0), gpol.sum(0), grl.sum(0)])
    da = ((gpl * mix[:, :n]).sum(), (gpol * mix[:, n:2 * n]).sum(), (grl * mix[:, 2 * n:]).sum())
    if alpha_scales is not None:
        for k, t in zip(("alpha_pre", "alpha_post", "alpha_res"), (gpl * mix[:, :n], gpol * mix[:, n:2 * n],
                                                                   grl * mix[:, 2 * n:])):
            alpha_scales[k] = float(np.abs(t).sum())
    grad_z = grad_mix * invr[:, None]
    g = (grad_mix * mix).sum(axis=1) / invr
    factor = (-g * invr ** 3) / K
    dx = grad_z @ phi.T + x_mat * factor[:, None]
    return dx, x_mat.T @ grad_z, db, *da


def liger_pre64(x, h_pre):
    return np.einsum("tj,tjc->tc", h_pre, x)


def liger_pre_bwd64(x, h_pre, go):
    """_mhc_pre_bwd_kernel: dx = go h_pre, dh_pre = sum_c go x."""
    return go[:, None, :] * h_pre[:, :, None], np.einsum("tc,tjc->tj", go, x)


def liger_post_res64(x, f, h_post, h_res):
    return np.einsum("toi,tic->toc", h_res, x) + h_post[:, :, None] * f[:, None, :]


def liger_post_res_bwd64(x, f, h_post, h_res, go):
    """_mhc_post_res_bwd_kernel: (dx, df, dh_post, dh_res)."""
    return (np.einsum("toi,toc->tic", h_res, go), np.einsum("toc,to->tc", go, h_post),
            np.einsum("toc,tc->to", go, f), np.einsum("toc,tic->toi", go, x))


# ---------------------------------------------------------------- inputs
def _params(n, C, seed, phi_scale=None, phi_dtype=mx.float32):
    """Non-trivial parameters (not Liger's init: b != 0, alphas != 1) with O(1) logits."""
    k = mx.random.split(mx.random.key(seed), 5)
    M = n * n + 2 * n
    phi = (mx.random.normal((n * C, M), key=k[0]) * (phi_scale or 1.5 / np.sqrt(n * C))).astype(phi_dtype)
    b = 0.5 * mx.random.normal((M,), key=k[1])
    a = 0.5 + mx.random.uniform(shape=(3,), key=k[2])
    return phi, b, a[0], a[1], a[2]


def _x(shape, dtype_name, seed):
    return testing.random_input(shape, testing.DTYPES[dtype_name], seed)


def _np_params(phi, b, ap, apo, ar):
    return to64(phi), to64(b), float(ap.item()), float(apo.item()), float(ar.item())


def _flat64(x):
    n, C = x.shape[-2:]
    return to64(x).reshape(-1, n, C)


def _err_ok(out, ref64, tol, what):
    err = rel_error64(out, ref64)
    assert err < tol, f"{what}: relative error {err:.3e} >= {tol:.0e}"
    return err


def _run(fn, *args, **kw):
    with testing.poisoned_outputs():
        out = fn(*args, **kw)
        mx.eval(out)
    return out


# ---------------------------------------------------------------- the float64 port is exact
def test_liger_port_gradients_match_finite_differences():
    rng = np.random.default_rng(0)
    T, n, C = 2, 3, 4
    M = n * n + 2 * n
    x, f = rng.normal(size=(T, n, C)), rng.normal(size=(T, C))
    phi, b = rng.normal(size=(n * C, M)) * 0.4, rng.normal(size=M) * 0.5
    al = (0.7, 1.3, 0.9)
    cfg = dict(tmax=5, rms_eps=1e-6, pre_eps=0.1, sinkhorn_eps=1e-3, post_mult=2.0)
    G = [rng.normal(size=s) for s in ((T, n), (T, n), (T, n, n))]

    def loss(x, phi, b, ap, apo, ar):
        h = liger_coeffs64(x, phi, b, ap, apo, ar, **cfg)
        return sum((hh * g).sum() for hh, g in zip(h[:3], G))

    _, _, _, saved = liger_coeffs64(x, phi, b, *al, **cfg)
    analytic = liger_coeffs_bwd64(saved, phi, *al, *G, n, **cfg)
    args = [x, phi, b, *al]
    for i, g in enumerate(analytic):
        base = np.array(args[i], dtype=np.float64)
        fd = np.zeros(base.shape)
        for idx in np.ndindex(base.shape):
            for sgn in (1, -1):
                a = base.copy()
                a[idx] += sgn * 1e-6
                fd[idx] += sgn * loss(*[a if j == i else args[j] for j in range(6)]) / 2e-6
        np.testing.assert_allclose(np.reshape(g, fd.shape), fd, rtol=1e-6, atol=1e-8)
    # pre and post_res backward by the same check
    h_pre, h_post, h_res = rng.uniform(size=(T, n)), rng.uniform(size=(T, n)), rng.uniform(size=(T, n, n))
    go_pre, go_post = rng.normal(size=(T, C)), rng.normal(size=(T, n, C))
    dx, dh = liger_pre_bwd64(x, h_pre, go_pre)  # the loss is linear in each argument: g . a == loss
    assert np.isclose((dx * x).sum(), (liger_pre64(x, h_pre) * go_pre).sum())
    assert np.isclose((dh * h_pre).sum(), (liger_pre64(x, h_pre) * go_pre).sum())
    lin = lambda x, f, hp, hr: (liger_post_res64(x, f, hp, hr) * go_post).sum()  # noqa: E731
    grads = liger_post_res_bwd64(x, f, h_post, h_res, go_post)
    dots = [(g * a).sum() for g, a in zip(grads, [x, f, h_post, h_res])]  # bilinear terms (Euler)
    assert np.isclose(dots[0], dots[3]) and np.isclose(dots[1], dots[2])
    assert np.isclose(dots[0] + dots[1], lin(x, f, h_post, h_res))


# ---------------------------------------------------------------- forward
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("B,n,C", SHAPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_vs_liger64(backend, B, n, C, dtype_name):
    _check_forward(backend, B, n, C, dtype_name)


def _check_forward(backend, B, n, C, dtype_name, cfg=CFG, phi_dtype=mx.float32):
    seed = seed_of("fwd", backend, B, n, C, dtype_name)
    x = _x((*leading(B), n, C), dtype_name, seed)
    params = _params(n, C, seed, phi_dtype=phi_dtype)
    lead = tuple(x.shape[:-2])
    h_pre, h_post, h_res, x_in = _run(ops.mhc_coeffs_pre, x, *params, **cfg, backend=backend)
    assert h_pre.shape == (*lead, n) and h_res.shape == (*lead, n, n) and x_in.shape == (*lead, C)
    assert h_pre.dtype == h_post.dtype == h_res.dtype == mx.float32 and x_in.dtype == x.dtype
    x64 = _flat64(x)
    e_pre, e_post, e_res, _ = liger_coeffs64(x64, *_np_params(*params), **cfg)
    what = f"[{backend}] B={B} n={n} C={C} {dtype_name}"
    t32, tx = _tol(TOL, mx.float32, backend), _tol(TOL, x.dtype, backend)
    _err_ok(h_pre.reshape(-1, n), e_pre, t32, "h_pre " + what)
    _err_ok(h_post.reshape(-1, n), e_post, t32, "h_post " + what)
    _err_ok(h_res.reshape(-1, n, n), e_res, t32, "h_res " + what)
    # the separate ops give the same coefficients (to float32 rounding: where mhc_dynamic_coeffs_pre is
    # switched on, the op with x_in sums the projection in another order; 1.0e-6 measured at T = 8192)
    h2 = _run(ops.mhc_coeffs, x, *params, **cfg, backend=backend)
    for a, b in zip(h2, (h_pre, h_post, h_res)):
        assert rel_error64(a, to64(b)) < 4e-6
    # pre and post_res on the exact (float64) coefficients, so each op is tested on its own
    hp64, hpo64, hr64 = (a.astype(np.float32) for a in (e_pre, e_post, e_res))
    f = _x((*lead, C), dtype_name, seed + 1)
    mlx_h = [mx.array(a).reshape(s) for a, s in ((hp64, (*lead, n)), (hpo64, (*lead, n)), (hr64, (*lead, n, n)))]
    xin = _run(ops.mhc_pre, x, mlx_h[0], backend=backend)
    out = _run(ops.mhc_post_res, x, f, mlx_h[1], mlx_h[2], backend=backend)
    assert xin.dtype == x.dtype and out.dtype == x.dtype and out.shape == x.shape
    xin64 = liger_pre64(x64, hp64.astype(np.float64))
    out64 = liger_post_res64(x64, _flat64(f[..., None, :])[:, 0], hpo64.astype(np.float64), hr64.astype(np.float64))
    err_in = _err_ok(xin.reshape(-1, C), xin64, tx, "x_in " + what)
    err_out = _err_ok(out.reshape(-1, n, C), out64, tx, "x_out " + what)
    _err_ok(x_in.reshape(-1, C), liger_pre64(x64, e_pre), tx, "fused x_in " + what)
    if x.dtype == mx.bfloat16 and tx == TOL[x.dtype]:
        x3, f2 = x.reshape(-1, n, C), f.reshape(-1, C)
        ref_in = ref.mhc_pre(x3, mlx_h[0].reshape(-1, n)).astype(mx.bfloat16)
        ref_out = ref.mhc_post_res(x3, f2, mlx_h[1].reshape(-1, n), mlx_h[2].reshape(-1, n, n)).astype(mx.bfloat16)
        assert_bf16_factor(err_in, rel_error64(ref_in, xin64), BF16_FACTOR, "x_in " + what)
        assert_bf16_factor(err_out, rel_error64(ref_out, out64), BF16_FACTOR, "x_out " + what)


@pytest.mark.gpu
@pytest.mark.skipif(not mx.cuda.is_available(), reason="MLX reports no cuda device")
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("B,n,C", GPU_EXTRA_SHAPES)
def test_forward_gpu_extra(B, n, C, dtype_name):
    _check_forward("cuda", B, n, C, dtype_name)


@pytest.mark.gpu
@pytest.mark.skipif(not mx.cuda.is_available(), reason="MLX reports no cuda device")
@pytest.mark.parametrize("B,n,C,dtype_name,phi_dtype", [(32, 4, 4096, "bfloat16", mx.bfloat16),
                                                        (32, 4, 4096, "bfloat16", mx.float32),
                                                        (128, 3, 301, "float32", mx.float16),
                                                        (1, 2, 1000, "float16", mx.float32),
                                                        (64, 4, 8, "float32", mx.float32)])
@pytest.mark.parametrize("proj", [True, False], ids=["coeffs_proj", "partials"])
def test_gpu_few_tokens(monkeypatch, B, n, C, dtype_name, phi_dtype, proj):
    """Few tokens on the GPU, forward and every gradient against the float64 port: the coefficients by
    mhc_dynamic_coeffs_proj (one launch, phi in its own dtype) and, with it switched off, by the
    three-kernel path's CTA mode (z summed from the projection's many splits)."""
    from mhc_aot import cuda_dynamic

    monkeypatch.setattr(cuda_dynamic, "PROJ_MAX_T", 10 ** 6 if proj else None)
    monkeypatch.setattr(cuda_dynamic, "PROJ_PHI_BYTES", 10 ** 15)
    _check_forward("cuda", B, n, C, dtype_name, phi_dtype=phi_dtype)
    _check_gradients("cuda", B, n, C, dtype_name, phi_dtype=phi_dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not mx.cuda.is_available(), reason="MLX reports no cuda device")
@pytest.mark.parametrize("B,n,C", [(1000, 4, 4096), (300, 4, 301), (33, 2, 136)])
def test_gpu_projection_bfloat16_phi(monkeypatch, B, n, C):
    """The projection's one-term variant (a bfloat16 phi) on the GPU against the float64 port. The
    few-token kernel off: its rule (T <= PROJ_MAX_T) comes first and took the two small shapes from
    session 29 to 49."""
    from mhc_aot import cuda_dynamic

    monkeypatch.setattr(cuda_dynamic, "PROJ_MAX_T", None)
    _assert_route(cuda_dynamic, B, n, C, "projection", mx.bfloat16, with_pre=(True, False))
    _check_forward("cuda", B, n, C, "bfloat16", phi_dtype=mx.bfloat16)
    _check_gradients("cuda", B, n, C, "bfloat16", phi_dtype=mx.bfloat16)


@pytest.mark.parametrize("cfg", [dict(tmax=1, rms_eps=1e-3, pre_eps=0.25, sinkhorn_eps=1e-3, post_mult=1.0),
                                 dict(tmax=7, rms_eps=1e-6, pre_eps=1e-4, sinkhorn_eps=1e-6, post_mult=3.0),
                                 dict(tmax=50, rms_eps=1e-5, pre_eps=0.0, sinkhorn_eps=1e-8, post_mult=2.0)],
                         ids=["tmax1", "tmax7", "tmax50"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_config(backend, cfg):
    _check_forward(backend, 6, 4, 37, "float32", cfg)


# ---------------------------------------------------------------- gradients
def _loss_coeffs(backend, G, with_pre=True, cfg=CFG):
    def loss(x, phi, b, ap, apo, ar):
        if not with_pre:
            h_pre, h_post, h_res = ops.mhc_coeffs(x, phi, b, ap, apo, ar, **cfg, backend=backend)
            return mx.sum(h_pre * G[0]) + mx.sum(h_post * G[1]) + mx.sum(h_res * G[2])
        h_pre, h_post, h_res, x_in = ops.mhc_coeffs_pre(x, phi, b, ap, apo, ar, **cfg, backend=backend)
        return (mx.sum(h_pre * G[0]) + mx.sum(h_post * G[1]) + mx.sum(h_res * G[2])
                + mx.sum(x_in.astype(mx.float32) * G[3]))
    return loss


def _grad_check(got, want, dtype, what, backend):
    tol = _tol(GRAD_TOL, dtype, backend)
    err = rel_error64(got, want)
    assert err < tol, f"{what}: relative error {err:.3e} >= {tol:.0e}"


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("B,n,C", GRAD_SHAPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_vs_liger64(backend, B, n, C, dtype_name):
    _check_gradients(backend, B, n, C, dtype_name)


def _check_gradients(backend, B, n, C, dtype_name, with_pre=True, cfg=CFG, phi_dtype=mx.float32):
    seed = seed_of("grad", backend, B, n, C, dtype_name)
    x = _x((*leading(B), n, C), dtype_name, seed)
    lead = tuple(x.shape[:-2])
    params = _params(n, C, seed, phi_dtype=phi_dtype)
    k = mx.random.split(mx.random.key(seed + 3), 6)
    G = [mx.random.normal(s, key=kk) for s, kk in
         (((*lead, n), k[0]), ((*lead, n), k[1]), ((*lead, n, n), k[2]), ((*lead, C), k[3]))]
    what = f"[{backend}] B={B} n={n} C={C} {dtype_name}"
    with testing.poisoned_outputs():
        grads = mx.grad(_loss_coeffs(backend, G, with_pre, cfg), argnums=tuple(range(6)))(x, *params)
        mx.eval(grads)
    assert grads[0].dtype == x.dtype and grads[0].shape == x.shape and grads[1].dtype == params[0].dtype
    # float64: coefficients backward + the pre path (x_in's cotangent flows to h_pre and to x)
    x64 = _flat64(x)
    p64 = _np_params(*params)
    # MLX (like torch) hands x_in's cotangent back in x's dtype: round it the same way
    G64 = [to64(g.astype(x.dtype) if i == 3 else g).reshape(-1, *g.shape[len(lead):]) for i, g in enumerate(G)]
    G64_in = G64[3]  # the pre-only check below uses it whatever with_pre is
    if not with_pre:
        G64[3] = np.zeros_like(G64[3])
    h_pre, _, _, saved = liger_coeffs64(x64, *p64, **cfg)
    dx_pre, dh_pre = liger_pre_bwd64(x64, h_pre, G64[3])
    want = list(liger_coeffs_bwd64(saved, p64[0], *p64[2:], G64[0] + dh_pre, G64[1], G64[2], n, **cfg))
    want[0] = want[0].reshape(x64.shape) + dx_pre
    names = ("dx", "dphi", "db", "dalpha_pre", "dalpha_post", "dalpha_res")
    for g, w, nm in zip(grads, want, names):
        # (dphi comes back in phi's dtype: MLX's VJP of the float32 copy the op takes)
        tol_dtype = x.dtype if nm == "dx" else phi_dtype if nm == "dphi" else mx.float32
        _grad_check(g.reshape(np.shape(w)), w, tol_dtype, f"{nm} {what}", backend)

    # post_res: every gradient
    f = _x((*lead, C), dtype_name, seed + 1)
    hp = mx.random.uniform(shape=(*lead, n), key=k[4]) * 2
    hr = mx.random.uniform(shape=(*lead, n, n), key=k[5])
    Go = mx.random.normal(x.shape, key=mx.random.key(seed + 5))

    def loss_pr(x, f, hp, hr):
        return mx.sum(ops.mhc_post_res(x, f, hp, hr, backend=backend).astype(mx.float32) * Go)

    with testing.poisoned_outputs():
        g_pr = mx.grad(loss_pr, argnums=(0, 1, 2, 3))(x, f, hp, hr)
        mx.eval(g_pr)
    want_pr = liger_post_res_bwd64(x64, to64(f).reshape(-1, C), to64(hp).reshape(-1, n), to64(hr).reshape(-1, n, n),
                                   to64(Go.astype(x.dtype)).reshape(-1, n, C))
    names, dts = ("dx", "df", "dh_post", "dh_res"), (x.dtype, x.dtype, mx.float32, mx.float32)
    for g, w, nm, dt in zip(g_pr, want_pr, names, dts):
        assert g.dtype == dt
        _grad_check(g.reshape(w.shape), w, dt, f"post_res {nm} {what}", backend)

    # pre on its own: dx and dh_pre
    def loss_pre(x, h):
        return mx.sum(ops.mhc_pre(x, h, backend=backend).astype(mx.float32) * G[3])

    with testing.poisoned_outputs():
        g_pre = mx.grad(loss_pre, argnums=(0, 1))(x, hp)
        mx.eval(g_pre)
    want_pre = liger_pre_bwd64(x64, to64(hp).reshape(-1, n), G64_in)
    _grad_check(g_pre[0].reshape(want_pre[0].shape), want_pre[0], x.dtype, f"pre dx {what}", backend)
    _grad_check(g_pre[1].reshape(want_pre[1].shape), want_pre[1], mx.float32, f"pre dh_pre {what}", backend)


@pytest.mark.gpu
@pytest.mark.skipif(not mx.cuda.is_available(), reason="MLX reports no cuda device")
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("B,n,C", GPU_EXTRA_GRAD_SHAPES)
def test_gradients_gpu_extra(B, n, C, dtype_name):
    _check_gradients("cuda", B, n, C, dtype_name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_alpha_shape_1_and_phi_dtypes(backend):
    """alpha_* of shape (1,) work and get (1,) gradients; phi in float16 / bfloat16 is used exactly."""
    n, C = 4, 16
    x = _x((5, n, C), "bfloat16", 11)
    phi, b, ap, apo, ar = _params(n, C, 12)
    for phi_dt in (mx.float16, mx.bfloat16):
        p = phi.astype(phi_dt)
        h = _run(ops.mhc_coeffs, x, p, b, ap.reshape(1), apo, ar, backend=backend)
        e = liger_coeffs64(_flat64(x), to64(p), to64(b), ap.item(), apo.item(), ar.item())
        for a, w in zip(h, e[:3]):
            _err_ok(a, w, _tol(TOL, mx.float32, backend), f"phi {phi_dt}")
        g = mx.grad(lambda p, a: mx.sum(ops.mhc_coeffs(x, p, b, a, apo, ar, backend=backend)[2] ** 2),
                    argnums=(0, 1))(p, ap.reshape(1))
        assert g[0].dtype == phi_dt and g[1].shape == (1,)


def test_alpha_cotangents_are_slices(tmp_path):
    """The kernels' backward hands the alphas' gradients out of one column-sum array as slices in the
    alphas' shapes: an integer index would add a Gather kernel (a launch) per alpha."""
    from mhc_aot.kernel_ops import scalars_of

    sums = mx.arange(10, dtype=mx.float32) * 3
    like = (mx.array(1.0), mx.array([2.0]), mx.zeros((1, 1)))
    got = scalars_of(sums, 6, like)
    dot = tmp_path / "g.dot"
    mx.export_to_dot(str(dot), *got)  # (before anything evaluates them: the graph, not its values)
    assert "Slice" in dot.read_text() and "Gather" not in dot.read_text()
    mx.export_to_dot(str(dot), sums[6])  # the control: what the test would catch
    assert "Gather" in dot.read_text()
    assert [g.shape for g in got] == [(), (1,), (1, 1)]
    assert [g.item() for g in got] == [18.0, 21.0, 24.0]


# ---------------------------------------------------------------- the layer
def _layer(n, C, seed, backend, dtype=mx.float32, **kw):
    mx.random.seed(seed)
    F = nn.Linear(C, C)
    F.set_dtype(dtype)
    m = DynamicMHC(F, n, C, backend=backend, **kw)
    phi, b, ap, apo, ar = _params(n, C, seed)
    m.update({"phi": phi, "b": b, "alpha_pre": ap, "alpha_post": apo, "alpha_res": ar})
    return m


def _layer64(m, x64, G64=None, alpha_scales=None):
    """DynamicMHC / LigerMHC.forward (transformers/mhc.py:136-158) in float64, and its backward
    (alpha_scales: see liger_coeffs_bwd64)."""
    sd = {k: np.asarray(v, np.float64) for k, v in dynamic.to_liger_state_dict(m).items()}
    W, bias = sd["layer.weight"], sd["layer.bias"]
    h_pre, h_post, h_res, saved = liger_coeffs64(x64, sd["phi"], sd["b"], float(sd["alpha_pre"]),
                                                 float(sd["alpha_post"]), float(sd["alpha_res"]))
    x_in = liger_pre64(x64, h_pre)
    f = x_in @ W.T + bias
    out = liger_post_res64(x64, f, h_post, h_res)
    if G64 is None:
        return out
    dx1, df, dh_post, dh_res = liger_post_res_bwd64(x64, f, h_post, h_res, G64)
    dW, dbias, dx_in = df.T @ x_in, df.sum(0), df @ W
    dx2, dh_pre = liger_pre_bwd64(x64, h_pre, dx_in)
    dx3, dphi, db, *da = liger_coeffs_bwd64(saved, sd["phi"], float(sd["alpha_pre"]), float(sd["alpha_post"]),
                                            float(sd["alpha_res"]), dh_pre, dh_post, dh_res, x64.shape[1],
                                            alpha_scales=alpha_scales)
    return out, {"x": dx1 + dx2 + dx3.reshape(x64.shape), "phi": dphi, "b": db, "alpha_pre": da[0],
                 "alpha_post": da[1], "alpha_res": da[2], "layer.weight": dW, "layer.bias": dbias}


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("B,n,C", [(1, 1, 1), ((2, 3), 4, 32), (5, 8, 17), (2, 16, 8)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_vs_liger64(backend, B, n, C, dtype_name):
    _check_layer(backend, B, n, C, dtype_name)


def _check_layer(backend, B, n, C, dtype_name, f_dtype=mx.float32):
    seed = seed_of("layer", backend, B, n, C, dtype_name)
    dtype = testing.DTYPES[dtype_name]
    m = _layer(n, C, seed, backend, f_dtype)
    x = _x((*leading(B), n, C), dtype_name, seed)
    out = _run(m, x)
    assert out.shape == x.shape and out.dtype == x.dtype
    x64 = _flat64(x)
    G = mx.random.normal(x.shape, key=mx.random.key(seed))
    scales = {}
    want_out, want = _layer64(m, x64, to64(G.astype(dtype)).reshape(x64.shape), scales)
    what = f"DynamicMHC[{backend}] B={B} n={n} C={C} {dtype_name}"
    # x_in is rounded to x's dtype before F (LigerMHCPreFunction returns x's dtype): 2 x the tolerance
    _err_ok(out.reshape(x64.shape), want_out, 2 * _tol(TOL, dtype, backend, mlx_matmul=True), what)

    def loss(params, x):
        m.update(params)
        return mx.sum(m(x).astype(mx.float32) * G)

    with testing.poisoned_outputs():
        g_params, g_x = mx.grad(loss, argnums=(0, 1))(m.trainable_parameters(), x)
        mx.eval(g_params, g_x)
    got = dict(tree_flatten(g_params))
    got["x"] = g_x
    for k, w in want.items():
        tol = (2 * _tol(GRAD_TOL, dtype, backend, mlx_matmul=True) if dtype != mx.float32
               else max(1e-4, _tol(GRAD_TOL, dtype, backend, mlx_matmul=True)))
        if k in scales:
            # a scalar summed over every token and stream, with cancellation: its error is relative to
            # the sum of the terms' magnitudes (a few seeds put the sum itself near 0)
            err = abs(float(to64(got[k]).sum()) - float(np.sum(w))) / (scales[k] or 1.0)  # no terms: absolute
        else:
            err = rel_error64(got[k].reshape(np.shape(w)), w)
        assert err < tol, f"grad {k} {what}: relative error {err:.3e} >= {tol:.0e}"


def tree_flatten(t):
    from mlx.utils import tree_flatten as tf

    return tf(t)


def test_layer_defaults_match_liger():
    """LigerMHC(layer, hc, c) defaults (transformers/mhc.py:86-126): tmax 20, rms_eps 1e-6, pre_eps 0,
    sinkhorn_eps 1e-6, post_mult 2; phi ~ 0.02 N(0, 1), b = 0, alphas = 1 (0-d float32)."""
    m = DynamicMHC(nn.Linear(64, 64), 4, 64, key=mx.random.key(0))
    assert m.config == dynamic.Config(20, 1e-6, 0.0, 1e-6, 2.0)
    assert m.phi.shape == (256, 24) and abs(float(mx.std(m.phi).item()) - 0.02) < 2e-3
    assert m.b.shape == (24,) and float(mx.abs(m.b).max().item()) == 0.0
    for k in ("alpha_pre", "alpha_post", "alpha_res"):
        a = getattr(m, k)
        assert a.shape == () and a.dtype == mx.float32 and a.item() == 1.0
    assert {k for k, _ in tree_flatten(m.trainable_parameters())} == {
        "phi", "b", "alpha_pre", "alpha_post", "alpha_res", "layer.weight", "layer.bias"}


def test_liger_state_dict_round_trip():
    m = _layer(4, 32, 5, "portable")
    sd = dynamic.to_liger_state_dict(m)
    assert set(sd) == {"phi", "b", "alpha_pre", "alpha_post", "alpha_res", "layer.weight", "layer.bias"}
    assert sd["phi"].shape == (128, 24) and sd["alpha_pre"].shape == () and all(isinstance(v, np.ndarray)
                                                                               for v in sd.values())
    m2 = DynamicMHC(nn.Linear(32, 32), 4, 32, phi_dtype=mx.bfloat16, backend="portable")
    dynamic.load_liger_state_dict(m2, {k: v.astype(np.float16) if k == "phi" else v for k, v in sd.items()})
    assert m2.phi.dtype == mx.bfloat16 and m2.alpha_res.shape == ()
    m3 = DynamicMHC(nn.Linear(32, 32), 4, 32, backend="portable")
    dynamic.load_liger_state_dict(m3, sd)
    x = _x((3, 4, 32), "float32", 9)
    assert float(mx.abs(m3(x) - m(x)).max().item()) == 0.0
    with pytest.raises(ValueError, match="missing keys"):
        dynamic.load_liger_state_dict(m3, {"phi": sd["phi"]})
    with pytest.raises(ValueError, match="shape"):
        dynamic.load_liger_state_dict(m3, {**sd, "b": np.zeros(5, np.float32)})


def test_layer_casts_x_in_to_layer_dtype_and_compiles():
    """LigerMHC casts x_in to F's parameter dtype (transformers/mhc.py:151-156); the layer traces
    under mx.compile."""
    seen = {}

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = mx.ones((8,), mx.float16)

        def __call__(self, v):
            seen["dtype"] = v.dtype
            return v * self.w

    m = DynamicMHC(Probe(), 2, 8, backend="portable")
    x = _x((3, 2, 8), "float32", 1)
    out = m(x)
    assert seen["dtype"] == mx.float16 and out.dtype == mx.float32
    compiled = mx.compile(m)
    assert float(mx.abs(compiled(x) - out).max().item()) < 1e-6


# ---------------------------------------------------------------- errors and dispatch
def test_errors_name_the_fix():
    x = mx.zeros((2, 4, 8))
    phi, b, ap, apo, ar = _params(4, 8, 0)
    with pytest.raises(ValueError, match=r"phi has shape \(31, 24\): expected \(32, 24\)"):
        ops.mhc_coeffs(x, phi[:31], b, ap, apo, ar)
    with pytest.raises(ValueError, match="tmax=0"):
        ops.mhc_coeffs(x, phi, b, ap, apo, ar, tmax=0)
    with pytest.raises(ValueError, match="alpha_pre has shape"):
        ops.mhc_coeffs(x, phi, b, mx.ones((2,)), apo, ar)
    with pytest.raises(ValueError, match=r"h_res has shape"):
        ops.mhc_post_res(x, mx.zeros((2, 8)), mx.zeros((2, 4)), mx.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"expected \[\.\.\., 4, 8\]"):
        DynamicMHC(nn.Identity(), 4, 8)(mx.zeros((2, 3, 8)))
    with pytest.raises(ValueError, match="backend="):
        ops.mhc_pre(x, mx.zeros((2, 4)), backend="gpu")
    if not mx.cuda.is_available():
        with pytest.raises(RuntimeError, match="mx.cuda.is_available"):
            ops.mhc_pre(x, mx.zeros((2, 4)), backend="cuda")


def test_empty_and_auto():
    x = mx.zeros((0, 3, 4, 8))
    phi, b, ap, apo, ar = _params(4, 8, 0)
    h = ops.mhc_coeffs_pre(x, phi, b, ap, apo, ar)
    assert [a.shape for a in h] == [(0, 3, 4), (0, 3, 4), (0, 3, 4, 4), (0, 3, 8)]
    assert ops.mhc_post_res(x, h[3], h[1], h[2]).shape == x.shape
    # "auto" on the CPU is the portable path (with or without the dispatch rows of the dynamic ops)
    for op in dynamic.DYNAMIC_OPS:
        c = dynamic._choose(op, 4, 8, "cpu", 3)
        assert (c.backend, c.strategy) == ("cpu", "portable")
        assert c.rule is None or c.rule in dispatch.RULES


# ---------------------------------------------------------------- CUDA kernels, emulated on the CPU
# Without a GPU, the kernels of cuda_src/mhc_dynamic_*.cu still run here (tests/cuda_emulation.py),
# launched with the arguments that mhc_aot.cuda_dynamic passes: the whole CUDA path (launch
# geometry, argument order, custom VJPs, partial sums) runs against the same float64 Liger port.
# T small (every CTA runs 256 fibers): vector (C % 8 == 0) and scalar paths, n <= 4 (compile-time
# NMAX = 4) and generic n, several K splits; token splits and the CTA-per-column reduce are made
# to happen at these T by shrinking their thresholds (the kernels take any split).
EMU_CASES = [((3, 4, 40), "float32"), ((3, 4, 40), "bfloat16"), ((5, 2, 33), "float32"), ((2, 5, 16), "bfloat16"),
             ((9, 1, 9), "bfloat16"), (((2, 2), 16, 8), "float32")]


@pytest.fixture(scope="module")
def _emulator():
    import shutil
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    if shutil.which("g++") is None or not (ROOT / "build_tools" / "variants.py").exists():
        pytest.skip("CUDA emulation needs g++ (C++20, ucontext) and the source tree (cuda_src/, build_tools/)")
    emu = Emulator(__import__("pathlib").Path(tempfile.gettempdir()) / "mhc-aot-cuda-emulation")
    todo = {(v.source, v.dtype or "f32", v.nmax) for v in emu.variants.VARIANTS
            if v.source.startswith("mhc_dynamic_") and (v.dtype or "f32") in ("f32", "bf16")}
    with ThreadPoolExecutor(max_workers=__import__("os").cpu_count() or 2) as pool:
        for key, lib in zip(todo, pool.map(lambda k: emu.build(*k), todo)):
            emu.libs[key] = lib
    return emu


@pytest.mark.skipif(__import__("platform").machine() != "x86_64" or __import__("sys").platform != "linux",
                    reason="the register-only fiber switch is x86-64 ELF's (tests/emu_fiber.h); ucontext elsewhere")
def test_emulations_switch_threads_without_system_calls(_emulator, _metal_emulations):
    """Both emulations' GPU threads are fibers that switch by tests/emu_fiber.h's mhc_emu_switch, with no
    swapcontext (a signal-mask system call at every switch) and no OS threads: on CI's VM, where a system
    call costs ~1.1 us, those made the test suite ~4x slower (docs/HISTORY.md, session 59)."""
    import subprocess

    def symbols(lib, *flags):
        return subprocess.run(["nm", *flags, lib._name], capture_output=True, text=True, check=True).stdout

    cuda_lib, _ = _emulator.build("mhc_dynamic_pre", "bf16", 4)
    metal_lib = _metal_emulations("mhc_dynamic_pre", "bf16", 4).emulated.lib
    for lib in (cuda_lib, metal_lib):
        undefined = symbols(lib, "-D", "--undefined-only")
        assert "mhc_emu_switch" in symbols(lib), lib._name
        assert not any(f in undefined for f in ("swapcontext", "getcontext", "pthread_create")), (lib._name, undefined)


@pytest.fixture(params=["cta", "lanes", "elems"])
def emulated_cuda(_emulator, monkeypatch, request):
    """The emulated kernels, with the per-token coefficient math in each mode of
    mhc_dynamic_coeffs(_bwd): one CTA per token, a lane group per token, or ("elems") a half-warp per
    token with a lane per matrix element, forward and backward (n <= ELEMS_MAX_N; larger n then take
    lane groups) at any T here."""
    from mhc_aot import cuda, cuda_dynamic, kernel_ops, tma

    monkeypatch.setattr(cuda_dynamic, "LANES_MIN_T", 10 ** 9 if request.param == "cta" else 1)
    monkeypatch.setattr(cuda_dynamic, "PROJ_MAX_T", None)  # test_emulated_cuda_coeffs_proj runs that kernel
    if request.param == "lanes":  # lane groups for every n <= LANES_MAX_N
        monkeypatch.setattr(cuda_dynamic, "ELEMS_MAX_N", 0)
    monkeypatch.setattr(kernel_ops, "COMPILE_FORWARD", False)  # numpy stand-in kernels cannot be traced
    monkeypatch.setattr(cuda_dynamic, "SK_JC", 8)  # a multiple of every vector width
    monkeypatch.setattr(cuda_dynamic, "COLSUM_CTA_ROWS", 2)
    monkeypatch.setattr(cuda_dynamic, "DPHI_TC", 2)  # token splits of the tensor-core dphi at small T

    real_choose = dynamic._choose
    monkeypatch.setattr(cuda, "_binary", _emulator.binary)
    monkeypatch.setattr(mx.fast, "precompiled_cuda_kernel", _emulator.kernel)
    monkeypatch.setattr(tma, "encode", tensor_map)  # the emulated tensor map (no libcuda here)
    monkeypatch.setattr(mx.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dynamic, "_choose", lambda op, n, C, backend, T: (
        dispatch.Choice("cuda", "fused", None, "emulated") if backend == "cuda" else real_choose(op, n, C, backend, T)))
    _emulator.mode, _emulator.launched, _emulator.grids = request.param, [], []
    _emulator.deferred_copies = False  # copy_timing sets it where a test asks
    _emulator.shuffle_seed = None  # threads in order unless a test asks (a shuffled test's seed leaked on)
    return _emulator


@pytest.mark.parametrize("n,lanes", [(4, {"cta": (0, 0), "lanes": (4, 4), "elems": (-2, -2)}),
                                     (3, {"cta": (0, 0), "lanes": (4, 4), "elems": (-2, -2)}),
                                     (5, {"cta": (0, 0), "lanes": (8, 8), "elems": (8, 8)})])
def test_emulated_cuda_coeffs_mode_launched(emulated_cuda, n, lanes):
    """Each mode of the fixture really runs: the `lanes` scalar (second to last) of every
    mhc_dynamic_coeffs launch (forward) and mhc_dynamic_coeffs_bwd launch (backward); -2 the element
    mode, for n <= 4 only."""
    _check_gradients("cuda", 3, n, 8, "float32")
    launched = [(nm.startswith("mhc_dynamic_coeffs_bwd"), sc[-2]) for nm, sc in emulated_cuda.launched
                if nm.startswith("mhc_dynamic_coeffs")]
    fwd, bwd = lanes[emulated_cuda.mode]
    assert set(launched) == {(False, fwd), (True, bwd)}, launched


@pytest.mark.parametrize("shape,dtype_name", EMU_CASES, ids=[f"{s}-{d}" for s, d in EMU_CASES])
def test_emulated_cuda_kernels_vs_liger64(emulated_cuda, shape, dtype_name):
    B, n, C = shape
    _check_forward("cuda", B, n, C, dtype_name)
    _check_gradients("cuda", B, n, C, dtype_name)


@pytest.mark.parametrize("C,sms", [(300, 2), (301, 2), (300, 6)], ids=["16-byte-rows", "element-rows", "two-k-splits"])
def test_emulated_cuda_projection_streams_many_stages(emulated_cuda, copy_timing, monkeypatch, C, sms):
    """The tensor-core projection (and dphi) with more stages per CTA than their four shared-memory
    buffers (few resident CTAs, so few K or token splits), a ragged last stage, rows that are not
    16-byte multiples (C = 301), and K chunks interleaved over two splits (sms = 6)."""
    from mhc_aot import cuda_dynamic

    monkeypatch.setattr(cuda_dynamic.device, "resident_ctas_per_sm", lambda shared_bytes: 1)
    monkeypatch.setattr(cuda_dynamic.device, "sm_count", lambda: sms)
    # projection: two 128-token tiles, the second ragged; K = 4 C in 64-element chunks, the last
    # ragged, over one split (19 stages) or interleaved over three (sms = 6: 7, 6 and 6)
    _check_forward("cuda", 130, 4, C, "bfloat16")
    _check_gradients("cuda", 130, 4, C, "bfloat16")  # dphi: token stages of 64, the last ragged


@pytest.mark.parametrize("B,n,C", [(3, 4, 40), (130, 4, 301)])
def test_emulated_cuda_projection_bfloat16_phi(emulated_cuda, monkeypatch, B, n, C):
    """A bfloat16 phi (Liger's benchmark keeps phi in x's dtype) is exact in one bfloat16 term: the
    projection runs its one-term variant (`_t1`), a float32 phi the three-term one, each against the
    float64 port (16-byte and element rows, two token tiles at T = 130). The control: one term for a
    float32 phi must fail the forward check, so the float32 cases tell the variants apart."""
    _check_forward("cuda", B, n, C, "bfloat16", phi_dtype=mx.bfloat16)
    _check_gradients("cuda", B, n, C, "bfloat16", phi_dtype=mx.bfloat16)
    names = {nm for nm, _ in emulated_cuda.launched}
    assert "mhc_dynamic_proj_tc_bf16_t1" in names and "mhc_dynamic_proj_tc_bf16" not in names, names
    emulated_cuda.launched.clear()
    _check_forward("cuda", B, n, C, "bfloat16")
    names = {nm for nm, _ in emulated_cuda.launched}
    assert "mhc_dynamic_proj_tc_bf16" in names and "mhc_dynamic_proj_tc_bf16_t1" not in names, names
    _one_term_on_float32_phi_fails(monkeypatch, B, n, C)


def _one_term_on_float32_phi_fails(monkeypatch, B, n, C):
    """The control of the bfloat16-phi tests: one term forced on a float32 phi must fail the forward
    check (float32 needs its three), so a test that passes tells the variants apart."""
    from mhc_aot import cuda_dynamic

    real = cuda_dynamic._coeffs_fn
    monkeypatch.setattr(cuda_dynamic, "_coeffs_fn", lambda cfg, with_pre, alias, phi_terms=3:
                        real(cfg, with_pre, alias, 1))
    with pytest.raises(AssertionError):
        _check_forward("cuda", B, n, C, "bfloat16")


@pytest.mark.parametrize("phi_dtype,kind", [(mx.bfloat16, 1), (mx.float16, 2), (mx.float32, 0)])
@pytest.mark.parametrize("emulated_cuda", ["elems"], indirect=True)  # the coefficient mode does not apply
def test_emulated_cuda_phi_read_in_its_dtype(emulated_cuda, phi_dtype, kind):
    """phi_split reads phi in its own dtype (its phi_kind, the last scalar): the forward makes no float32
    copy of phi (a cast launch). A float16 phi in the tensor-core path takes the three-term split (not
    exact in one bfloat16 term), forward and every gradient against the float64 port (16-byte and
    element rows)."""
    for B, n, C in ((3, 4, 40), (130, 4, 301)):
        emulated_cuda.launched.clear()
        _check_forward("cuda", B, n, C, "bfloat16", phi_dtype=phi_dtype)
        _check_gradients("cuda", B, n, C, "bfloat16", phi_dtype=phi_dtype)
        kinds = {sc[-1] for nm, sc in emulated_cuda.launched if nm == "mhc_dynamic_phi_split"}
        assert kinds == {kind}, kinds


PROJ_CASES = [(3, 4, 40, "float32", mx.float32), (5, 4, 40, "bfloat16", mx.bfloat16), (4, 3, 17, "float32", mx.float16),
              (2, 2, 33, "bfloat16", mx.float32), ((2, 3), 1, 9, "float16", mx.bfloat16), (2, 4, 64, "float16", mx.float16),
              (2, 4, 520, "bfloat16", mx.float32)]


def _forward_coeff_kernels(launched) -> set[str]:
    """The coefficient kernels among the launches of forward passes."""
    return {nm for nm, _ in launched if nm.startswith(("mhc_dynamic_coeffs", "mhc_dynamic_proj_tc", "mhc_dynamic_skinny",
                                                        "mhc_dynamic_phi_split"))}


@pytest.mark.parametrize("B,n,C,dtype_name,phi_dtype", PROJ_CASES,
                         ids=[f"{b}-{n}-{c}-{d}-phi_{str(p).split('.')[-1]}" for b, n, c, d, p in PROJ_CASES])
@pytest.mark.parametrize("emulated_cuda", ["cta"], indirect=True)
def test_emulated_cuda_coeffs_proj(emulated_cuda, copy_timing, monkeypatch, B, n, C, dtype_name, phi_dtype):
    """mhc_dynamic_coeffs_proj (few tokens: a CTA projects its own token, phi read in its own dtype; one
    launch for the coefficients and x_in), forward and every gradient (dphi in phi's dtype) against the
    float64 port: phi rows in 16-byte chunks (M = 24, 8) in double-buffered groups of four loads, each
    CTA starting at its own group (C = 520: 6 to 12 groups a thread and a ragged tail) and element by
    element (M = 15, 3), tokens staged by 16-byte vectors and element by element (C = 17, 33, 9), each
    phi dtype. Its forward is the only coefficient kernel launched."""
    from mhc_aot import cuda_dynamic

    monkeypatch.setattr(cuda_dynamic, "PROJ_MAX_T", 10 ** 6)
    monkeypatch.setattr(cuda_dynamic, "PROJ_PHI_BYTES", 10 ** 15)
    _check_forward("cuda", B, n, C, dtype_name, phi_dtype=phi_dtype)
    tag = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}[dtype_name]
    assert _forward_coeff_kernels(emulated_cuda.launched) == {f"mhc_dynamic_coeffs_proj_{tag}_n4"}, \
        _forward_coeff_kernels(emulated_cuda.launched)
    _check_gradients("cuda", B, n, C, dtype_name, phi_dtype=phi_dtype)


def test_coeffs_proj_rule():
    """mhc_dynamic_coeffs_proj takes the coefficients only where it measured faster (cuda_dynamic's
    PROJ_* comment): at most PROJ_MAX_T tokens whose CTAs read at most PROJ_PHI_BYTES of phi together
    (T n C M bytes: twice the tokens with a 2-byte phi as with float32), n <= 4, the token in shared
    memory."""
    from mhc_aot import cuda_dynamic as cd

    bf, f32 = mx.bfloat16, mx.float32
    assert cd._uses_proj(32, 4, 4096, bf, 20, bf) and cd._uses_proj(1, 1, 8, f32, 20, mx.float16)
    assert cd._uses_proj(256, 4, 4096, bf, 20, bf) and not cd._uses_proj(257, 4, 4096, bf, 20, bf)
    assert cd._uses_proj(128, 4, 4096, bf, 20, f32) and not cd._uses_proj(129, 4, 4096, bf, 20, f32)
    assert cd._uses_proj(1024, 4, 1024, bf, 20, bf) and not cd._uses_proj(1024, 4, 2048, bf, 20, bf)
    assert not cd._uses_proj(cd.PROJ_MAX_T + 1, 1, 8, bf, 20, bf)  # few bytes, but past PROJ_MAX_T
    assert not cd._uses_proj(32, 5, 64, bf, 20, bf)
    # a token too large for shared memory (the partials and coefficients come on top of it)
    big_C = cd.device.max_shared_memory_per_block() // (4 * 4)
    assert cd.proj_smem_bytes(4, big_C, 20, 4) == 0 and not cd._uses_proj(1, 4, big_C, f32, 20, bf)
    assert cd.proj_smem_bytes(4, 4096, 20, 2) > 4 * 4096 * 2


def test_emulated_cuda_coeffs_without_pre_config_and_layer(emulated_cuda):
    _check_gradients("cuda", 6, 3, 24, "float32", with_pre=False)
    _check_forward("cuda", 6, 4, 37, "float32", dict(tmax=7, rms_eps=1e-5, pre_eps=1e-4, sinkhorn_eps=1e-6,
                                                    post_mult=3.0))
    _check_gradients("cuda", 6, 4, 37, "float32", cfg=CFG_OTHER)  # every eps large enough to show
    m = _layer(4, 16, 3, "cuda")
    x = _x((5, 4, 16), "float32", 4)
    _err_ok(_run(m, x).reshape(5, 4, 16), _layer64(m, to64(x)), 1e-5, "emulated DynamicMHC")


@pytest.mark.parametrize("B,n,C,dtype_name,f_dtype", [
    ((2, 3), 4, 32, "float32", mx.float32), (70, 4, 48, "bfloat16", mx.float32),
    (70, 4, 48, "bfloat16", mx.bfloat16), (5, 3, 17, "float32", mx.float32), (6, 4, 20, "bfloat16", mx.bfloat16)])
def test_emulated_cuda_layer_vs_liger64(emulated_cuda, B, n, C, dtype_name, f_dtype):
    """DynamicMHC on the kernels, forward and every gradient: post_res reads x through the
    coefficients op's alias output, so x's gradient from post_res is added by the dx kernel
    (16-byte path, several token tiles at T = 70; element path at C = 17 and, in bfloat16, C = 20);
    F in x's dtype runs the post_res kernels, F in float32 the portable post_res (Liger reads f in
    its own dtype). h_pre, which the layer discards, has a zero cotangent that is never passed: the
    CTA mode does not read dh_pre (has_dh_pre 0), the lane modes read the dots in its slot (has_pre 0)."""
    _check_layer("cuda", B, n, C, dtype_name, f_dtype)
    flags = {tuple(sc[-4:-2]) for nm, sc in emulated_cuda.launched if nm.startswith("mhc_dynamic_coeffs_bwd")}
    assert flags == ({(1, 0)} if emulated_cuda.mode == "cta" else {(0, 1)}), flags


def test_emulated_cuda_documented_exits(emulated_cuda, monkeypatch):
    """A Sinkhorn (history) over shared memory takes the portable graph or MLX's VJP of it; F's output
    in a dtype other than x's takes the portable post_res. All still match Liger."""
    from mhc_aot import cuda_dynamic

    n, tmax = 2, CFG["tmax"]
    fwd = cuda_dynamic.coeffs_cta_floats(n, tmax)
    monkeypatch.setattr(cuda_dynamic, "_fits", lambda floats: floats <= fwd)
    # the backward's history does not fit: at n = 2 it needs fewer floats than the forward's CTA (whose
    # partial sums' scratch is larger), so its size is raised past the limit (until session 49 only the
    # limit was set, and the backward kernel ran)
    monkeypatch.setattr(cuda_dynamic, "_coeffs_bwd_smem", lambda n, tmax, nmax: fwd + 1)
    vjp, calls = dynamic._portable_coeffs_vjp, []
    monkeypatch.setattr(dynamic, "_portable_coeffs_vjp", lambda *a: calls.append(a) or vjp(*a))
    _check_gradients("cuda", 3, n, 8, "float32")
    assert calls, "the backward ran a kernel, not MLX's VJP of the portable graph"
    assert not any(nm.startswith("mhc_dynamic_coeffs_bwd") for nm, _ in emulated_cuda.launched), emulated_cuda.launched
    monkeypatch.setattr(cuda_dynamic, "_fits", lambda floats: False)  # nor does the forward's Sinkhorn
    _check_gradients("cuda", 3, n, 8, "float32")
    x, f = _x((3, 2, 8), "bfloat16", 1), _x((3, 8), "float32", 2)
    hp, hr = mx.ones((3, 2)), mx.full((3, 2, 2), 0.5)
    out = _run(ops.mhc_post_res, x, f, hp, hr, backend="cuda")
    want = liger_post_res64(to64(x), to64(f), to64(hp), to64(hr))
    _err_ok(out, want, TOL[mx.bfloat16], "post_res with float32 f")


@pytest.mark.parametrize("B,n,C,sms", [(100, 4, 256, 4), (420, 4, 200, 2), (70, 3, 216, 6), (40, 1, 136, 2),
                                       (96, 2, 128, 1), (33, 4, 8, 3)],
                         ids=["two-groups", "one-group-14-tiles", "n3-half-box", "n1-ragged-split", "one-cta",
                              "c8-empty-box"])
@pytest.mark.parametrize("emulated_cuda", ["elems"], indirect=True)  # the coefficient mode does not apply
def test_emulated_cuda_coeffs_pre(emulated_cuda, copy_timing, monkeypatch, B, n, C, sms):
    """mhc_dynamic_coeffs_pre (coefficients + x_in, x read once) with its CTAs waiting on each other:
    groups of ceil(C / 128) CTAs, each walking more tiles than its shared buffers and partial slots
    (14 tiles, one group: a partial slot rewritten once every CTA has read its earlier tile), a ragged
    last split and token tile, a CTA whose second 64-column box is partly (C = 200, 216) or wholly
    (C = 136, 8) past C, and n < 4 (unused streams); TMA copies (the
    emulated tensor map: 128-byte swizzle, zero fill) landing at issue and at their wait. The coefficient
    warps take tiles from a queue, so 14 tiles leave Sinkhorn batches of every size."""
    _check_coeffs_pre_emulated(emulated_cuda, monkeypatch, B, n, C, sms)


@pytest.mark.parametrize("B,n,C,sms,seed", [(420, 4, 200, 2, 1), (420, 4, 200, 2, 2), (100, 4, 256, 4, 3),
                                            (70, 3, 216, 6, 4)],
                         ids=["one-group-14-tiles-s1", "one-group-14-tiles-s2", "two-groups-s3", "n3-half-box-s4"])
@pytest.mark.parametrize("emulated_cuda", ["elems"], indirect=True)
def test_emulated_cuda_coeffs_pre_shuffled(emulated_cuda, monkeypatch, B, n, C, sms, seed):
    """The same with the threads resumed in a pseudo-random order each round (MHC_EMU_SHUFFLE): a warp
    that passes a wait early then acts before others that passed it late, which shows a missing
    barrier between warps that thread order hides (a ring buffer refilled by the first x_in warp before
    the other x_in warps had read it passed every ordered run)."""
    emulated_cuda.shuffle_seed = seed
    _check_coeffs_pre_emulated(emulated_cuda, monkeypatch, B, n, C, sms)


@pytest.mark.parametrize("B,n,C,sms,seed", [(420, 4, 200, 2, None), (420, 4, 200, 2, 5), (100, 4, 256, 4, 6),
                                            (70, 3, 216, 6, None)],
                         ids=["one-group-14-tiles", "one-group-14-tiles-s5", "two-groups-s6", "n3-half-box"])
@pytest.mark.parametrize("emulated_cuda", ["elems"], indirect=True)
def test_emulated_cuda_coeffs_pre_mailbox_tags(emulated_cuda, monkeypatch, B, n, C, sms, seed):
    """mhc_dynamic_coeffs_pre's hand-overs rest on its mailboxes' tags: built with MHC_CP_UNGATED (the
    coefficient warps read a tile's partials without waiting on its `projected` counter, so they read
    words not stored yet and go by the tags alone; the x_in warps always do), its scratch starting as
    words with the first tile's tag (as an earlier launch could leave it): the same outputs, in order
    and shuffled. A kernel that skipped its zeroing, or took a word without its tag, would read the
    poison."""
    emulated_cuda.extra_defines = ("MHC_CP_UNGATED=1",)
    emulated_cuda.u32_poison = {"mhc_dynamic_coeffs_pre": 1}  # (each 64-bit word: value 1e-45, tag 1)
    emulated_cuda.shuffle_seed = seed
    _check_coeffs_pre_emulated(emulated_cuda, monkeypatch, B, n, C, sms)


@pytest.mark.parametrize("B,n,C,sms", [(100, 4, 256, 4), (70, 3, 216, 6), (420, 4, 200, 2)],
                         ids=["two-groups", "n3-half-box", "n4-ragged-split"])
@pytest.mark.parametrize("emulated_cuda", ["elems"], indirect=True)
def test_emulated_cuda_coeffs_pre_bfloat16_phi(emulated_cuda, monkeypatch, B, n, C, sms):
    """A bfloat16 phi in mhc_dynamic_coeffs_pre: its one-term variant (`_t1`, phi is its own first
    term), forward and every gradient against the float64 port. n = 4 with whole 128-column splits takes
    phi's fragments by ldmatrix, n = 3 and the ragged last split (C = 200: 72 columns) by element picks;
    (420, 4, 200) has both in one launch. The control: one term for a float32 phi must fail the forward
    check, so the test tells the variants apart."""
    _check_coeffs_pre_emulated(emulated_cuda, monkeypatch, B, n, C, sms, phi_dtype=mx.bfloat16)
    _check_gradients("cuda", B, n, C, "bfloat16", phi_dtype=mx.bfloat16)
    names = {nm for nm, _ in emulated_cuda.launched}
    assert "mhc_dynamic_coeffs_pre_bf16_n4" not in names, names
    _one_term_on_float32_phi_fails(monkeypatch, B, n, C)


@pytest.mark.parametrize("B,n,C,sms", [(100, 4, 256, 4), (70, 3, 216, 6)], ids=["two-groups", "n3-half-box"])
@pytest.mark.parametrize("emulated_cuda", ["elems"], indirect=True)
def test_emulated_cuda_coeffs_pre_bfloat16_phi_unaligned(emulated_cuda, monkeypatch, B, n, C, sms):
    """The one-term variant stages phi's rows in shared memory with 16-byte copies where phi is 16-byte
    aligned, else element by element: here phi sits one element past a 16-byte boundary (as a view at an
    offset would), so the element copies run; the forward against the float64 port."""
    emulated_cuda.misaligned = {"mhc_dynamic_coeffs_pre": (2,)}  # phi, the kernel's third input
    _check_coeffs_pre_emulated(emulated_cuda, monkeypatch, B, n, C, sms, phi_dtype=mx.bfloat16)


@pytest.mark.parametrize("emulated_cuda", ["elems"], indirect=True)
def test_emulated_cuda_coeffs_pre_float16_phi(emulated_cuda, monkeypatch):
    """A float16 phi read as it is by mhc_dynamic_coeffs_pre (its phi_kind, no float32 copy first), in the
    three-term variant (float16 is not exact in one bfloat16 term), forward and every gradient."""
    _check_coeffs_pre_emulated(emulated_cuda, monkeypatch, 100, 4, 256, 4, phi_dtype=mx.float16)
    _check_gradients("cuda", 100, 4, 256, "bfloat16", phi_dtype=mx.float16)


@pytest.mark.parametrize("emulated_cuda", ["elems"], indirect=True)
def test_emulated_cuda_coeffs_pre_shared_sync(emulated_cuda, monkeypatch):
    """Launches on one counter buffer in sequence (the GPU test's check, on two groups of two CTAs, four
    tiles): each gives what it gives on fresh zeros, and the counters count on by one launch's counts."""
    emulated_cuda.u32_poison = {"mhc_dynamic_coeffs_pre": 1}  # scratch words as tile 0's: read only once zeroed
    emulated_cuda.shuffle_seed = 7
    _check_coeffs_pre_shared_sync(_coeffs_pre_emulated(monkeypatch, 4), 100, 4, 256, (1, 2, 3),
                                  left=lambda: emulated_cuda.inputs_after["mhc_dynamic_coeffs_pre"][7].copy())


def _coeffs_pre_emulated(monkeypatch, sms):
    """mhc_dynamic_coeffs_pre switched on at any shape under the emulation, on `sms` emulated SMs; returns
    mhc_aot.cuda_dynamic."""
    from mhc_aot import cuda_dynamic

    monkeypatch.setattr(cuda_dynamic, "CP_MIN_T", 1)
    monkeypatch.setattr(cuda_dynamic, "CP_SHAPES", False)  # any shape, not only its rule's
    monkeypatch.setattr(cuda_dynamic.device, "mlx_arch_number", lambda: cuda_dynamic.CP_ARCH)
    monkeypatch.setattr(cuda_dynamic.device, "max_shared_memory_per_block", lambda: cuda_dynamic.cuda.SMEM_LIMIT)
    monkeypatch.setattr(cuda_dynamic.device, "resident_ctas_per_sm", lambda shared_bytes: 1)
    monkeypatch.setattr(cuda_dynamic.device, "sm_count", lambda: sms)
    return cuda_dynamic


def _check_coeffs_pre_emulated(emulated_cuda, monkeypatch, B, n, C, sms, phi_dtype=mx.float32):
    cuda_dynamic = _coeffs_pre_emulated(monkeypatch, sms)
    _check_forward("cuda", B, n, C, "bfloat16", phi_dtype=phi_dtype)
    names = [nm for nm, _ in emulated_cuda.launched]
    want = "mhc_dynamic_coeffs_pre_bf16_n4" + ("_t1" if phi_dtype == mx.bfloat16 else "")
    assert want in names, names
    # its consts, as phi_split's: the backward reads the alphas and b from them (not MLX's small arrays)
    seed = seed_of("consts", "cuda", B, n, C, "bfloat16")
    x = _x((B, n, C), "bfloat16", seed)
    phi, b, *alphas = _params(n, C, seed, phi_dtype=phi_dtype)
    alphas = [a.reshape(1) for a in alphas]
    G = cuda_dynamic.coeffs_pre_groups(B, n, C, mx.bfloat16, phi_dtype)
    terms = 1 if phi_dtype == mx.bfloat16 else 3  # the variant the forward launched
    with testing.poisoned_outputs():
        consts = cuda_dynamic._coeffs_pre(x, phi, b, *alphas, dynamic.Config(**CFG), G, phi_terms=terms)[6]
    want_consts = mx.concatenate([*alphas, b])
    assert mx.array_equal(consts, want_consts).item(), (consts, want_consts)


def _coeffs_pre_on_gpu(monkeypatch):
    """mhc_dynamic_coeffs_pre switched on at any shape (CP_MIN_T, CP_SHAPES) for a GPU test, which skips off sm_90 (its one
    cubin is sm_90a: TMA); returns mhc_aot.cuda_dynamic."""
    from mhc_aot import cuda_dynamic

    if cuda_dynamic.device.mlx_arch_number() != cuda_dynamic.CP_ARCH:
        pytest.skip(f"mhc_dynamic_coeffs_pre is built for sm_{cuda_dynamic.CP_ARCH}a only (TMA)")
    monkeypatch.setattr(cuda_dynamic, "CP_MIN_T", 1)
    monkeypatch.setattr(cuda_dynamic, "CP_SHAPES", False)
    # and the few-token kernel off, whose rule comes first: up to PROJ_MAX_T tokens it took these tests'
    # small shapes instead (from session 29 to 49, unnoticed: the tests checked the rule, not the route)
    monkeypatch.setattr(cuda_dynamic, "PROJ_MAX_T", None)
    return cuda_dynamic


def _assert_route(cuda_dynamic, B, n, C, want, phi_dtype=mx.float32, with_pre=(True,)):
    """bfloat16 x [B, n, C]'s coefficients take path `want` (cuda_dynamic.coeffs_path), with and without x_in
    as with_pre lists: a test of one kernel asserts its route, not only that kernel's own rule."""
    for wp in with_pre:
        path = cuda_dynamic.coeffs_path(B, n, C, mx.bfloat16, phi_dtype, CFG["tmax"], wp)
        assert path == want, f"({B}, {n}, {C}) with_pre={wp} would run {path}, not {want}"


@pytest.mark.gpu
@pytest.mark.skipif(not mx.cuda.is_available(), reason="MLX reports no cuda device")
@pytest.mark.parametrize("B,n,C", [(8192, 4, 4096), (300, 4, 200), (70, 3, 216), (2048, 2, 1000), (1, 1, 8),
                                   (33, 4, 136)])
def test_gpu_coeffs_pre(monkeypatch, B, n, C):
    """mhc_dynamic_coeffs_pre on the GPU (TMA: sm_90 only; here at any shape, not only its rule's),
    forward and every gradient (its mix, invr and h_pre feed the backward
    kernels) against the Liger port; second boxes partly and wholly past C (C = 200, 136, 8)."""
    _assert_route(_coeffs_pre_on_gpu(monkeypatch), B, n, C, "one-read")
    _check_forward("cuda", B, n, C, "bfloat16")
    if B * C <= 2048 * 1000:
        _check_gradients("cuda", B, n, C, "bfloat16")


@pytest.mark.gpu
@pytest.mark.skipif(not mx.cuda.is_available(), reason="MLX reports no cuda device")
@pytest.mark.parametrize("B,n,C", [(8192, 4, 4096), (300, 4, 200), (70, 3, 216)])
def test_gpu_coeffs_pre_bfloat16_phi(monkeypatch, B, n, C):
    """mhc_dynamic_coeffs_pre's one-term variant (a bfloat16 phi) on the GPU against the float64 port."""
    _assert_route(_coeffs_pre_on_gpu(monkeypatch), B, n, C, "one-read", mx.bfloat16)
    _check_forward("cuda", B, n, C, "bfloat16", phi_dtype=mx.bfloat16)
    if B * C <= 2048 * 1000:
        _check_gradients("cuda", B, n, C, "bfloat16", phi_dtype=mx.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not mx.cuda.is_available(), reason="MLX reports no cuda device")
@pytest.mark.parametrize("B,n,C", [(8192, 4, 4096), (300, 4, 200), (70, 3, 216)])
def test_gpu_coeffs_pre_bfloat16_phi_unaligned(monkeypatch, B, n, C):
    """phi one element past a 16-byte boundary (a view into a longer array: MLX's Slice and Reshape share
    the buffer) makes mhc_dynamic_coeffs_pre's one-term variant stage phi element by element instead of
    with 16-byte copies. The same values, so the same bits as the aligned phi gives (checked against the
    float64 port in test_gpu_coeffs_pre_bfloat16_phi), in every output."""
    _assert_route(_coeffs_pre_on_gpu(monkeypatch), B, n, C, "one-read", mx.bfloat16)
    x = _x((B, n, C), "bfloat16", seed_of("unaligned", "cuda", B, n, C, "bfloat16"))
    phi, b, ap, apo, ar = _params(n, C, 7, phi_dtype=mx.bfloat16)
    longer = mx.concatenate([mx.zeros((1,), mx.bfloat16), phi.reshape(-1)])
    mx.eval(longer)
    shifted = longer[1:].reshape(phi.shape)
    assert mx.array_equal(shifted, phi).item()
    outs = [ops.mhc_coeffs_pre(x, p, b, ap, apo, ar, **CFG, backend="cuda") for p in (phi, shifted)]
    mx.eval(outs)
    for name, got, want in zip(("h_pre", "h_post", "h_res", "x_in"), outs[1], outs[0]):
        assert mx.array_equal(got, want).item(), f"{name} differs with phi at an offset of one element"


@pytest.mark.gpu
@pytest.mark.skipif(not mx.cuda.is_available(), reason="MLX reports no cuda device")
def test_gpu_coeffs_pre_shared_sync(monkeypatch):
    """Launches of mhc_dynamic_coeffs_pre on one sync buffer in sequence (as when mx.compile merges two
    equal zeros arrays of a graph): each launch counts on from the counters the one before left (its
    tickets' epoch), so on new x it gives exactly what it gives on a fresh buffer, and after k launches
    every counter reads k times its one-launch count. 32 tiles a group: the partial slots are reused
    within each launch too."""
    cuda_dynamic = _coeffs_pre_on_gpu(monkeypatch)
    _check_coeffs_pre_shared_sync(cuda_dynamic, 16384, 4, 1024, (1, 2, 3))


def _check_coeffs_pre_shared_sync(cuda_dynamic, T, n, C, seeds, left=None):
    """left(): the counters a launch left (None: the shared buffer itself, which the GPU kernel writes in place;
    the emulator's launches write a copy, which the next launch is then given)."""
    G = cuda_dynamic.coeffs_pre_groups(T, n, C, mx.bfloat16)
    assert G > 0
    S, tiles = cuda_dynamic._cdiv(C, cuda_dynamic.CP_CW), cuda_dynamic._cdiv(T, cuda_dynamic.CP_TT)
    sync = mx.zeros((cuda_dynamic.coeffs_pre_sync_len(T),), mx.int32)
    mx.eval(sync)
    phi, b, ap, apo, ar = _params(n, C, 0)
    args = (phi, b, ap.reshape(1), apo.reshape(1), ar.reshape(1), dynamic.Config(**CFG), G)
    for k, seed in enumerate(seeds, 1):
        x = _x((T, n, C), "bfloat16", seed)
        shared = cuda_dynamic._coeffs_pre(x, *args, sync=sync)
        mx.eval(shared)
        counts = np.array(sync) if left is None else left()
        fresh = cuda_dynamic._coeffs_pre(x, *args)
        for name, got, want in zip(("h_pre", "h_post", "h_res", "x_in", "mix", "invr"), shared, fresh):
            assert mx.array_equal(got, want).item(), f"launch {k} on the shared buffer: {name} differs"
        # tickets, then every tile's projected count (its group's S splits), then every group's ready count
        want = np.concatenate([[k * G * S], np.full(tiles, k * S), np.full(G, k * S), np.zeros(tiles - G)])
        assert (counts == want).all(), f"launch {k}: counters {counts.tolist()} != {want.tolist()}"
        if left is not None:
            sync = mx.array(counts)


@pytest.mark.gpu
@pytest.mark.skipif(not mx.cuda.is_available(), reason="MLX reports no cuda device")
def test_gpu_coeffs_pre_two_launches_one_graph(monkeypatch):
    """Two data-independent launches of mhc_dynamic_coeffs_pre in one mx.compile'd graph (two inputs of
    one shape): each needs counters of its own. mx.compile merges equal zeros arrays into one buffer, and
    MLX's CUDA graph orders kernels by their arrays only, so two launches that read one zeroed buffer and
    nothing of each other's may run at once."""
    _coeffs_pre_on_gpu(monkeypatch)
    T, n, C = 4096, 4, 2048
    phi, b, ap, apo, ar = _params(n, C, 0, phi_dtype=mx.bfloat16)

    def one(x):
        return ops.mhc_coeffs_pre(x, phi, b, ap, apo, ar, **CFG, backend="cuda")

    both = mx.compile(lambda x1, x2: (one(x1), one(x2)))
    for seed in (1, 3, 5):
        xs = [_x((T, n, C), "bfloat16", seed + k) for k in range(2)]
        mx.eval(xs)
        got = both(*xs)
        mx.eval(got)
        for k in range(2):
            want = one(xs[k])
            mx.eval(want)
            for name, g, w in zip(("h_pre", "h_post", "h_res", "x_in"), got[k], want):
                assert mx.array_equal(g, w).item(), f"inputs {seed}: launch {k}'s {name} differs from its own launch"


@pytest.mark.gpu
@pytest.mark.skipif(not mx.cuda.is_available(), reason="MLX reports no cuda device")
def test_gpu_coeffs_pre_polls_back_to_back(monkeypatch):
    """mhc_dynamic_coeffs_pre compiled with its polls back to back (MHC_CP_SPIN_NS=0: no sleep between
    counter reads) gives the shipped kernel's bits in every launch (scripts/gpu_coeffs_pre_stress.py: the
    kernel sums in a fixed order, so any difference is a race). Session 46, H100: with relaxed counter
    reads this variant formed x_in from h_pre as it was before the coefficient warps wrote it in 12 of 12
    launches at both shapes; with acquiring reads in none; session 47's tagged mailbox words (shipped):
    none."""
    import subprocess
    import sys

    _coeffs_pre_on_gpu(monkeypatch)
    monkeypatch.syspath_prepend(str(ROOT))
    from build_tools.cuda import find_nvcc

    if find_nvcc() is None:
        pytest.skip("no nvcc here to compile the variant")
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_coeffs_pre_stress.py"), "--launches", "6",
                          "--configs", "8192:4:4096,4096:4:2048", "spin0=:MHC_PHI_TERMS=1:MHC_CP_SPIN_NS=0"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert run.stdout.count("0 of 6 launches differ") == 2, run.stdout[-4000:]


def _proj_cluster_on(monkeypatch, sms: int | None = None):
    """mhc_dynamic_proj_cluster's rule switched on for a test: CUDA graphs off (its one condition that a
    device cannot give), from one token; with `sms`, an emulated sm_90 of that many SMs."""
    from mhc_aot import cuda_dynamic

    monkeypatch.setenv("MLX_USE_CUDA_GRAPHS", "0")
    monkeypatch.setattr(cuda_dynamic, "PROJ_CLUSTER", True)  # off by default (slower so far)
    monkeypatch.setattr(cuda_dynamic, "PC_MIN_T", 1)
    monkeypatch.setattr(cuda_dynamic, "CP_MIN_T", None)  # coeffs_pre's rule comes first where it holds
    monkeypatch.setattr(cuda_dynamic, "PROJ_MAX_T", None)  # and the few-token kernel's before both
    if sms is not None:
        monkeypatch.setattr(cuda_dynamic.device, "mlx_arch_number", lambda: cuda_dynamic.PC_ARCH)
        monkeypatch.setattr(cuda_dynamic.device, "max_shared_memory_per_block", lambda: cuda_dynamic.cuda.SMEM_LIMIT)
        monkeypatch.setattr(cuda_dynamic.device, "resident_ctas_per_sm", lambda shared_bytes: 1)
        monkeypatch.setattr(cuda_dynamic.device, "sm_count", lambda: sms)
    return cuda_dynamic


def test_tma_template_is_one_array_per_map(monkeypatch):
    """A TMA template is one array per map for the process, not a new one per launch: MLX 0.32.4 keeps an
    array made from host data in CUDA managed memory, and a new one every launch page-faulted each
    launch's first reads (session 41, H100: 68 us before the one-read kernel's first tile, 15.9 reused).
    Another map (shape) is another array with its own bytes; CACHE_ARRAYS = 0 (the A/B's control) makes
    a new array each time."""
    from mhc_aot import cuda_dynamic, tma

    monkeypatch.setattr(tma, "encode", tensor_map)
    a = cuda_dynamic._x_tile_map(8192, 4, 4096, cuda_dynamic.CP_BOXC, cuda_dynamic.CP_TT)
    assert cuda_dynamic._x_tile_map(8192, 4, 4096, cuda_dynamic.CP_BOXC, cuda_dynamic.CP_TT) is a
    b = cuda_dynamic._x_tile_map(1024, 4, 4096, cuda_dynamic.CP_BOXC, cuda_dynamic.CP_TT)
    assert b is not a and a.shape == b.shape == (32,) and a.dtype == mx.uint32
    assert not mx.array_equal(a, b).item()  # the map's dims differ (T)
    monkeypatch.setattr(tma, "CACHE_ARRAYS", 0)
    c = cuda_dynamic._x_tile_map(8192, 4, 4096, cuda_dynamic.CP_BOXC, cuda_dynamic.CP_TT)
    assert c is not a and mx.array_equal(c, a).item()


def test_coeffs_pre_sync_per_launch(monkeypatch):
    """Two launches of mhc_dynamic_coeffs_pre traced into one mx.compile'd graph get counter buffers of
    different lengths, each at least what the kernel reads, so the graph cannot merge them into one
    buffer (mx.compile merges equal zeros arrays; the GPU test test_gpu_coeffs_pre_two_launches_one_graph
    shows what sharing does). The launches are stand-ins that record their counter buffers."""
    from mhc_aot import cuda_dynamic

    seen = []

    def launch(name, tag, n, inputs, shapes, dtypes, *rest, **kw):
        seen.append(inputs[7].shape)
        ticket = mx.sum(inputs[7])  # outputs that read the buffer, as the kernel does
        return [mx.zeros(shape, dt) + ticket.astype(dt) for shape, dt in zip(shapes, dtypes)]

    monkeypatch.setattr(cuda_dynamic, "_launch", launch)
    monkeypatch.setattr(cuda_dynamic, "_x_tile_map", lambda *shape: mx.zeros((32,), mx.uint32))  # (needs libcuda)
    T, n, C, G = 64, 4, 256, 1
    phi, b, ap, apo, ar = _params(n, C, 0)
    args = (phi, b, ap.reshape(1), apo.reshape(1), ar.reshape(1), dynamic.Config(**CFG), G)

    def two(x1, x2):
        return cuda_dynamic._coeffs_pre(x1, *args)[3], cuda_dynamic._coeffs_pre(x2, *args)[3]

    mx.eval(mx.compile(two)(mx.zeros((T, n, C), mx.bfloat16), mx.ones((T, n, C), mx.bfloat16)))
    assert len(seen) == 2 and seen[0] != seen[1], seen
    assert min(s[0] for s in seen) >= cuda_dynamic.coeffs_pre_sync_len(T), seen


def test_coeffs_pre_rule(monkeypatch):
    """The default dispatch takes mhc_dynamic_coeffs_pre (x read once) from CP_MIN_T tokens for bfloat16
    x and phi, n <= 4, tokens of at least CP_MIN_K values and C <= CP_MAX_C on sm_90 (where it was timed
    ahead), and not elsewhere; its grid the groups of 32 CTAs the SMs hold, at most one per tile."""
    from mhc_aot import cuda_dynamic

    monkeypatch.setattr(cuda_dynamic.device, "mlx_arch_number", lambda: cuda_dynamic.CP_ARCH)
    monkeypatch.setattr(cuda_dynamic.device, "max_shared_memory_per_block", lambda: cuda_dynamic.cuda.SMEM_LIMIT)
    monkeypatch.setattr(cuda_dynamic.device, "resident_ctas_per_sm", lambda shared_bytes: 1)
    monkeypatch.setattr(cuda_dynamic.device, "sm_count", lambda: 132)
    bf = mx.bfloat16
    assert cuda_dynamic.coeffs_pre_groups(8192, 4, 4096, bf) == 4  # 132 SMs // 32 CTAs a group
    assert cuda_dynamic.coeffs_pre_groups(1024, 4, 4096, bf) == 4
    assert cuda_dynamic.coeffs_pre_groups(16384, 4, 4096, bf) == 4
    for args in [(1023, 4, 4096, bf), (8192, 4, 2048, bf), (8192, 2, 4096, bf), (8192, 4, 4104, bf),
                 (8192, 4, 8192, bf), (8192, 5, 4096, bf), (8192, 4, 4096, mx.float16), (8192, 4, 4096, mx.float32),
                 (8192, 4, 4092, bf), (8192, 4, 4096, bf, mx.float32)]:
        assert cuda_dynamic.coeffs_pre_groups(*args) == 0, args
    # the path the layer's forward takes, as `mhc bench` reports it (few tokens: the few-token kernel first)
    paths = {args: cuda_dynamic.coeffs_path(*args, 20, True) for args in
             [(8192, 4, 4096, bf, bf), (1024, 4, 4096, bf, bf), (32, 4, 4096, bf, bf), (8192, 4, 2048, bf, bf),
              (8192, 4, 4096, bf, mx.float32)]}
    assert list(paths.values()) == ["one-read", "one-read", "few-token", "projection", "projection"], paths
    assert cuda_dynamic.coeffs_path(8192, 4, 4096, bf, bf, 20, False) == "projection"  # mhc_coeffs: no x_in
    monkeypatch.setattr(cuda_dynamic, "CP_SHAPES", False)  # the tests' and A/B scripts' switch: any shape
    assert cuda_dynamic.coeffs_pre_groups(8192, 4, 2048, bf) == 8
    assert cuda_dynamic.coeffs_pre_groups(8192, 2, 4096, bf) == 4
    monkeypatch.setattr(cuda_dynamic, "CP_MIN_T", None)
    assert cuda_dynamic.coeffs_pre_groups(8192, 4, 4096, bf) == 0
    monkeypatch.setattr(cuda_dynamic.device, "mlx_arch_number", lambda: 100)  # its one cubin is sm_90a
    monkeypatch.setattr(cuda_dynamic, "CP_MIN_T", 1024)
    assert cuda_dynamic.coeffs_pre_groups(8192, 4, 4096, bf) == 0


def test_proj_cluster_rule(monkeypatch):
    """mhc_dynamic_proj_cluster only where MLX launches kernels directly (its graph cache would launch
    later kernels in clusters), for bfloat16 x and phi, n <= 4 and a whole cluster's columns; its grid
    as many clusters as the SMs hold, at most one per tile."""
    cuda_dynamic = _proj_cluster_on(monkeypatch, sms=132)
    bf = mx.bfloat16
    assert cuda_dynamic.proj_cluster_clusters(8192, 4, 4096, bf, bf) == 16
    assert cuda_dynamic.proj_cluster_clusters(40, 4, 4096, bf, bf) == 3  # 16-token tiles
    monkeypatch.setenv("MLX_USE_CUDA_GRAPHS", "1")
    assert cuda_dynamic.proj_cluster_clusters(8192, 4, 4096, bf, bf) == 0
    monkeypatch.setenv("MLX_USE_CUDA_GRAPHS", "0")
    for args in [(8192, 4, 4096, bf, mx.float32), (8192, 4, 4096, mx.float16, mx.float16), (8192, 5, 4096, bf, bf),
                 (8192, 4, 2048, bf, bf), (8192, 4, 4104, bf, bf), (8192, 4, 4092, bf, bf)]:
        assert cuda_dynamic.proj_cluster_clusters(*args) == 0, args
    monkeypatch.setattr(cuda_dynamic, "PROJ_CLUSTER", False)
    assert cuda_dynamic.proj_cluster_clusters(8192, 4, 4096, bf, bf) == 0


def _check_proj_cluster(B, n, C):
    """The forward with mhc_dynamic_proj_cluster against the float64 port (_check_forward), and its x_in
    equal, bit for bit, to mhc_pre's on the h_pre it returns (both sum the same floats in one order)."""
    _check_forward("cuda", B, n, C, "bfloat16", phi_dtype=mx.bfloat16)
    seed = seed_of("fwd", "cuda", B, n, C, "bfloat16")
    x = _x((B, n, C), "bfloat16", seed)
    params = _params(n, C, seed, phi_dtype=mx.bfloat16)
    h_pre, _, _, x_in = _run(ops.mhc_coeffs_pre, x, *params, **CFG, backend="cuda")
    again = _run(ops.mhc_pre, x, h_pre, backend="cuda")
    assert mx.array_equal(x_in, again).item(), f"B={B} n={n} C={C}: x_in differs from mhc_pre(x, h_pre)"


@pytest.mark.parametrize("B,n,C,sms", [(40, 4, 4096, 16), (70, 3, 3592, 8), (17, 1, 4000, 24)],
                         ids=["two-clusters-ragged-tile", "n3-last-rank-partly-past-C", "n1-one-tile-each"])
@pytest.mark.parametrize("emulated_cuda", ["elems", "cta"], indirect=True)  # cta: the coefficients' mode below 1024 tokens
def test_emulated_cuda_proj_cluster(emulated_cuda, copy_timing, monkeypatch, B, n, C, sms):
    """mhc_dynamic_proj_cluster (the projection and x_in in one read of x; a cluster of 8 CTAs splits a
    token's columns and sums its partials through distributed shared memory) under the emulation: a
    cluster walking two or three tiles (a ragged last one), the last rank's columns partly past C, n < 4;
    TMA copies landing at issue and at their wait."""
    _proj_cluster_on(monkeypatch, sms)
    _check_proj_cluster(B, n, C)
    names = [nm for nm, _ in emulated_cuda.launched]
    # mhc_coeffs_pre, the first op checked: this kernel, then the coefficients from its sums (no proj_tc, no pre)
    assert names[:2] == ["mhc_dynamic_proj_cluster_bf16_n4", "mhc_dynamic_coeffs_bf16_n4"], names


@pytest.mark.gpu
@pytest.mark.skipif(not mx.cuda.is_available(), reason="MLX reports no cuda device")
@pytest.mark.skipif(dispatch.cuda_graphs(), reason="mhc_dynamic_proj_cluster runs only with MLX_USE_CUDA_GRAPHS=0 "
                    "(MLX's graph cache would launch later kernels of this process in clusters)")
@pytest.mark.parametrize("B,n,C", [(8192, 4, 4096), (1000, 4, 4096), (300, 3, 3592), (33, 1, 4000)])
def test_gpu_proj_cluster(monkeypatch, B, n, C):
    """mhc_dynamic_proj_cluster on the GPU (sm_90, graphs off): forward against the float64 port, x_in
    equal to mhc_pre's on its h_pre, gradients through it at the smaller shapes."""
    cuda_dynamic = _proj_cluster_on(monkeypatch)
    if cuda_dynamic.device.mlx_arch_number() != cuda_dynamic.PC_ARCH:
        pytest.skip(f"mhc_dynamic_proj_cluster is built for sm_{cuda_dynamic.PC_ARCH}a only")
    _assert_route(cuda_dynamic, B, n, C, "cluster", mx.bfloat16)  # (few-token at T <= 1024 until session 49)
    _check_proj_cluster(B, n, C)
    if B * C <= 1000 * 4096:
        _check_gradients("cuda", B, n, C, "bfloat16", phi_dtype=mx.bfloat16)


# ---------------------------------------------------------------- Metal, emulated on the CPU
# The Metal kernels of dynamic mHC (metal_src/mhc_dynamic_*.metal: the coefficients forward, pre,
# post_res and their backward) run under the CPU emulation of tests/metal_emulation.py through
# mhc_aot.metal_dynamic's launchers; the coefficients' projection (an MLX matmul) and backward (MLX's
# VJP) are MLX ops by dispatch rule. Cases: compile-time n (n <= 4) and the generic kernels (n = 5,
# 16, and n = 33 above the coefficient kernel's limit: MLX-op coefficients, the pre kernel's x_in),
# 4-column vectors (C % 4 == 0) and the scalar path, more than one threadgroup of columns (C > 1024),
# every dtype.
METAL_EMU_CASES = [((3, 4, 40), "float32"), ((3, 4, 40), "bfloat16"), ((5, 2, 33), "float32"), ((2, 5, 16), "float16"),
                   ((9, 1, 9), "bfloat16"), (((2, 2), 16, 8), "float32"), ((2, 3, 1030), "float16"),
                   ((2, 4, 2052), "float32"), ((2, 33, 4), "float32")]
METAL_KERNELS = ("mhc_dynamic_coeffs", "mhc_dynamic_coeffs_bwd", "mhc_dynamic_pre", "mhc_dynamic_pre_bwd",
                 "mhc_dynamic_post_res", "mhc_dynamic_post_res_bwd")


@pytest.fixture(scope="module")
def _metal_emulations():
    import metal_emulation

    return metal_emulation.emulations()


@pytest.fixture
def emulated_metal(_metal_emulations, monkeypatch):
    import metal_emulation

    metal_emulation.patch(monkeypatch, _metal_emulations)
    _metal_emulations.launched.clear()
    return _metal_emulations


def _launched_sources(launched):
    """The kernel sources behind variant names (mhc_dynamic_pre_bf16_n4 -> mhc_dynamic_pre)."""
    return {next(s for s in sorted(METAL_KERNELS, key=len, reverse=True) if name.startswith(s + "_"))
            for name in launched}


@pytest.mark.parametrize("shape,dtype_name", METAL_EMU_CASES, ids=[f"{s}-{d}" for s, d in METAL_EMU_CASES])
def test_emulated_metal_kernels_vs_liger64(emulated_metal, shape, dtype_name):
    from mhc_aot import metal_dynamic

    B, n, C = shape
    _check_forward("metal", B, n, C, dtype_name)
    _check_gradients("metal", B, n, C, dtype_name)
    want = set(METAL_KERNELS) - ({"mhc_dynamic_coeffs", "mhc_dynamic_coeffs_bwd"} if n > metal_dynamic.COEFFS_N_LIMIT
                                 else set())
    assert _launched_sources(emulated_metal.launched) == want


@pytest.mark.parametrize("B,n,C,dtype_name,f_dtype", [((2, 3), 4, 32, "float32", mx.float32),
                                                      (5, 3, 17, "bfloat16", mx.bfloat16),
                                                      (6, 4, 20, "float16", mx.float16)])
def test_emulated_metal_layer_vs_liger64(emulated_metal, monkeypatch, B, n, C, dtype_name, f_dtype):
    """DynamicMHC on Metal, forward and every gradient: the coefficients with x_in fused and their
    backward, the post-combine and its backward (F in x's dtype) as kernels. h_pre, which the layer
    discards, has a zero cotangent that is never passed: the backward kernel gets has_dh_pre 0."""
    from mhc_aot import metal

    real, flags = metal._launch, []

    def spy(source, *args):
        if source == "mhc_dynamic_coeffs_bwd":
            flags.append(args[5][7])  # the scalars' has_dh_pre
        return real(source, *args)

    monkeypatch.setattr(metal, "_launch", spy)
    _check_layer("metal", B, n, C, dtype_name, f_dtype)
    assert flags == [0], flags
    assert _launched_sources(emulated_metal.launched) == {"mhc_dynamic_coeffs", "mhc_dynamic_coeffs_bwd",
                                                          "mhc_dynamic_post_res", "mhc_dynamic_post_res_bwd"}


def test_emulated_metal_config(emulated_metal):
    """A configuration other than Liger's defaults, forward and every gradient."""
    _check_forward("metal", 6, 4, 37, "float32", CFG_OTHER)
    _check_gradients("metal", 6, 4, 37, "float32", cfg=CFG_OTHER)
    _check_gradients("metal", 5, 6, 16, "float32", cfg=CFG_OTHER)  # the generic kernels


def test_emulated_metal_coeffs_without_pre_and_documented_exit(emulated_metal, monkeypatch):
    """mhc_coeffs alone (no x_in: its slots unread), and a Sinkhorn history over the backward kernel's
    threadgroup pool taking MLX's VJP (documented), both matching Liger; the pool's size is the
    kernel's."""
    from mhc_aot import metal_dynamic

    text = (ROOT / "metal_src" / "mhc_dynamic_coeffs_bwd.metal").read_text()
    assert f"POOL = {metal_dynamic.COEFFS_BWD_POOL};" in text
    _check_gradients("metal", 6, 3, 24, "float32", with_pre=False)
    assert "mhc_dynamic_coeffs_bwd" in _launched_sources(emulated_metal.launched)
    emulated_metal.launched.clear()
    monkeypatch.setattr(metal_dynamic, "COEFFS_BWD_POOL", metal_dynamic.coeffs_bwd_floats(3, CFG["tmax"], 4) - 1)
    _check_gradients("metal", 6, 3, 24, "float32")
    assert "mhc_dynamic_coeffs_bwd" not in _launched_sources(emulated_metal.launched)


def test_metal_dispatch_of_the_dynamic_ops():
    """Metal: kernels up to the streams their threadgroup memory holds, MLX ops above (documented
    rules, not exceptions)."""
    from mhc_aot import metal, metal_dynamic

    limit, coeffs_limit = dispatch.METAL_GENERIC_N_LIMIT, dispatch.METAL_COEFFS_N_LIMIT
    assert limit == metal.GENERIC_N_LIMIT and coeffs_limit == metal_dynamic.COEFFS_N_LIMIT
    for op in ("mhc_pre", "mhc_post_res"):
        assert dispatch.choose(op, 4, 4096, "metal", B=8192).strategy == "fused"
        assert dispatch.choose(op, limit, 7, "metal", B=1).strategy == "fused"
        assert dispatch.choose(op, limit + 1, 7, "metal", B=1).strategy == "portable"
    assert dispatch.choose("mhc_coeffs", 4, 4096, "metal", B=8192).strategy == "fused"
    assert dispatch.choose("mhc_coeffs", coeffs_limit, 7, "metal", B=1).strategy == "fused"
    assert dispatch.choose("mhc_coeffs", coeffs_limit + 1, 7, "metal", B=1).strategy == "portable"


# ---------------------------------------------------------------- MLX's TF32 default
# float32 gradient checks that the portable path failed on the H200 with MLX_ENABLE_TF32 on (session 26)
TF32_CHECKS = ["test_dynamic.py::test_gradients_vs_liger64[{}-4-8-15-float32]",
               "test_dynamic.py::test_gradients_vs_liger64[{}-2-16-7-float32]"]


@pytest.mark.gpu
@NEEDS_CUDA
def test_cuda_kernels_float32_exact_with_mlx_tf32_on():
    """The suite runs with MLX_ENABLE_TF32=0 (conftest.py); with MLX's default the dynamic CUDA kernels'
    float32 gradients still pass (the projection, dx and dphi are kernels, not MLX matmuls), while the
    portable path's fail, which shows the setting took effect."""
    assert_kernels_exact_with_tf32(TF32_CHECKS)
