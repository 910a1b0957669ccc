"""ops.sinkhorn on every backend against the float64 numpy reference (DESIGN.md sections 1, 5).

The mixing matrix is float32 whatever the dtype of H_res_raw, so it is held to the float32
tolerance; inputs of other dtypes are compared against numpy run on the same rounded values.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from backends import (BACKENDS, DTYPE_NAMES, dispatch_edges, gpu_strategies, rel_error64, run_forward, seed_of,
                      strategies_of, to64)
from mhc_aot import ops, testing

# ---------------------------------------------------------------- shape table
# n of the [n, n] logits: 1 to 100, odd and even, every compile-time NMAX of the kernels (2 to 64)
# and one past it; plus both sides of any limit of the sinkhorn rules in dispatch.RULES (none today).
NS = [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 32, 33, 64, 65, 100, *sorted({n for _, n, _ in dispatch_edges("sinkhorn", 4)})]
SCALES = [0.1, 1.0, 4.0]  # logits = scale * N(0, 2^2): near-uniform to nearly a permutation

# ---------------------------------------------------------------- tolerance table
F32_TOL = testing.tolerance(mx.float32)  # M is float32 for every input dtype

# ---------------------------------------------------------------- reference: float64 numpy
numpy_sinkhorn = testing.numpy_sinkhorn


def _logits(tag, n, scale=1.0, dtype_name="float32"):
    return testing.random_params(n, 1, seed_of(tag, n, scale, dtype_name), scale)["H_res_raw"].astype(
        testing.DTYPES[dtype_name])


def _check(backend, H, what, **kw):
    M = run_forward(ops.sinkhorn, H, **kw, backend=backend)
    n = H.shape[0]
    assert M.shape == (n, n) and M.dtype == mx.float32, f"{what}: got {M.shape} {M.dtype}"
    err = rel_error64(M, numpy_sinkhorn(to64(H), **kw))
    assert err < F32_TOL, f"{what}: relative error {err:.3e}"
    return M


def test_shape_table_straddles_dispatch():
    assert strategies_of("sinkhorn", [(1, n, 1) for n in NS]) == gpu_strategies("sinkhorn")


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_vs_numpy64(backend, n, scale):
    M = _check(backend, _logits(("sinkhorn", backend), n, scale), f"sinkhorn[{backend}] n={n} scale={scale}")
    col_sums = to64(M).sum(axis=0)  # columns are normalised last; negligible ones are zeroed
    np.testing.assert_allclose(col_sums[col_sums > 0], 1.0, atol=10 * F32_TOL)


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_input_dtypes(backend, dtype_name):
    for n in (3, 32):
        _check(backend, _logits(("dtype", backend), n, 1.0, dtype_name), f"sinkhorn[{backend}] {dtype_name} n={n}")


@pytest.mark.parametrize("iters,eps", [(0, 1e-5), (1, 1e-5), (5, 1e-3), (50, 1e-6)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_iters_eps(backend, iters, eps):
    for n in (4, 33):
        H = _logits(("iters", backend, iters, eps), n)
        _check(backend, H, f"sinkhorn[{backend}] n={n} iters={iters} eps={eps}", iters=iters, eps=eps)


@pytest.mark.parametrize("backend", BACKENDS)
def test_negligible_column_becomes_zero(backend):
    """Logits of -200 underflow exp: that column's sum is <= eps and it becomes exactly zero."""
    H = np.asarray(_logits(("zero-col", backend), 5))
    H[:, 2] = -200.0
    M = _check(backend, mx.array(H), f"sinkhorn[{backend}] with a negligible column")
    assert np.all(to64(M)[:, 2] == 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_identity_init(backend):
    for n in (1, 4, 64):
        H = mx.full((n, n), -12.0) + 12.0 * mx.eye(n)
        M = _check(backend, H, f"sinkhorn[{backend}] identity init n={n}")
        assert np.abs(to64(M) - np.eye(n)).max() < n * np.exp(-12.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_input(backend):
    H = _logits(("transposed", backend), 9, 2.0)
    _check(backend, H.T, f"sinkhorn[{backend}] transposed logits")
    big = _logits(("strided", backend), 18, 2.0)
    _check(backend, big[::2, 1::2], f"sinkhorn[{backend}] strided logits")


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_and_compiled(backend):
    H = _logits(("repeat", backend), 17, 1.0)
    first = to64(run_forward(ops.sinkhorn, H, backend=backend))
    for _ in range(3):
        assert np.array_equal(first, to64(run_forward(ops.sinkhorn, H, backend=backend))), "not bit-identical"
    compiled = run_forward(mx.compile(lambda h: ops.sinkhorn(h, backend=backend)), H)
    assert rel_error64(compiled, first) < F32_TOL


# ---------------------------------------------------------------- CUDA backward, emulated on the CPU
# mhc_sinkhorn_bwd through mhc_aot.cuda's launcher (tests/cuda_emulation.py; conftest's fixture),
# each of its paths with the threads it is launched with: a lane per row (n <= 8, one warp), the
# register tile (n <= 32) and the global workspace (larger n); against MLX's VJP of the reference.
EMU_BWD = [(1, 32), (3, 32), (4, 32), (8, 32), (9, 1024), (32, 1024), (33, 256)]


@pytest.mark.parametrize("n,threads", EMU_BWD)
@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_emulated_cuda_sinkhorn_backward(emulated_cuda, n, threads, scale):
    from mhc_aot import reference

    H = _logits("emulated-sinkhorn-bwd", n, scale)
    dM = testing.random_input((n, n), mx.float32, seed_of("emulated-sinkhorn-bwd-dM", n, scale))
    emulated_cuda.launched, emulated_cuda.grids = [], []
    _, (got,) = mx.vjp(lambda h: ops.sinkhorn(h, backend="cuda"), [H], [dM])
    mx.eval(got)
    names = [name for name, _ in emulated_cuda.launched]
    assert names[-1] == "mhc_sinkhorn_bwd" and emulated_cuda.grids[-1][0] == threads, (names, emulated_cuda.grids)
    _, (want,) = mx.vjp(lambda h: reference.mixing_matrix(h), [H.astype(mx.float32)], [dM])
    err = float(mx.max(mx.abs(got - want)) / (mx.max(mx.abs(want)) + 1e-30))
    assert err < 1e-4, f"n={n} scale={scale}: dL relative error {err:.3e}"
