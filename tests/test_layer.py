"""MHCLayer and MHCRewire on every backend: against float64 numpy, the direct MHCRewire formula,
the seed package mhc-mlx (same parameters, same outputs), identity init, and mx.compile."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from backends import (BACKENDS, DTYPE_NAMES, NEEDS_CUDA, assert_bf16_factor, assert_close, assert_kernels_exact_with_tf32,
                      dispatch_edges, import_mhc_mlx, leading, rel_error64, run_forward, seed_of, to64)
from mhc_aot import MHCLayer, MHCRewire, reference, testing

# ---------------------------------------------------------------- shape table
# (leading dims, n, C); the ops' own files cover the full tables, the layer needs the spread:
# n = 1 and 100, C = 1 and 8192, B = 1 and many, leading dims, both sides of the dispatch limits.
SHAPES = [(1, 1, 1), (5, 2, 33), ((2, 3), 4, 64), (1, 4, 8192), (3, 8, 129), (2, 32, 16), (1, 100, 9),
          *dispatch_edges("mhc_forward")[:2]]
MHC_MLX_SHAPES = [(1, 1, 1), (4, 2, 7), (3, 4, 64), (2, 8, 4097), (2, 32, 129), (1, 100, 33)]
# MHCRewire: (leading dims, n, dims)
REWIRE_SHAPES = [((3,), 1, 8), ((2, 5), 4, 64), ((4,), 8, 120), ((1,), 32, 256)]

# ---------------------------------------------------------------- tolerance table
TOL = testing.TOLERANCES  # rel. error vs float64, per dtype of x
BF16_FACTOR = testing.BF16_REFERENCE_FACTOR

# ---------------------------------------------------------------- reference: float64 numpy
numpy_forward = testing.numpy_forward
PARAMS = ("H_pre_raw", "H_post_raw", "H_res_raw", "rms_weight")


def numpy_activations(layer):
    H_pre = 1 / (1 + np.exp(-to64(layer.H_pre_raw)))
    H_post = 2 / (1 + np.exp(-to64(layer.H_post_raw)))
    return H_pre, H_post, testing.numpy_sinkhorn(to64(layer.H_res_raw), layer.sinkhorn_iters, layer.eps)


def numpy_post_combine(layer, x, y_inner):
    """H_post * (y_inner + (M * H_pre) x) on x [..., n, C] (DESIGN.md section 1)."""
    H_pre, H_post, M = numpy_activations(layer)
    mixed = np.einsum("ij,...jc->...ic", M * H_pre[None, :], to64(x))
    return H_post[:, None] * (to64(y_inner) + mixed)


def random_layer(n, C, seed, backend, **kw) -> MHCLayer:
    layer = MHCLayer(n, C, backend=backend, **kw)
    layer.update(testing.random_params(n, C, seed))
    return layer


def _numpy_layer(layer, x):
    n, C = x.shape[-2:]
    return numpy_forward(x.reshape(-1, n, C), *(getattr(layer, p) for p in PARAMS),
                         iters=layer.sinkhorn_iters, eps=layer.eps).reshape(x.shape)


# ---------------------------------------------------------------- MHCLayer
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("B,n,C", SHAPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_vs_numpy64(backend, B, n, C, dtype_name):
    seed = seed_of("layer", backend, B, n, C, dtype_name)
    layer = random_layer(n, C, seed, backend)
    x = testing.random_input((*leading(B), n, C), testing.DTYPES[dtype_name], seed)
    out = run_forward(layer, x)
    assert out.shape == x.shape and out.dtype == x.dtype
    ref64 = _numpy_layer(layer, x)
    what = f"MHCLayer[{backend}] B={B} n={n} C={C} {dtype_name}"
    err = assert_close(out, ref64, TOL[x.dtype], what)
    if x.dtype == mx.bfloat16:
        ref = reference.mhc_forward(x.reshape(-1, n, C), *(getattr(layer, p) for p in PARAMS)).astype(mx.bfloat16)
        assert_bf16_factor(err, rel_error64(ref, ref64.reshape(-1, n, C)), BF16_FACTOR, what)


def test_parameters():
    layer = MHCLayer(3, 10)
    params = dict(nn.utils.tree_flatten(layer.trainable_parameters()))
    assert {k: (tuple(v.shape), v.dtype) for k, v in params.items()} == {
        "H_pre_raw": ((3,), mx.float32), "H_post_raw": ((3,), mx.float32),
        "H_res_raw": ((3, 3), mx.float32), "rms_weight": ((10,), mx.float32)}
    assert layer.backend == "auto"
    assert layer.sinkhorn_iters == reference.DEFAULT_ITERS and layer.eps == reference.DEFAULT_EPS
    plain = MHCLayer(3, 10, identity_init=False)
    assert all(np.all(to64(getattr(plain, p)) == 0) for p in PARAMS[:3]) and np.all(to64(plain.rms_weight) == 1)


@pytest.mark.parametrize("n,C", [(1, 1), (4, 64), (32, 33), (100, 8)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_identity_init(backend, n, C):
    """Identity init: out = M x + H_post y with M ~ I (off-diagonal mass exp(-12)), H_pre = H_post
    = sigmoid(-12) (x2): the identity on the streams plus the small distributed term it implies."""
    layer = MHCLayer(n, C, backend=backend)
    logit = -12.0
    assert np.all(to64(layer.H_pre_raw) == logit) and np.all(to64(layer.H_post_raw) == logit)
    assert np.array_equal(to64(layer.H_res_raw), logit * (1 - np.eye(n)))
    x = testing.random_input((6, n, C), mx.float32, seed_of("identity", backend, n, C))
    out = run_forward(layer, x)
    H_pre, H_post, M = numpy_activations(layer)
    agg = np.einsum("j,bjc->bc", H_pre, to64(x))
    y = agg / np.sqrt(np.mean(agg * agg, axis=-1, keepdims=True) + layer.eps)
    expected = to64(x) + H_post[None, :, None] * y[:, None, :]
    # the off-diagonal of M is all that separates out from `expected`
    off = np.linalg.norm(M - np.eye(n), 2)
    assert off < n * np.exp(-12.0)
    assert rel_error64(out, expected) < off + TOL[mx.float32]
    assert_close(out, _numpy_layer(layer, x), TOL[mx.float32], f"MHCLayer[{backend}] identity init")


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_layer(backend):
    n, C = 4, 40
    layer = random_layer(n, C, seed_of("compile-layer", backend), backend)
    x = testing.random_input((3, n, C), mx.float32, seed_of("compile-layer-x", backend))
    eager = run_forward(layer, x)
    assert_close(run_forward(mx.compile(layer), x), to64(eager), TOL[mx.float32], f"mx.compile(MHCLayer[{backend}])")
    # with the parameters as compiled state: an update is seen by the compiled function
    state = [layer.state]
    step = mx.compile(lambda x: layer(x), inputs=state, outputs=state)
    assert_close(run_forward(step, x), to64(eager), TOL[mx.float32], f"mx.compile(MHCLayer[{backend}], inputs=state)")
    layer.update(testing.random_params(n, C, seed_of("compile-layer-2", backend)))
    assert_close(run_forward(step, x), _numpy_layer(layer, x), TOL[mx.float32],
                 f"compiled MHCLayer[{backend}] after update")


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixing_matrix(backend):
    layer = random_layer(7, 3, seed_of("layer-M", backend), backend)
    M = run_forward(layer.mixing_matrix)
    assert rel_error64(M, numpy_activations(layer)[2]) < TOL[mx.float32]


# ---------------------------------------------------------------- against mhc-mlx
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("B,n,C", MHC_MLX_SHAPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_mhc_mlx(backend, B, n, C, dtype_name):
    mhc_mlx = import_mhc_mlx()
    seed = seed_of("mhc-mlx", backend, B, n, C, dtype_name)
    ours = random_layer(n, C, seed, backend)
    theirs = mhc_mlx.MHCLayer(n, C, use_metal=False, compile_reference=True)
    theirs.update(dict(ours.parameters()))
    x = testing.random_input((B, n, C), testing.DTYPES[dtype_name], seed)
    out = run_forward(ours, x)
    tol = TOL[x.dtype]
    their_reference = mhc_mlx.reference.mhc_forward_reference(x, *(getattr(ours, p) for p in PARAMS))
    for label, other in (("MHCLayer", theirs(x)), ("reference", their_reference)):
        err = rel_error64(out, to64(other))
        assert err < tol, f"MHCLayer[{backend}] vs mhc_mlx {label} B={B} n={n} C={C} {dtype_name}: {err:.3e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_mhc_mlx_rewire(backend):
    mhc_mlx = import_mhc_mlx()
    n, dims = 4, 48
    seed = seed_of("mhc-mlx-rewire", backend)
    ours = MHCRewire(Affine(dims, seed), dims=dims, n=n, backend=backend)
    ours.mhc.update(testing.random_params(n, dims // n, seed))
    theirs = mhc_mlx.MHCRewire(ours.inner, dims=dims, n=n, use_metal=False)
    theirs.mhc.update(dict(ours.mhc.parameters()))
    x = testing.random_input((5, dims), mx.float32, seed)
    with mx.stream(mx.cpu):  # mhc-mlx mixes with einsum: TF32 on CUDA; exact float32 on the CPU
        ref = theirs(x)
        mx.eval(ref)
    err = rel_error64(run_forward(ours, x), to64(ref))
    assert err < TOL[mx.float32], f"MHCRewire[{backend}] vs mhc_mlx.MHCRewire: {err:.3e}"


# ---------------------------------------------------------------- post_combine and MHCRewire
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_post_combine(backend, dtype_name):
    n, C = 8, 65
    seed = seed_of("post-combine", backend, dtype_name)
    layer = random_layer(n, C, seed, backend)
    dt = testing.DTYPES[dtype_name]
    x = testing.random_input((2, 3, n, C), dt, seed)
    y_inner = testing.random_input((2, 3, n, C), dt, seed + 1)
    out = run_forward(layer.post_combine, x, y_inner)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert_close(out, numpy_post_combine(layer, x, y_inner), TOL[dt], f"MHCLayer[{backend}].post_combine {dtype_name}")


class Affine(nn.Module):
    """An elementwise inner block F(v) = v * weight + bias. Not nn.Linear: MLX computes float32
    matmuls in TF32 on CUDA by default, which would put F's own rounding into a check of mHC."""

    def __init__(self, dims: int, seed: int):
        super().__init__()
        k = mx.random.split(mx.random.key(seed), 2)
        self.weight = mx.random.normal((dims,), key=k[0])
        self.bias = mx.random.normal((dims,), key=k[1])

    def __call__(self, v):
        return v * self.weight.astype(v.dtype) + self.bias.astype(v.dtype)


class NumpyAffine:
    """The float64 twin of Affine, for the direct formula."""

    def __init__(self, inner: Affine):
        self.w, self.b = to64(inner.weight), to64(inner.bias)

    def __call__(self, v):
        return v * self.w + self.b


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("lead,n,dims", REWIRE_SHAPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_rewire_vs_direct_formula(backend, lead, n, dims, dtype_name):
    """out = H_post * (F(H_pre * x) + (M * H_pre) @ x) on x viewed as [..., n, dims / n]."""
    seed = seed_of("rewire", backend, lead, n, dims, dtype_name)
    mx.random.seed(seed)
    rewire = MHCRewire(Affine(dims, seed), dims=dims, n=n, backend=backend)
    rewire.mhc.update(testing.random_params(n, dims // n, seed))
    dt = testing.DTYPES[dtype_name]
    x = testing.random_input((*lead, dims), dt, seed)
    out = run_forward(rewire, x)
    assert out.shape == x.shape and out.dtype == x.dtype

    H_pre, H_post, M = numpy_activations(rewire.mhc)
    streams = to64(x).reshape(*lead, n, dims // n)
    F = NumpyAffine(rewire.inner)
    y_inner = F((H_pre[:, None] * streams).reshape(*lead, dims)).reshape(streams.shape)
    direct = H_post[:, None] * (y_inner + np.einsum("ij,...jc->...ic", M * H_pre[None, :], streams))
    assert_close(out, direct.reshape(x.shape), TOL[dt], f"MHCRewire[{backend}] {lead} n={n} dims={dims} {dtype_name}")
    # the same through the layer's post_combine with the inner output computed outside
    via_post = run_forward(rewire.mhc.post_combine, x.reshape(*lead, n, dims // n),
                           mx.array(y_inner.astype(np.float32)).astype(dt))
    assert_close(via_post.reshape(x.shape), direct.reshape(x.shape), TOL[dt], f"post_combine[{backend}] {dtype_name}")


# ---------------------------------------------------------------- MLX's TF32 default
# float32 checks that the portable path failed on the H200 with MLX_ENABLE_TF32 left on (session 26)
TF32_CHECKS = ["test_gradients.py::test_mhc_forward_vs_reference_grad[{}-16-8-255-float32]",
               "test_gradients.py::test_mhc_forward_vs_reference_grad[{}-3-4-64-float32]",
               "test_layer.py::test_layer_vs_numpy64[{}-2-32-16-float32]",
               "test_stream_mix_add.py::test_vs_numpy64[{}-8-32-1024-float32]"]


@pytest.mark.gpu
@NEEDS_CUDA
def test_cuda_kernels_float32_exact_with_mlx_tf32_on():
    """The suite runs with MLX_ENABLE_TF32=0 (conftest.py); a user who keeps MLX's default gets TF32
    matmuls. The static kernels use none: their float32 checks pass with it on, while the same checks
    of the portable path (an MLX matmul for the mix) fail, which shows the setting took effect."""
    assert_kernels_exact_with_tf32(TF32_CHECKS)
