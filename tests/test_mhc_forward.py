"""ops.mhc_forward on every backend against the float64 numpy reference (DESIGN.md section 5)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from backends import (BACKENDS, DTYPE_NAMES, KERNEL_BACKENDS, NEEDS_CUDA, assert_bf16_factor, assert_close, dispatch_edges,
                      gpu_strategies, leading, rel_error64, run_forward, seed_of, split_for_cpu, strategies_of, to64)
from mhc_aot import dispatch, ops, reference, testing

# ---------------------------------------------------------------- shape table
# (leading dims, n, C): n in 1, 2, 3, 4, 8, 32, 64, 100; C odd and even from 1 to 8192; B = 1 and
# larger; extra leading dims; plus B and C on both sides of every limit in dispatch.RULES
# (today C = FUSED_MAX_C | + 1, and at n = 32 both sides of the B and C bounds of the two column rules;
# those above backends.CPU_MAX_ELEMENTS run on GPU backends only, in GPU_EXTRA_SHAPES).
SHAPES = [
    (1, 1, 1), (3, 1, 8), (5, 1, 8192),
    (2, 2, 1), (256, 2, 16), (1, 2, 4095),
    (1, 3, 33), (7, 3, 2),
    (4, 4, 128), ((2, 3), 4, 65), (64, 4, 256), (9, 4, 8191),
    (3, 8, 1000), ((2, 2, 2), 8, 31), (16, 8, 4097),
    (4, 16, 384), (2, 16, 200),  # n = 16: the fused kernel's tensor-core mix (C % 128 == 0 in bfloat16) and not
    (2, 32, 1), (8, 32, 1024), (1, 32, 1025),
    (2, 64, 7), (8, 64, 512), (1, 64, 513),
    (3, 100, 3), (8, 100, 327), (1, 100, 329),
    *split_for_cpu(dispatch_edges("mhc_forward"))[0],
]
# Run on GPU backends only (large for a CPU reference run): n = 1 and 100, C = 1 and 12288,
# B = 1 and 8192, on both strategies.
GPU_EXTRA_SHAPES = [
    (1, 1, 1), (8192, 1, 1), (8192, 1, 12288), (1, 100, 1), (1, 100, 12288), (2, 64, 12288),
    (1, 4, 12288), (8192, 4, 1024), (8192, 4, 12288 // 4), (64, 32, 12288),
    *split_for_cpu(dispatch_edges("mhc_forward"))[1],  # dispatch edges too large for a CPU reference
]

# ---------------------------------------------------------------- tolerance table
TOL = testing.TOLERANCES  # rel. error vs float64, per dtype of x
BF16_FACTOR = testing.BF16_REFERENCE_FACTOR  # bfloat16 error <= this x the bfloat16 reference's error


# ---------------------------------------------------------------- reference: float64 numpy
numpy_forward = testing.numpy_forward  # DESIGN.md section 1 in float64


def _inputs(tag, B, n, C, dtype_name):
    seed = seed_of(tag, B, n, C, dtype_name)
    x = testing.random_input((*leading(B), n, C), testing.DTYPES[dtype_name], seed)
    return testing.random_params(n, C, seed), x


def _check(backend, B, n, C, dtype_name, tag="forward", **kw):
    params, x = _inputs((tag, backend), B, n, C, dtype_name)
    out = run_forward(ops.mhc_forward, x, **params, **kw, backend=backend)
    assert out.shape == x.shape and out.dtype == x.dtype
    ref64 = numpy_forward(x.reshape(-1, n, C), **params, **kw).reshape(x.shape)
    what = f"mhc_forward[{backend}] B={B} n={n} C={C} {dtype_name}"
    err = assert_close(out, ref64, TOL[x.dtype], what)
    if x.dtype == mx.bfloat16:
        ref_bf16 = reference.mhc_forward(x.reshape(-1, n, C), **params, **kw).astype(mx.bfloat16)
        assert_bf16_factor(err, rel_error64(ref_bf16, ref64.reshape(-1, n, C)), BF16_FACTOR, what)


def test_shape_table_straddles_dispatch():
    assert strategies_of("mhc_forward", SHAPES + GPU_EXTRA_SHAPES) == gpu_strategies("mhc_forward")
    assert {n for _, n, _ in SHAPES} >= {1, 2, 3, 4, 8, 32, 64, 100}
    Cs = {C for _, _, C in SHAPES}
    assert min(Cs) == 1 and 8192 in Cs and any(c % 2 for c in Cs) and any(c % 2 == 0 for c in Cs)


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("B,n,C", SHAPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_vs_numpy64(backend, B, n, C, dtype_name):
    _check(backend, B, n, C, dtype_name)


@pytest.mark.parametrize("iters,eps", [(0, 1e-5), (1, 1e-3), (50, 1e-6)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_iters_eps(backend, iters, eps):
    _check(backend, 3, 5, 17, "float32", tag=("iters", iters, eps), iters=iters, eps=eps)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_tokens(backend):
    params, x = _inputs("empty", (0, 3), 4, 16, "float16")
    out = run_forward(ops.mhc_forward, x, **params, backend=backend)
    assert out.shape == (0, 3, 4, 16) and out.dtype == mx.float16


def _views(seed, B, n, C, dt):
    """Non-contiguous x of shape (B, n, C): a transpose, a strided slice, a batch-strided slice."""
    base_t = testing.random_input((C, n, B), dt, seed).transpose(2, 1, 0)
    base_s = testing.random_input((B, n, 2 * C + 1), dt, seed + 1)[..., 1::2]
    base_b = testing.random_input((2 * B, n + 1, C), dt, seed + 2)[::2, 1:]
    return {"transposed": base_t, "sliced_C": base_s, "sliced_B_n": base_b}


@pytest.mark.parametrize("view", ["transposed", "sliced_C", "sliced_B_n"])
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_inputs(backend, dtype_name, view):
    B, n, C = 6, 4, 67
    seed = seed_of("views", backend, dtype_name, view)
    x = _views(seed, B, n, C, testing.DTYPES[dtype_name])[view]
    p = testing.random_params(n, 2 * C, seed)
    params = {"H_pre_raw": p["H_pre_raw"], "H_post_raw": p["H_post_raw"],
              "H_res_raw": p["H_res_raw"].T, "rms_weight": p["rms_weight"][::2]}  # strided parameters too
    out = run_forward(ops.mhc_forward, x, **params, backend=backend)
    assert_close(out, numpy_forward(x, **params), TOL[x.dtype], f"mhc_forward[{backend}] {view} {dtype_name}")


@pytest.mark.parametrize("B,n,C", [(3, 4, 64), (2, 8, 4097)])
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend, dtype_name, B, n, C):
    params, x = _inputs(("determinism", backend), B, n, C, dtype_name)
    first = to64(run_forward(ops.mhc_forward, x, **params, backend=backend))
    for _ in range(3):
        again = to64(run_forward(ops.mhc_forward, x, **params, backend=backend))
        assert np.array_equal(first, again), "repeated calls are not bit-identical"


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_matches(backend):
    params, x = _inputs(("compile", backend), 4, 4, 96, "float32")

    def f(x, H_pre_raw, H_post_raw, H_res_raw, rms_weight):
        return ops.mhc_forward(x, H_pre_raw, H_post_raw, H_res_raw, rms_weight, backend=backend)

    eager = run_forward(f, x, **params)
    compiled = run_forward(mx.compile(f), x, **params)
    assert_close(compiled, to64(eager), TOL[x.dtype], f"mx.compile(mhc_forward[{backend}])")
    assert_close(compiled, numpy_forward(x, **params), TOL[x.dtype], f"mx.compile(mhc_forward[{backend}])")


def test_auto_follows_default_device():
    params, x = _inputs("auto", 3, 4, 64, "float32")
    device = dispatch.device_backend()
    out = run_forward(ops.mhc_forward, x, **params, backend="auto")
    assert_close(out, numpy_forward(x, **params), TOL[x.dtype], f"mhc_forward[auto on {device}]")
    if device == "cpu":
        same = run_forward(ops.mhc_forward, x, **params, backend="portable")
        assert np.array_equal(to64(out), to64(same)), "auto on CPU must run the portable path"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("B,n,C", GPU_EXTRA_SHAPES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gpu_extra_shapes(backend, B, n, C, dtype_name):
    _check(backend, B, n, C, dtype_name, tag="gpu-extra")


# ---------------------------------------------------------------- CUDA kernels, emulated on the CPU
# The static forward's CUDA kernels (mhc_sinkhorn_fwd, mhc_forward_fused) run here without a GPU
# (tests/cuda_emulation.py), launched by mhc_aot.cuda with its own geometry: the fused kernel's
# 16-byte and scalar paths, n below its variant's NMAX, n = 8, and the tensor-core mix (bfloat16,
# n = 16, C % 128 == 0; asserted through its shared-memory request, which includes the ring; at
# C = 640 its five chunks wrap the four-stage ring).
EMU_FUSED = [(3, 4, 64, "bfloat16"), (5, 3, 40, "float32"), (3, 8, 24, "bfloat16"), (4, 2, 16, "float16"),
             (4, 4, 33, "float32"), (2, 16, 128, "bfloat16"), (2, 16, 136, "bfloat16"), (1, 16, 640, "bfloat16")]


@pytest.mark.parametrize("B,n,C,dtype_name", EMU_FUSED)
def test_emulated_cuda_fused_forward(emulated_cuda, copy_timing, monkeypatch, B, n, C, dtype_name):
    from mhc_aot import cuda

    # n <= 4 dispatches to `resident` (tested below): take it out so these shapes run `fused`
    monkeypatch.setattr(dispatch, "RULES", tuple(r for r in dispatch.RULES if r.strategy != "resident"))
    _check("cuda", B, n, C, dtype_name, tag="emulated-fused")
    names = [name for name, _ in emulated_cuda.launched]
    assert names[-1].startswith("mhc_forward_fused") and emulated_cuda.grids[-1][0] == B * cuda.THREADS, names
    nmax = cuda._binary("mhc_forward_fused", _tag(dtype_name), n)[2]
    assert (cuda._fused_tc_ring_floats(testing.DTYPES[dtype_name], n, C, nmax) > 0) == (C % 128 == 0 and n == 16)


def _tag(dtype_name):
    from mhc_aot.kernel_ops import dtype_tag

    return dtype_tag(testing.DTYPES[dtype_name])


# The cluster strategy's CUDA kernel (bfloat16, n = 16 / 32; the rule asks for sm_90 and for MLX's
# CUDA graphs off, which the emulation stands in for), emulated: four CTAs per token run together,
# their RMS partials crossing the cluster through each other's shared memory.
EMU_CLUSTER = [(3, 16, 256), (2, 32, 512), (1, 16, 1024)]


@pytest.mark.parametrize("B,n,C", EMU_CLUSTER)
def test_emulated_cuda_cluster_forward(emulated_cuda, copy_timing, monkeypatch, B, n, C):
    from mhc_aot import cuda

    monkeypatch.setattr(dispatch, "cuda_sm", lambda: 90)
    monkeypatch.setenv("MLX_USE_CUDA_GRAPHS", "0")
    assert dispatch.choose("mhc_forward", n, C, "cuda", B=B, dtype=mx.bfloat16).strategy == "cluster"
    for other in (dict(sm=80), dict(graphs=True), dict(dtype=mx.float16)):  # each condition of the rule
        assert dispatch.choose("mhc_forward", n, C, "cuda", B=B, **{"dtype": mx.bfloat16, **other}).strategy != "cluster"
    _check("cuda", B, n, C, "bfloat16", tag="emulated-cluster")
    name = cuda._binary("mhc_forward_cluster", "bf16", n)[0]
    assert [nm for nm, _ in emulated_cuda.launched] == ["mhc_sinkhorn_fwd", name]
    assert emulated_cuda.grids[-1][0] == B * cuda.CLUSTER * cuda.CLUSTER_THREADS


def _cuda_gradients(emulated_cuda, tag, B, n, C, dtype_name) -> list[str]:
    """Every gradient of ops.mhc_forward(backend="cuda") (on the GPU or under the emulation) vs float64,
    bounded by the reference's own error in bfloat16; returns the kernels that the gradient launched
    (emulated_cuda: the emulator, whose launch log is read; None on the GPU)."""
    from backends import forward64, grads64

    if emulated_cuda is not None:
        emulated_cuda.launched = []
    seed = seed_of(f"emulated-{tag}-grad", B, n, C, dtype_name)
    p = testing.random_params(n, C, seed)
    args = [testing.random_input((B, n, C), testing.DTYPES[dtype_name], seed),
            *(p[k] for k in ("H_pre_raw", "H_post_raw", "H_res_raw", "rms_weight"))]
    G = testing.random_input((B, n, C), mx.float32, seed + 1)

    def loss_of(fwd):
        return lambda *a: mx.sum(fwd(*a).astype(mx.float32) * G)

    def reference_fwd(x, *q):
        return reference.mhc_forward(x, *q).astype(x.dtype)

    argnums = tuple(range(len(args)))
    got = run_forward(mx.grad(loss_of(lambda x, *q: ops.mhc_forward(x, *q, backend="cuda")), argnums), *args)
    ref = mx.grad(loss_of(reference_fwd), argnums)(*args)
    for what, g, r, t in zip(("x", "H_pre_raw", "H_post_raw", "H_res_raw", "rms_weight"), got, ref,
                             grads64(forward64, args, G)):
        err, ref_err = rel_error64(g, t), rel_error64(r, t)
        bound = max(TOL[args[0].dtype], BF16_FACTOR * ref_err)
        assert err < bound, f"{tag} d{what} B={B} n={n} C={C} {dtype_name}: {err:.3e} (bound {bound:.1e})"
    return [name for name, _ in emulated_cuda.launched] if emulated_cuda is not None else []


# The ring strategy's CUDA kernel (bfloat16, n = 16 / 32), emulated: one launch with the Sinkhorn
# folded in, one CTA walking every token (sm_count 1), rings of a token's groups + 1 a warp (so they wrap),
# of exactly a token's chunks, and as large as shared memory allows; forward, then every gradient
# through its M output: by the backward's ring, or (the "token" case, its rule taken out) by the
# fused backward with dM on tensor cores.
EMU_RING = [(5, 32, 768, "wrap"), (3, 16, 512, "token"), (2, 32, 1024, "all")]
# A rule for the ring kernel's whole range (a token in shared memory), wider than dispatch's measured one
RING_RULE = dispatch.Rule("cuda", "mhc_forward", "ring", None, None, "test", n_in=(16, 32), dtypes=("bf16",),
                          C_multiple=256, smem_need="ring")


def _emulated_ring(monkeypatch, B, n, C, slots):
    """One emulated CTA (sm_count 1) on an sm_90, the forward ring's R as `slots` says: a token's
    chunks ("token"), one more unit a warp ("wrap": a unit of every warp is n * units / 16 chunks)
    or what shared memory holds ("all"); dispatch must then pick the ring. With MLX's CUDA graphs
    on (its default): with them off, `cluster` takes these shapes on an sm_90 (session 27 ran the
    suite so on the H200, where this assumed the machine's setting)."""
    from mhc_aot import cuda, device

    monkeypatch.setattr(dispatch, "cuda_sm", lambda: 90)
    monkeypatch.setattr(dispatch, "cuda_graphs", lambda: True)
    monkeypatch.setattr(device, "sm_count", lambda: 1)
    chunks = C // (cuda.RING_CHUNK_BYTES // (2 * n))  # a token's
    if slots != "all":
        wrap = n * cuda.ring_units(C) // 16
        monkeypatch.setattr(cuda, "_ring_slots", lambda n_, C_: chunks + (slots == "wrap") * wrap)
    assert dispatch.choose("mhc_forward", n, C, "cuda", B=B, dtype=mx.bfloat16).strategy == "ring"


@pytest.mark.parametrize("B,n,C,slots", EMU_RING)
def test_emulated_cuda_ring_forward(emulated_cuda, copy_timing, monkeypatch, B, n, C, slots):
    from mhc_aot import cuda

    if slots == "token":
        monkeypatch.setattr(dispatch, "RULES", tuple(r for r in dispatch.RULES
                                                     if not (r.op == "mhc_backward" and r.strategy == "ring")))
    _emulated_ring(monkeypatch, B, n, C, slots)
    _check("cuda", B, n, C, "bfloat16", tag="emulated-ring")
    name = cuda._binary("mhc_forward_ring", "bf16", n, cuda.ring_units(C))[0]
    assert [nm for nm, _ in emulated_cuda.launched] == [name]
    assert emulated_cuda.grids[-1][0] == cuda.RING_THREADS  # one CTA: it walks all B tokens
    names = _cuda_gradients(emulated_cuda, "ring", B, n, C, "bfloat16")
    assert names[0] == name and "mhc_sinkhorn_bwd" in names, names
    backward = "mhc_backward_dm_tc" if slots == "token" else "mhc_backward_ring"
    assert cuda._binary(backward, "bf16", n)[0] in names, names


# The ring kernel's builds by unit width (groups a warp streams as one slot: 1 / 2 / 4, the widest
# that C allows), emulated: rings of a token + one unit a warp (so they wrap) and of exactly a token.
# (EMU_RING covers units 1 / 2 / 4 too, with its own ring sizes.)
EMU_RING_UNITS = [(4, 32, 1024, 4, "wrap"), (3, 16, 2048, 4, "token"), (3, 32, 1536, 2, "wrap"), (2, 16, 1280, 1, "wrap")]


@pytest.mark.parametrize("B,n,C,units,slots", EMU_RING_UNITS)
def test_emulated_cuda_ring_units(emulated_cuda, copy_timing, monkeypatch, B, n, C, units, slots):
    from mhc_aot import cuda

    assert cuda.ring_units(C) == units
    _emulated_ring(monkeypatch, B, n, C, slots)
    _check("cuda", B, n, C, "bfloat16", tag=f"emulated-ring-units{units}")
    name = cuda._binary("mhc_forward_ring", "bf16", n, units)[0]
    assert [nm for nm, _ in emulated_cuda.launched] == [name]
    assert name.endswith(f"_u{units}") == (units > 1), name


# The backward's ring kernel (bfloat16, n = 16 / 32) over its whole range (the test's rule: dispatch's
# stops at the widest C measured), emulated: one CTA walking every token, its rings as tight as they
# go (dout: a token's chunks, x: two slots) and as large as shared memory allows; every gradient vs
# float64.
EMU_BACKWARD_RING = [(5, 32, 256, "tight"), (3, 16, 512, "tight"), (4, 32, 512, "all"), (2, 16, 1024, "all")]
BACKWARD_RING_RULE = dispatch.Rule("cuda", "mhc_backward", "ring", None, None, "test", n_in=(16, 32),
                                   dtypes=("bf16",), C_multiple=256, smem_need="backward_ring")


@pytest.mark.parametrize("B,n,C,rings", EMU_BACKWARD_RING)
def test_emulated_cuda_backward_ring(emulated_cuda, copy_timing, monkeypatch, B, n, C, rings):
    from mhc_aot import cuda, device

    monkeypatch.setattr(dispatch, "RULES", (BACKWARD_RING_RULE, *dispatch.RULES))
    monkeypatch.setattr(dispatch, "cuda_sm", lambda: 90)
    monkeypatch.setattr(device, "sm_count", lambda: 1)
    if rings == "tight":
        monkeypatch.setattr(device, "max_shared_memory_per_block", lambda: cuda.backward_ring_smem_bytes(n, C))
    assert dispatch.choose_backward(n, C, B=B, dtype=mx.bfloat16).strategy == "ring"
    names = _cuda_gradients(emulated_cuda, "backward-ring", B, n, C, "bfloat16")
    ring = cuda._binary("mhc_backward_ring", "bf16", n)[0]
    assert ring in names and not any(nm.startswith(("mhc_backward_fused", "mhc_backward_dm")) for nm in names), names
    assert emulated_cuda.grids[names.index(ring)][0] == cuda.BRING_THREADS  # one CTA: it walks all B tokens


# The backward's ring kernel on the GPU (BACKWARD_RING_RULE): CTAs walking two tokens (B above the
# SM count), one token each over many chunk pairs (n = 32, C = 2048; n = 16, C = 4096), n = 16
# with two pass-B steps a chunk.
GPU_BACKWARD_RING = [(200, 16, 256), (40, 32, 512), (8, 32, 2048), (3, 16, 4096)]


@pytest.mark.gpu
@NEEDS_CUDA
@pytest.mark.parametrize("B,n,C", GPU_BACKWARD_RING)
def test_gpu_backward_ring(monkeypatch, B, n, C):
    monkeypatch.setattr(dispatch, "RULES", (BACKWARD_RING_RULE, *dispatch.RULES))
    assert dispatch.choose_backward(n, C, B=B, dtype=mx.bfloat16).strategy == "ring"
    _cuda_gradients(None, "gpu-backward-ring", B, n, C, "bfloat16")


@pytest.mark.parametrize("op", ["mhc_forward", "mhc_backward"])
def test_ring_rule_conditions(op):
    """Dispatch picks `ring` for bfloat16 n = 16 / 32 with C a multiple of 256 up to the measured
    max_C, where the GPU's shared memory holds what the kernel keeps of a token, and nowhere else."""
    from mhc_aot import cuda

    max_cs, need = ((dispatch.RING_MAX_C, cuda.ring_smem_bytes) if op == "mhc_forward"
                    else (dispatch.RING_BACKWARD_MAX_C, cuda.backward_ring_smem_bytes))

    def strategy(n, C, **kw):  # MLX's CUDA graphs on (its default) unless kw says otherwise
        return dispatch.choose(op, n, C, "cuda", **{"B": 1024, "dtype": "bfloat16", "sm": 90, "graphs": True,
                                                    **kw}).strategy

    for n, max_C in max_cs.items():
        assert strategy(n, 256) == strategy(n, max_C) == "ring"
        # with the graphs off, the forward's `cluster` comes first where it runs (sm_90+)
        assert strategy(n, 1024, graphs=False) == ("cluster" if op == "mhc_forward" else "ring")
        assert strategy(n, 1024, graphs=False, sm=80) == "ring"
        assert strategy(n, max_C + 256) != "ring"  # beyond the measured range
        assert strategy(n, 384) != "ring"  # not a multiple of 256
        assert strategy(n, 1024, dtype="float16") != "ring"
        assert strategy(n + 1, 1024) != "ring" and strategy(n - 1, 1024) != "ring"
        assert strategy(n, 1024, B=1) == "ring"  # any B (measured faster from 1 token up)
        # what the kernel keeps must fit the GPU's shared memory (an A100 allows 163 KB a CTA)
        fits = [C for C in range(256, max_C + 1, 256) if need(n, C) <= 163 * 1024]
        assert [C for C in range(256, max_C + 1, 256) if strategy(n, C, sm=80) == "ring"] == fits
        assert strategy(n, 1024, sm=0) != "ring"  # a GPU of unknown shared memory
    if op == "mhc_forward":  # the forward's ring on an A100: n = 32 up to C = 2048
        assert max(C for C in range(256, 3073, 256) if need(32, C) <= 163 * 1024) == 2048


# The ring kernel on the GPU over its whole range (RING_RULE): many tokens per CTA (B well above
# the SM count), rings of exactly a token (n = 32, C = 3072; n = 16, C = 5632, the widest) on a
# 227 KB GPU, few tokens.
GPU_RING = [(400, 32, 2048), (300, 16, 512), (2, 32, 3072), (3, 16, 5632), (1, 32, 256), (200, 32, 1536), (64, 16, 4096)]


@pytest.mark.gpu
@NEEDS_CUDA
@pytest.mark.parametrize("B,n,C", GPU_RING)
def test_gpu_ring_forward(monkeypatch, B, n, C):
    monkeypatch.setattr(dispatch, "RULES", (RING_RULE, *dispatch.RULES))
    _check("cuda", B, n, C, "bfloat16", tag="gpu-ring")
    if B * n * C <= 1 << 20:
        _cuda_gradients(None, "gpu-ring", B, n, C, "bfloat16")


# The resident strategy's CUDA kernels, emulated: the forward (Sinkhorn folded in: one launch) and
# its backward (x and dout in shared memory, gradients in registers) with persistent CTAs capped at
# two per SM on one SM, so a CTA walks several tokens; vector and scalar paths, n < NMAX, n = 1, and
# float32 at C = 4096, whose CTAs take 512 threads (more than THREADS: cuda.BLOCK_THREADS per dtype).
EMU_RESIDENT = [(5, 4, 64, "bfloat16"), (6, 3, 33, "float32"), (7, 2, 40, "float16"), (3, 1, 7, "bfloat16"),
                (3, 4, 4096, "bfloat16"), (5, 2, 130, "float32"), (3, 4, 4096, "float32")]  # last: 512 threads


@pytest.mark.parametrize("B,n,C,dtype_name", EMU_RESIDENT)
def test_emulated_cuda_resident(emulated_cuda, copy_timing, monkeypatch, B, n, C, dtype_name):
    from mhc_aot import cuda, device

    monkeypatch.setattr(device, "sm_count", lambda: 1)
    monkeypatch.setattr(cuda, "_resident_ctas", lambda threads, regs: 2)
    assert dispatch.choose("mhc_forward", n, C, "cuda", B=B).strategy == "resident"
    _check("cuda", B, n, C, dtype_name, tag="emulated-resident")
    assert [name for name, _ in emulated_cuda.launched] == [cuda._binary("mhc_forward_resident", _tag(dtype_name), n)[0]]
    nmax = cuda._binary("mhc_forward_resident", _tag(dtype_name), n)[2]
    threads = 32 * -(-C // (32 * (16 // testing.DTYPES[dtype_name].size) * (8 // nmax)))
    assert emulated_cuda.grids[-1][0] == min(B, 2) * threads  # two CTAs: each walks several tokens

    names = _cuda_gradients(emulated_cuda, "resident", B, n, C, dtype_name)
    assert any(s.startswith("mhc_backward_resident") for s in names) and "mhc_sinkhorn_bwd" in names, names
