"""mhc_aot.reference, the source of truth, against float64 numpy and against mhc-mlx's reference.

The reference returns float32 whatever the input dtype (it accumulates in float32 and does not
round its result), so it is held to the float32 tolerance for every input dtype.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from backends import (DTYPE_NAMES, dispatch_edges, forward64, import_mhc_mlx, leading, mix_add64, random_M, rel_error64,
                      seed_of, sinkhorn64, to64, value64)
from mhc_aot import reference, testing

# ---------------------------------------------------------------- shape table
# (leading dims, n, C). The reference has no dispatch, but the table still straddles every limit
# of dispatch.RULES so its numerics are known on both sides of every kernel split.
SHAPES = [
    (1, 1, 1), (3, 1, 8), (2, 2, 1), (4, 2, 7), (1, 3, 33), (5, 4, 64), ((2, 3), 4, 65), (9, 4, 8191),
    (1, 8, 4097), (2, 32, 129), (1, 64, 513), (2, 100, 3), (1, 100, 329), (1, 2, 8192),
    *dispatch_edges("mhc_forward"),
]
SINKHORN_N = [1, 2, 3, 4, 8, 16, 32, 64, 100]

# ---------------------------------------------------------------- tolerance table
F32_TOL = testing.tolerance(mx.float32)  # the reference's output is float32 for every input dtype
F64_TOL = 1e-12  # the float64 ground truth of the gradient tests vs numpy: float64 rounding only


# ---------------------------------------------------------------- reference: float64 numpy
def numpy_stream_mix_add(x, M, bias):
    return np.einsum("ij,bjc->bic", to64(M), to64(x)) + to64(bias)


def _case(B, n, C, dtype_name, *salt):
    seed = seed_of("reference", B, n, C, dtype_name, *salt)
    params = testing.random_params(n, C, seed)
    x = testing.random_input((*leading(B), n, C), testing.DTYPES[dtype_name], seed)
    return params, x.reshape(-1, n, C)


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("B,n,C", SHAPES)
def test_mhc_forward_vs_numpy64(B, n, C, dtype_name):
    params, x = _case(B, n, C, dtype_name)
    out = reference.mhc_forward(x, **params)
    assert out.dtype == mx.float32 and out.shape == x.shape
    err = rel_error64(out, testing.numpy_forward(x, **params))
    assert err < F32_TOL, f"reference vs float64 numpy: {err:.3e}"


@pytest.mark.parametrize("iters,eps", [(0, 1e-5), (1, 1e-5), (7, 1e-3), (50, 1e-6)])
def test_mhc_forward_iters_eps_vs_numpy64(iters, eps):
    params, x = _case(3, 5, 17, "float32", iters, eps)
    out = reference.mhc_forward(x, **params, iters=iters, eps=eps)
    ref = testing.numpy_forward(x, **params, iters=iters, eps=eps)
    assert rel_error64(out, ref) < F32_TOL


@pytest.mark.parametrize("scale", [0.1, 1.0, 4.0])
@pytest.mark.parametrize("n", SINKHORN_N)
def test_sinkhorn_vs_numpy64(n, scale):
    H = testing.random_params(n, 1, seed_of("sinkhorn", n, scale), scale)["H_res_raw"]
    M = reference.mixing_matrix(H)
    assert M.dtype == mx.float32 and M.shape == (n, n)
    assert rel_error64(M, testing.numpy_sinkhorn(to64(H))) < F32_TOL
    # the last step normalises columns: every column sums to one
    np.testing.assert_allclose(to64(M).sum(axis=0), 1.0, atol=10 * F32_TOL)


def test_sinkhorn_conventions():
    """A column of negligible mass (<= eps) becomes zero; a row of such mass is left unchanged."""
    H = mx.array([[0.0, -200.0, 0.0], [0.0, -200.0, 1.0], [0.5, -200.0, 0.0]])
    M = reference.mixing_matrix(H)
    assert np.all(to64(M)[:, 1] == 0.0)
    assert rel_error64(M, testing.numpy_sinkhorn(to64(H))) < F32_TOL
    P = mx.array([[1e-7, 1e-7], [1.0, 2.0]])  # row 0 sums to <= eps: unscaled; row 1 / 3; then columns
    rows = np.array([[1e-7, 1e-7], [1 / 3, 2 / 3]])
    np.testing.assert_allclose(to64(reference.sinkhorn_knopp(P, iters=1)),
                               rows / rows.sum(axis=0, keepdims=True), rtol=10 * F32_TOL)
    assert rel_error64(reference.mixing_matrix(H, iters=0), np.exp(to64(H) - to64(H).max(1, keepdims=True))) < F32_TOL


def test_identity_init_mixing_is_identity():
    for n in (1, 4, 32):
        H = mx.full((n, n), -12.0) + 12.0 * mx.eye(n)
        assert np.abs(to64(reference.mixing_matrix(H)) - np.eye(n)).max() < n * np.exp(-12.0)


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("B,n,C", [(4, 3, 33), (2, 8, 64), (1, 100, 5)])
def test_pieces_vs_numpy64(B, n, C, dtype_name):
    params, x = _case(B, n, C, dtype_name)
    H_pre, H_post = reference.activate_pre_post(params["H_pre_raw"], params["H_post_raw"])
    assert rel_error64(H_pre, 1 / (1 + np.exp(-to64(params["H_pre_raw"])))) < F32_TOL
    assert rel_error64(H_post, 2 / (1 + np.exp(-to64(params["H_post_raw"])))) < F32_TOL
    agg = reference.stream_aggregate(x, H_pre)
    agg64 = np.einsum("j,bjc->bc", to64(H_pre), to64(x))
    assert rel_error64(agg, agg64) < F32_TOL
    w = to64(params["rms_weight"])
    y64 = agg64 / np.sqrt(np.mean(agg64**2, axis=-1, keepdims=True) + 1e-5) * w
    y = reference.rms_norm(agg, params["rms_weight"])
    assert rel_error64(y, y64) < F32_TOL
    assert rel_error64(reference.stream_distribute(y, H_post), to64(H_post)[None, :, None] * y64[:, None, :]) < F32_TOL
    M = random_M(n, seed_of("pieces", B, n, C))
    assert rel_error64(reference.stream_mix(x, M), np.einsum("ij,bjc->bic", to64(M), to64(x))) < F32_TOL


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("B,n,C", [(1, 1, 1), (3, 4, 65), (2, 32, 1024), (1, 100, 7)])
def test_stream_mix_add_vs_numpy64(B, n, C, dtype_name):
    seed = seed_of("ref-mix-add", B, n, C, dtype_name)
    dt = testing.DTYPES[dtype_name]
    x = testing.random_input((B, n, C), dt, seed)
    bias = testing.random_input((B, n, C), dt, seed + 1)
    M = random_M(n, seed)
    out = reference.stream_mix_add(x, M, bias)
    assert out.dtype == mx.float32
    assert rel_error64(out, numpy_stream_mix_add(x, M, bias)) < F32_TOL


@pytest.mark.parametrize("B,n,C", [(1, 1, 1), (3, 4, 65), (2, 100, 7)])
def test_float64_ground_truth(B, n, C):
    """backends.forward64 (MLX float64, differentiated for the gradient tests) is numpy's float64."""
    params, x = _case(B, n, C, "float32", "float64")
    ref = testing.numpy_forward(x, **params)
    assert rel_error64(value64(forward64, x, *params.values()), ref) < F64_TOL
    H = params["H_res_raw"]
    assert rel_error64(value64(sinkhorn64, H), testing.numpy_sinkhorn(to64(H))) < F64_TOL
    M = random_M(n, B)
    assert rel_error64(value64(mix_add64, x, M, x), numpy_stream_mix_add(x, M, x)) < F64_TOL


# ---------------------------------------------------------------- against the seed package mhc-mlx
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("B,n,C", [(1, 1, 1), (4, 2, 7), (5, 4, 64), (2, 8, 4097), (2, 32, 129), (1, 100, 329)])
def test_matches_mhc_mlx_reference(B, n, C, dtype_name):
    mhc_mlx = import_mhc_mlx()
    params, x = _case(B, n, C, dtype_name)
    ours = reference.mhc_forward(x, **params)
    theirs = mhc_mlx.reference.mhc_forward_reference(x, params["H_pre_raw"], params["H_post_raw"],
                                                     params["H_res_raw"], params["rms_weight"])
    assert rel_error64(ours, to64(theirs)) < F32_TOL
    M_theirs = mhc_mlx.reference.mixing_matrix_from_logits(params["H_res_raw"])
    assert rel_error64(reference.mixing_matrix(params["H_res_raw"]), to64(M_theirs)) < F32_TOL
