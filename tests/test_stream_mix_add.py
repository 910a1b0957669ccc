"""ops.stream_mix_add (the MHCRewire post-combine: out = M x + bias) on every backend against the
float64 numpy reference (DESIGN.md section 5)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from backends import (BACKENDS, DTYPE_NAMES, KERNEL_BACKENDS, assert_bf16_factor, assert_close, dispatch_edges,
                      gpu_strategies, leading, random_M, rel_error64, run_forward, seed_of, strategies_of, to64)
from mhc_aot import ops, reference, testing

# ---------------------------------------------------------------- shape table
# (leading dims, n, C): n in 1, 2, 3, 4, 8, 32, 64, 100; C odd and even from 1 to 8192; B = 1 and
# larger; extra leading dims; plus both sides of any limit of the stream_mix_add rules (none today).
SHAPES = [
    (1, 1, 1), (3, 1, 8192), (2, 2, 1), (256, 2, 16), (1, 3, 33), (4, 4, 128), ((2, 3), 4, 65),
    (9, 4, 8191), (3, 8, 1000), ((2, 2, 2), 8, 31), (8, 32, 1024), (1, 32, 1025), (2, 64, 7),
    (1, 64, 513), (3, 100, 3), (1, 100, 329),
    *dispatch_edges("stream_mix_add"),
]
GPU_EXTRA_SHAPES = [(1, 1, 1), (8192, 1, 12288), (1, 100, 12288), (8192, 4, 1024), (8192, 4, 3072), (64, 32, 12288)]

# ---------------------------------------------------------------- tolerance table
TOL = testing.TOLERANCES  # rel. error vs float64, per dtype of x
BF16_FACTOR = testing.BF16_REFERENCE_FACTOR


# ---------------------------------------------------------------- reference: float64 numpy
def numpy_mix_add(x, M, bias):
    return np.einsum("ij,...jc->...ic", to64(M), to64(x)) + to64(bias)


def _inputs(tag, B, n, C, dtype_name, bias_dtype_name=None):
    seed = seed_of(tag, B, n, C, dtype_name, bias_dtype_name)
    shape = (*leading(B), n, C)
    x = testing.random_input(shape, testing.DTYPES[dtype_name], seed)
    bias = testing.random_input(shape, testing.DTYPES[bias_dtype_name or dtype_name], seed + 1)
    return x, random_M(n, seed), bias


def _check(backend, B, n, C, dtype_name, tag="mix-add", bias_dtype_name=None):
    x, M, bias = _inputs((tag, backend), B, n, C, dtype_name, bias_dtype_name)
    out = run_forward(ops.stream_mix_add, x, M, bias, backend=backend)
    assert out.shape == x.shape and out.dtype == x.dtype
    ref64 = numpy_mix_add(x, M, bias)
    what = f"stream_mix_add[{backend}] B={B} n={n} C={C} {dtype_name} (bias {bias_dtype_name or dtype_name})"
    err = assert_close(out, ref64, TOL[x.dtype], what)
    if x.dtype == mx.bfloat16:
        n_, C_ = x.shape[-2:]
        ref_bf16 = reference.stream_mix_add(x.reshape(-1, n_, C_), M, bias.reshape(-1, n_, C_)).astype(mx.bfloat16)
        assert_bf16_factor(err, rel_error64(ref_bf16, ref64.reshape(-1, n_, C_)), BF16_FACTOR, what)


def test_shape_table_straddles_dispatch():
    assert strategies_of("stream_mix_add", SHAPES) == gpu_strategies("stream_mix_add")


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("B,n,C", SHAPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_vs_numpy64(backend, B, n, C, dtype_name):
    _check(backend, B, n, C, dtype_name)


@pytest.mark.parametrize("dtype_name,bias_dtype_name", [("float16", "float32"), ("bfloat16", "float32"),
                                                        ("float32", "bfloat16"), ("float16", "bfloat16")])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_of_another_dtype(backend, dtype_name, bias_dtype_name):
    _check(backend, 5, 4, 96, dtype_name, bias_dtype_name=bias_dtype_name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sinkhorn_mixing(backend):
    """With the layer's own kind of M (doubly stochastic, from sinkhorn)."""
    x, _, bias = _inputs(("sinkhorn-M", backend), 6, 8, 40, "float32")
    M = ops.sinkhorn(testing.random_params(8, 1, seed_of("sinkhorn-M", backend))["H_res_raw"], backend="reference")
    out = run_forward(ops.stream_mix_add, x, M, bias, backend=backend)
    assert_close(out, numpy_mix_add(x, M, bias), TOL[x.dtype], f"stream_mix_add[{backend}] with a Sinkhorn M")


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_tokens(backend):
    x, M, bias = _inputs("empty", (0, 2), 3, 8, "bfloat16")
    out = run_forward(ops.stream_mix_add, x, M, bias, backend=backend)
    assert out.shape == (0, 2, 3, 8) and out.dtype == mx.bfloat16


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_inputs(backend, dtype_name):
    B, n, C = 6, 4, 67
    seed = seed_of("views-mix-add", backend, dtype_name)
    dt = testing.DTYPES[dtype_name]
    x = testing.random_input((C, n, B), dt, seed).transpose(2, 1, 0)
    bias = testing.random_input((2 * B, n, 2 * C), dt, seed + 1)[::2, :, 1::2]
    M = random_M(2 * n, seed)[::2, 1::2]
    out = run_forward(ops.stream_mix_add, x, M, bias, backend=backend)
    assert_close(out, numpy_mix_add(x, M, bias), TOL[x.dtype], f"stream_mix_add[{backend}] strided views {dtype_name}")
    out_t = run_forward(ops.stream_mix_add, x, M.T, bias, backend=backend)
    assert_close(out_t, numpy_mix_add(x, M.T, bias), TOL[x.dtype], f"stream_mix_add[{backend}] transposed M")


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_and_compiled(backend, dtype_name):
    x, M, bias = _inputs(("repeat", backend), 7, 8, 515, dtype_name)
    first = to64(run_forward(ops.stream_mix_add, x, M, bias, backend=backend))
    for _ in range(3):
        again = to64(run_forward(ops.stream_mix_add, x, M, bias, backend=backend))
        assert np.array_equal(first, again), "repeated calls are not bit-identical"
    compiled = run_forward(mx.compile(lambda *a: ops.stream_mix_add(*a, backend=backend)), x, M, bias)
    assert_close(compiled, numpy_mix_add(x, M, bias), TOL[x.dtype], f"mx.compile(stream_mix_add[{backend}])")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("B,n,C", GPU_EXTRA_SHAPES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gpu_extra_shapes(backend, B, n, C, dtype_name):
    _check(backend, B, n, C, dtype_name, tag="gpu-extra")
