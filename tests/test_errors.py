"""Every ValueError path of the ops, the layers and dispatch: each names the cause. And nothing
falls back silently: an unavailable backend or a failing kernel raises, never runs something else."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest

from backends import BACKENDS, GPU_AVAILABLE, GPU_BACKENDS
from mhc_aot import MHCLayer, MHCRewire, dispatch, ops, testing

# ---------------------------------------------------------------- shape table
n, C, B = 4, 16, 3  # one valid shape; every case below breaks exactly one thing about it
INT_DTYPES = [mx.int32, mx.int64, mx.uint8, mx.bool_, mx.float64]  # float64 too: not a supported dtype

# ---------------------------------------------------------------- tolerance table
# none: these tests check that calls fail, and how (messages are matched by regex)

# ---------------------------------------------------------------- reference


def params(n=n, C=C):
    return testing.random_params(n, C, 0)


def x_of(*shape, dtype=mx.float32):
    # on the CPU stream: MLX refuses to build float64 arrays on the GPU, before our check can run
    return mx.zeros(shape or (B, n, C), dtype=dtype, stream=mx.cpu)


def forward(x=None, backend="portable", **override):
    p = {**params(), **override}
    return ops.mhc_forward(x_of() if x is None else x, **p, backend=backend)


# ---------------------------------------------------------------- mhc_forward
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,match", [
    ((C,), "at least 2 dims"), ((), "at least 2 dims"),
    ((B, 0, C), "n >= 1"), ((B, n, 0), "C >= 1"),
    ((B, n + 1, C), "H_pre_raw has shape"), ((B, n, C + 1), "rms_weight has shape"),
])
def test_forward_bad_x_shape(backend, shape, match):
    with pytest.raises(ValueError, match=match):
        forward(mx.zeros(shape), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
def test_forward_bad_dtypes(backend, dtype):
    with pytest.raises(ValueError, match="x has dtype"):
        forward(x_of(dtype=dtype), backend=backend)
    for name in ("H_pre_raw", "H_post_raw", "H_res_raw", "rms_weight"):
        with pytest.raises(ValueError, match=f"{name} has dtype"):
            forward(backend=backend, **{name: params()[name].astype(dtype, stream=mx.cpu)})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,shape", [
    ("H_pre_raw", (n + 1,)), ("H_pre_raw", (1, n)), ("H_post_raw", (n - 1,)), ("H_post_raw", ()),
    ("H_res_raw", (n, n + 1)), ("H_res_raw", (n * n,)), ("H_res_raw", (1, n, n)),
    ("rms_weight", (C - 1,)), ("rms_weight", (1, C)),
])
def test_forward_mismatched_parameter_shapes(backend, name, shape):
    with pytest.raises(ValueError, match=rf"{name} has shape \({', '.join(map(str, shape))},?\): expected"):
        forward(backend=backend, **{name: mx.zeros(shape)})


def test_forward_not_an_array():
    import numpy as np

    with pytest.raises(ValueError, match="x must be an mlx.core.array"):
        ops.mhc_forward(np.zeros((B, n, C), np.float32), **params())
    with pytest.raises(ValueError, match="rms_weight must be an mlx.core.array"):
        forward(rms_weight=[1.0] * C)


@pytest.mark.parametrize("iters,eps,match", [(-1, 1e-5, "iters"), (2.0, 1e-5, "iters"), ("20", 1e-5, "iters"),
                                             (20, 0.0, "eps"), (20, -1e-5, "eps"), (20, float("nan"), "eps")])
def test_bad_iters_eps(iters, eps, match):
    with pytest.raises(ValueError, match=match):
        ops.mhc_forward(x_of(), **params(), iters=iters, eps=eps)
    with pytest.raises(ValueError, match=match):
        ops.sinkhorn(params()["H_res_raw"], iters, eps)
    with pytest.raises(ValueError, match=match):
        MHCLayer(n, C, sinkhorn_iters=iters, eps=eps)


# ---------------------------------------------------------------- sinkhorn
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(n,), (n, n + 1), (1, n, n), (0, 0), ()])
def test_sinkhorn_bad_shape(backend, shape):
    with pytest.raises(ValueError, match="H_res_raw has shape .*expected a square"):
        ops.sinkhorn(mx.zeros(shape), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
def test_sinkhorn_bad_dtype(backend, dtype):
    with pytest.raises(ValueError, match="H_res_raw has dtype"):
        ops.sinkhorn(mx.zeros((n, n), dtype=dtype, stream=mx.cpu), backend=backend)


# ---------------------------------------------------------------- stream_mix_add
def mix_add(x=None, M=None, bias=None, backend="portable"):
    x = x_of() if x is None else x
    M = mx.eye(x.shape[-2]) if M is None else M
    return ops.stream_mix_add(x, M, mx.zeros(x.shape) if bias is None else bias, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stream_mix_add_bad_shapes(backend):
    with pytest.raises(ValueError, match="at least 2 dims"):
        mix_add(mx.zeros((C,)), M=mx.eye(n), bias=mx.zeros((C,)), backend=backend)
    with pytest.raises(ValueError, match="n >= 1"):
        mix_add(mx.zeros((B, 0, C)), M=mx.zeros((0, 0)), backend=backend)
    with pytest.raises(ValueError, match="C >= 1"):
        mix_add(mx.zeros((B, n, 0)), backend=backend)
    for M in (mx.eye(n + 1), mx.zeros((n, n + 1)), mx.zeros((n,))):
        with pytest.raises(ValueError, match="M has shape"):
            mix_add(M=M, backend=backend)
    for bias in (mx.zeros((1, n, C)), mx.zeros((n, C)), mx.zeros((B, n, C + 1)), mx.zeros((B, 1, n, C))):
        with pytest.raises(ValueError, match="bias has shape"):  # broadcastable is not enough
            mix_add(bias=bias, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
def test_stream_mix_add_bad_dtypes(backend, dtype):
    with pytest.raises(ValueError, match="x has dtype"):
        mix_add(x_of(dtype=dtype), backend=backend)
    with pytest.raises(ValueError, match="M has dtype"):
        mix_add(M=mx.eye(n).astype(dtype, stream=mx.cpu), backend=backend)
    with pytest.raises(ValueError, match="bias has dtype"):
        mix_add(bias=mx.zeros((B, n, C), dtype=dtype, stream=mx.cpu), backend=backend)


# ---------------------------------------------------------------- backend names and dispatch
@pytest.mark.parametrize("name", ["", "gpu", "CUDA", "Portable", "mps", "cpu ", None, 1])
def test_bad_backend_names(name):
    for call in (lambda: forward(backend=name), lambda: ops.sinkhorn(params()["H_res_raw"], backend=name),
                 lambda: mix_add(backend=name), lambda: MHCLayer(n, C, backend=name),
                 lambda: MHCRewire(nn.Identity(), dims=n * C, n=n, backend=name),
                 lambda: dispatch.choose("mhc_forward", n, C, name)):
        with pytest.raises(ValueError, match="backend=.*expected one of"):
            call()


def test_dispatch_unknown_op():
    with pytest.raises(ValueError, match="no dispatch rule for op='mhc_backwards'"):
        dispatch.choose("mhc_backwards", n, C, "cpu")


def test_reference_only_when_asked():
    """The reference is never a dispatch rule: it runs only for backend='reference'."""
    assert all(r.strategy != "reference" for r in dispatch.RULES)
    for backend in ("auto", "cpu", "portable", *GPU_BACKENDS):
        for op in ("sinkhorn", "mhc_forward", "stream_mix_add"):
            assert dispatch.choose(op, n, C, backend).strategy != "reference"


@pytest.mark.parametrize("backend", [b for b in GPU_BACKENDS if not GPU_AVAILABLE[b]] or
                         [pytest.param("none", marks=pytest.mark.skip(reason="every GPU backend is available here"))])
def test_unavailable_backend_raises(backend):
    """Asking for kernels that this machine cannot run raises; it never falls back."""
    H = params()["H_res_raw"]
    for call in (lambda: forward(backend=backend), lambda: ops.sinkhorn(H, backend=backend),
                 lambda: mix_add(backend=backend), lambda: MHCLayer(n, C, backend=backend)(x_of())):
        with pytest.raises(RuntimeError, match=f"backend='{backend}'.*pass backend='portable'"):
            mx.eval(call())


class _FailingKernels:
    """Kernel module whose every launch fails, as a broken GPU build would."""

    def __getattr__(self, name):
        def fail(*args, **kwargs):
            raise RuntimeError(f"kernel {name} failed to launch")
        return fail


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_kernel_failure_propagates(backend, monkeypatch):
    """A failing kernel surfaces as its error from the ops and the layers: no silent fallback."""
    monkeypatch.setattr(ops, "_kernels", lambda name: _FailingKernels())
    monkeypatch.setattr(dispatch, "device_backend", lambda device=None: backend)
    H = params()["H_res_raw"]
    layer = MHCLayer(n, C, backend="auto")
    for call in (lambda: forward(backend=backend), lambda: forward(backend="auto"),
                 lambda: ops.sinkhorn(H, backend=backend), lambda: mix_add(backend=backend),
                 lambda: layer(x_of()), lambda: layer.post_combine(x_of(), x_of()),
                 lambda: MHCRewire(nn.Identity(), dims=n * C, n=n)(mx.zeros((B, n * C)))):
        with pytest.raises(RuntimeError, match="failed to launch"):
            mx.eval(call())


# ---------------------------------------------------------------- MHCLayer
@pytest.mark.parametrize("kwargs,match", [
    ({"n": 0}, "n=0"), ({"n": -1}, "n=-1"), ({"C": 0}, "C=0"), ({"C": -3}, "C=-3"),
    ({"n": 2.0}, "n=2.0"), ({"C": "8"}, "C='8'"), ({"n": True}, "n=True"), ({"n": None}, "n=None"),
])
def test_layer_bad_constructor_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MHCLayer(**{"n": n, "C": C, **kwargs})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(B, n + 1, C), (B, n, C + 1), (B, C, n), (n * C,), (C,), ()])
def test_layer_bad_input_shape(backend, shape):
    layer = MHCLayer(n, C, backend=backend)
    shape_text = ", ".join(map(str, shape))
    pattern = rf"MHCLayer\(n={n}, C={C}\) got x of shape \({shape_text},?\): expected \[\.\.\., {n}, {C}\]"
    with pytest.raises(ValueError, match=pattern):
        layer(mx.zeros(shape))
    with pytest.raises(ValueError, match=pattern):
        layer.post_combine(mx.zeros(shape), mx.zeros(shape))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
def test_layer_bad_dtype(backend, dtype):
    layer = MHCLayer(n, C, backend=backend)
    with pytest.raises(ValueError, match="x has dtype"):
        layer(x_of(dtype=dtype))
    layer.rms_weight = layer.rms_weight.astype(dtype, stream=mx.cpu)
    with pytest.raises(ValueError, match="rms_weight has dtype"):
        layer(x_of())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,shape", [("H_pre_raw", (n + 1,)), ("H_post_raw", (1,)), ("H_res_raw", (n + 1, n + 1)),
                                        ("H_res_raw", (n, n - 1)), ("rms_weight", (C + 1,))])
def test_layer_mismatched_parameter_shapes(backend, name, shape):
    """Parameters loaded with the wrong shape (e.g. weights of another layer) are caught per name."""
    layer = MHCLayer(n, C, backend=backend)
    setattr(layer, name, mx.zeros(shape))
    with pytest.raises(ValueError, match=f"{name} has shape"):
        layer(x_of())
    if name != "rms_weight":  # post_combine does not use the norm weight
        with pytest.raises(ValueError, match=f"{name} has shape"):
            layer.post_combine(x_of(), x_of())


@pytest.mark.parametrize("backend", BACKENDS)
def test_post_combine_bad_inner_output(backend):
    layer = MHCLayer(n, C, backend=backend)
    for y in (mx.zeros((B, n, C + 1)), mx.zeros((B + 1, n, C)), mx.zeros((1, n, C))):
        with pytest.raises(ValueError):
            layer.post_combine(x_of(), y)
    with pytest.raises(ValueError, match="has dtype"):
        layer.post_combine(x_of(), x_of(dtype=mx.int32))


# ---------------------------------------------------------------- MHCRewire
@pytest.mark.parametrize("kwargs,match", [
    ({"dims": 10, "n": 4}, "dims=10 must be divisible by n=4"), ({"dims": 0, "n": 4}, "dims=0"),
    ({"dims": 8, "n": 0}, "n=0"), ({"dims": -8, "n": 4}, "dims=-8"), ({"dims": 8.0, "n": 4}, "dims=8.0"),
])
def test_rewire_bad_constructor_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MHCRewire(nn.Identity(), **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rewire_bad_inputs(backend):
    dims = n * C
    rewire = MHCRewire(nn.Identity(), dims=dims, n=n, backend=backend)
    for shape in ((B, dims + 1), (B, n, C), ()):
        with pytest.raises(ValueError, match=rf"MHCRewire\(dims={dims}\) got x of shape"):
            rewire(mx.zeros(shape))
    with pytest.raises(ValueError, match="x has dtype"):
        rewire(mx.zeros((B, dims), dtype=mx.int32))
    bad_inner = MHCRewire(nn.Linear(dims, dims + 1), dims=dims, n=n, backend=backend)
    with pytest.raises(ValueError, match="inner module returned shape"):
        bad_inner(mx.zeros((B, dims)))


def test_ring_launchers_refuse_what_they_cannot_hold(monkeypatch):
    """The ring kernels' launchers (reached through dispatch only where they fit) refuse other
    dtypes and n, and tokens their GPU's shared memory cannot hold, naming the fix; nothing launches."""
    from mhc_aot import cuda, device

    n, C = 32, 2048
    x = mx.zeros((2, n, C), mx.bfloat16)
    vec, mat, rows = mx.zeros((n,)), mx.zeros((n, n)), mx.ones((2,))
    w = mx.ones((C,))
    with pytest.raises(ValueError, match=r"mhc_backward_ring runs bfloat16 x with n in .*float16.*backend='auto'"):
        cuda._backward_ring(x.astype(mx.float16), mat, vec, vec, w, rows, x.astype(mx.float16))
    with pytest.raises(ValueError, match=r"mhc_forward_ring runs bfloat16 x .* got .*n=8"):
        cuda._forward_ring(mx.zeros((2, 8, C), mx.bfloat16), mx.zeros((8, 8)), mx.zeros((8,)), mx.zeros((8,)), w, 20,
                           1e-6)
    monkeypatch.setattr(device, "max_shared_memory_per_block", lambda: 99 * 1024)  # a 99 KB GPU
    assert cuda.backward_ring_smem_bytes(n, C) > 99 * 1024 and cuda.ring_smem_bytes(n, C) > 99 * 1024
    with pytest.raises(ValueError, match=r"mhc_backward_ring keeps a token's dout in shared memory: n=32, C=2048 "
                                         r"needs \d+ chunk slots.*backend='portable'"):
        cuda._backward_ring(x, mat, vec, vec, w, rows, x)
    with pytest.raises(ValueError, match=r"mhc_forward_ring keeps a whole token in shared memory: n=32, C=2048"):
        cuda._forward_ring(x, mat, vec, vec, w, 20, 1e-6)
