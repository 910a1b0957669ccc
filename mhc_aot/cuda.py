"""CUDA backend: the precompiled kernels (cuda_src/, built by build_tools/cuda.py) launched
through `mx.fast.precompiled_cuda_kernel`, so every launch is an MLX primitive: lazy, on MLX's
own stream, traced by `mx.compile`. Gradients come from `mx.custom_function` VJPs that launch
the backward kernels.

Launch geometry mirrors the kernels' headers: THREADS threads per CTA, TILE_C columns per CTA
for the tiled kernels; the grid is given in threads (MLX divides by the threadgroup).
"""

from __future__ import annotations

import functools
import struct

import mlx.core as mx

from . import device, dispatch, kernel_ops, manifest, reference, testing
from .kernel_ops import dtype_tag

THREADS = 256  # cuda_src/mhc_common.cuh
TILE_C = 1024  # cuda_src/mhc_column_common.cuh
DM_CHUNK = 32  # cuda_src/mhc_backward_dm.cu
# cuda_src/mhc_backward_dm_tc.cu: threads, columns a chunk (a k16 slice per warp), cp.async stages
DM_TC_THREADS, DM_TC_CHUNK, DM_TC_STAGES = 256, 128, 4
DM_TC_N = (16, 32)  # its variants: bfloat16, n == NMAX
FUSED_TC_COLS, FUSED_TC_STAGES, FUSED_TC_N = 128, 4, (16, 32)  # cuda_src/mhc_forward_fused.cu (tensor cores)
CLUSTER, CLUSTER_THREADS = 4, 128  # cuda_src/mhc_forward_cluster.cu: CTAs per token, threads per CTA
# cuda_src/mhc_forward_ring.cu: threads; the rings' unit of shared memory, in which the launchers
# count slots (the forward splits its R chunks into per-warp slots of one 16-column group)
RING_THREADS, RING_CHUNK_BYTES = 512, 8192
# cuda_src/mhc_backward_ring.cu (chunks of RING_CHUNK_BYTES too): threads; x-ring slots at most (the
# rest of the shared memory holds dout)
BRING_THREADS, BRING_MAX_X_SLOTS = 256, 8
STEP_COLS = 16 * RING_THREADS // 32  # cuda_src/mhc_forward_ring.cu: a 16-column group per warp (C is a multiple)
# its builds (build_tools/variants.py RING_UNITS): groups a warp streams as one slot, widest first
RING_UNITS = (4, 2, 1)
IB = 8  # rows per register tile for n > 8 (cuda_src/mhc_common.cuh)
SMEM_LIMIT = 227 * 1024  # Hopper opt-in maximum per CTA (Ampere and Ada allow less: device.py)
F32 = mx.float32


def _arch_tag() -> str:
    number = device.mlx_arch_number()
    return f"sm_{number}" if number else ""


@functools.lru_cache(maxsize=None)
def _binary(source: str, dtype: str | None, n: int | None, units: int = 1, terms: int = 3) -> tuple[str, bytes, int]:
    """(entry name, binary: the compressed fatbin of this GPU's cubin or else of the PTX,
    compile-time NMAX) of a variant (`units`: the forward ring's, see ring_units; `terms`: the
    projection's terms of phi, see mhc_aot.cuda_dynamic). Read and sha256-checked once per process."""
    v = manifest.find("cuda", source, dtype, n, units, terms)
    tag = _arch_tag()
    if tag not in v.row["files"]:
        tag = "ptx"  # the driver JIT-compiles it for GPUs newer than every shipped cubin
    if tag not in v.row["files"]:  # an arch_exact variant (build_tools/variants.py) built for another GPU
        raise manifest.KernelArtifactError(
            f"{v.name} ships only a cubin for {', '.join(v.row['files']) or 'no GPU (its arch was not built)'}, "
            f"not for this GPU ({_arch_tag() or 'unknown arch'}): the dispatch should not have chosen it; "
            f"pass backend='portable' and report this")
    return v.name, v.read(tag, verify=True), v.nmax


def _f32(v: float) -> float:
    """v rounded to float32: MLX's binding accepts a float scalar only if float32 holds it exactly."""
    return struct.unpack("f", struct.pack("f", v))[0]


# MLX raises a kernel's dynamic shared memory limit above the 48 KB default only when it first
# loads the kernel, to that first launch's request, and caches the module by a hash of the
# binary. So a launch that needs more than 48 KB is rounded up to a bucket and gets a binary
# with a trailing marker (ignored by the driver's loader): one module per bucket, whose first
# launch sets the limit every later launch of that bucket asks for.
# The shared memory a launch asks for is its bucket, so buckets also set how many CTAs share an SM
# (228 KB on the H100, 1 KB reserved per CTA): 68 KB and 74 KB keep three (a grid sized for three
# whose CTAs landed in a two-per-SM bucket ran 1.45 waves); 96 KB keeps two, as the four-stage
# tensor-core kernels need (dphi_tc 86 KB, proj_tc 90 KB; both also fit sm_86 / sm_89's 99 KB).
SMEM_DEFAULT_MAX = 48000
SMEM_BUCKETS = (64 * 1024, 68 * 1024, 74 * 1024, 96 * 1024, 128 * 1024, 160 * 1024, 192 * 1024, SMEM_LIMIT)


def launch_smem(smem: int) -> int:
    """The bytes of dynamic shared memory a launch needing `smem` bytes asks for (its bucket)."""
    if smem <= SMEM_DEFAULT_MAX:
        return smem
    return min(min(b for b in SMEM_BUCKETS if b >= smem), device.max_shared_memory_per_block())


@functools.lru_cache(maxsize=None)
def _bucket_binary(binary: bytes, bucket: int) -> bytes:
    return binary + b"\0mhc-aot dynamic shared memory bucket %d\0" % bucket


def block_threads(source: str, dtype: str | None = None) -> int:
    """The most threads a CTA of `source` is launched with (BLOCK_THREADS, else THREADS): for a source
    whose entry is per dtype tag, that dtype's, or the largest of them without one."""
    entry = BLOCK_THREADS.get(source, THREADS)
    if isinstance(entry, dict):
        return entry[dtype] if dtype is not None else max(entry.values())
    return entry


def _launch(source: str, dtype: str | None, n: int | None, inputs, output_shapes, output_dtypes, scalars,
            grid, shared_floats: int = 0, threads: int = THREADS, units: int = 1, terms: int = 3):
    if threads > block_threads(source, dtype):
        raise AssertionError(f"{source} ({dtype}) launched with {threads} threads a CTA, more than cuda.BLOCK_THREADS "
                             f"says ({block_threads(source, dtype)}): raise its entry there (tests/test_shim.py checks it)")
    name, binary, _ = _binary(source, dtype, n, units, terms)
    scalars = [_f32(s) if isinstance(s, float) else s for s in scalars]
    smem = 4 * shared_floats
    if smem > device.max_shared_memory_per_block():
        raise ValueError(f"{name} needs {smem} bytes of shared memory (> {device.max_shared_memory_per_block()} "
                         f"on this GPU): this shape is outside the kernel's range; pass backend='portable'")
    if smem > SMEM_DEFAULT_MAX:
        smem = launch_smem(smem)
        binary = _bucket_binary(binary, smem)
    return mx.fast.precompiled_cuda_kernel(
        name=name, compiled_source=binary, inputs=inputs, output_shapes=output_shapes,
        output_dtypes=output_dtypes, scalars=scalars, grid=grid, threadgroup=(threads, 1, 1),
        shared_memory=smem, init_value=float("nan") if testing.poison_requested() else None,
        ensure_row_contiguous=True)


def _ib(nmax: int) -> int:
    return IB if nmax == 0 or nmax >= 8 else nmax


def _pad(n: int, nmax: int) -> int:
    return -(-n // _ib(nmax)) * _ib(nmax)


# ---------------------------------------------------------------- sinkhorn
# n <= SMALL_N: one warp per row, the matrix in registers (cuda_src/mhc_sinkhorn_common.cuh)
SMALL_N = 32
SMALL_THREADS = 32 * SMALL_N
# The largest CTA each kernel source is launched with, where that is not THREADS (cuda_dynamic adds its
# own): `_launch` holds every launch to it, and tests/test_shim.py checks each shipped cubin's
# max_threads_per_block against it on the GPU, so a kernel built for fewer threads than a launcher asks
# for fails a test instead of a launch. An entry is a number, or one per dtype tag where the kernel's
# __launch_bounds__ differ by dtype (mhc_forward_resident: its entry is set below RESIDENT_FWD_LIMITS).
BLOCK_THREADS: dict[str, int | dict[str, int]] = {"mhc_forward_cluster": CLUSTER_THREADS, "mhc_forward_ring": RING_THREADS,
                                 "mhc_sinkhorn_fwd": SMALL_THREADS, "mhc_sinkhorn_bwd": SMALL_THREADS}
TILE = SMALL_N * (SMALL_N + 1)
LANE_N = 8  # n <= LANE_N: mhc_sinkhorn_bwd runs in one warp, a lane per row (its header)


def _sinkhorn_fwd(L: mx.array, iters: int, eps: float) -> mx.array:
    n = L.shape[0]
    if n <= SMALL_N:
        threads, smem, use_smem = SMALL_THREADS, TILE + SMALL_N, 1
    else:
        use_smem = int(4 * n * n <= 160 * 1024)
        threads, smem = THREADS, n * n if use_smem else 0
    (M,) = _launch("mhc_sinkhorn_fwd", None, None, [L], [(n, n)], [F32], [n, iters, eps, use_smem],
                   (threads, 1, 1), smem, threads)
    return M


def _sinkhorn_bwd(L: mx.array, dM: mx.array, iters: int, eps: float) -> mx.array:
    n = L.shape[0]
    lane_smem = iters * LANE_N * (LANE_N + 3)
    small_smem = TILE + SMALL_N + iters * TILE + 2 * iters * SMALL_N
    if n <= LANE_N and 4 * lane_smem <= device.max_shared_memory_per_block():
        threads, smem, ws, use_smem = 32, lane_smem, 1, 1
    elif n <= SMALL_N and 4 * small_smem <= device.max_shared_memory_per_block():
        threads, smem, ws, use_smem = SMALL_THREADS, small_smem, 1, 1
    else:
        threads, smem, ws, use_smem = THREADS, 0, n * n * (iters + 2) + 2 * n * iters, 0
    dL, _ = _launch("mhc_sinkhorn_bwd", None, None, [L, dM.astype(F32)], [(n, n), (max(ws, 1),)], [F32, F32],
                    [n, iters, eps, use_smem], (threads, 1, 1), smem, threads)
    return dL


# ---------------------------------------------------------------- static forward / backward
def _forward_fused(x, M, hpre_raw, hpost_raw, w, eps):
    B, n, C = x.shape
    _, _, nmax = _binary("mhc_forward_fused", dtype_tag(x.dtype), n)
    pad = _pad(n, nmax)
    return _launch("mhc_forward_fused", dtype_tag(x.dtype), n, [x, M, hpre_raw, hpost_raw, w],
                   [(B, n, C), (B,)], [x.dtype, F32], [n, C, eps], (B * THREADS, 1, 1),
                   n * pad + 2 * pad + 32 + C + _fused_tc_ring_floats(x.dtype, n, C, nmax))


def _check_tc_token(source: str, x: mx.array, C_multiple: int) -> None:
    """The tensor-core token kernels (cluster, ring) take bfloat16 x with n equal to a compiled NMAX in
    FUSED_TC_N and C a multiple of C_multiple; dispatch routes nothing else to them."""
    _, n, C = x.shape
    if x.dtype != mx.bfloat16 or n not in FUSED_TC_N or C % C_multiple:
        raise ValueError(f"{source} runs bfloat16 x with n in {FUSED_TC_N} and C a multiple of {C_multiple}; got "
                         f"{x.dtype}, n={n}, C={C}: call ops with backend='auto' (dispatch picks a kernel that "
                         "serves this shape) or backend='portable'")


def _forward_cluster(x, M, hpre_raw, hpost_raw, w, eps):
    B, n, C = x.shape
    _check_tc_token("mhc_forward_cluster", x, 64 * CLUSTER)
    S = C // CLUSTER  # columns per CTA; shared floats per its header: x slice, agg, hpre, hpost, 33
    return _launch("mhc_forward_cluster", "bf16", n, [x, M, hpre_raw, hpost_raw, w], [(B, n, C), (B,)],
                   [x.dtype, F32], [n, C, eps], (B * CLUSTER * CLUSTER_THREADS, 1, 1), n * S // 2 + S + 2 * n + 33,
                   CLUSTER_THREADS)


def _ring_fixed_floats(n: int, C: int) -> int:
    """mhc_forward_ring's shared floats besides its ring (its header): agg * w, Ms, hpre, hpost, scratch, w."""
    return 2 * C + n * n + 2 * n + 64


def _ring_chunks(n: int, C: int) -> int:
    """A token's RING_CHUNK_BYTES chunks (bfloat16: n x C / 4096 of them; both ring kernels)."""
    return -(-2 * n * C // RING_CHUNK_BYTES)


def _free_slots(fixed_floats: int) -> int:
    """RING_CHUNK_BYTES slots that this GPU's shared memory per CTA holds beside `fixed_floats` floats."""
    return (device.max_shared_memory_per_block() - 4 * fixed_floats) // RING_CHUNK_BYTES


def ring_smem_bytes(n: int, C: int) -> int:
    """Shared memory of mhc_forward_ring with a ring of exactly a token's chunks (its least; the
    dispatch rule's condition, dispatch.SMEM_NEEDS)."""
    return _ring_chunks(n, C) * RING_CHUNK_BYTES + 4 * _ring_fixed_floats(n, C)


def _ring_slots(n: int, C: int) -> int:
    """Chunk slots of mhc_forward_ring's ring: as many as this GPU's shared memory per CTA holds."""
    return _free_slots(_ring_fixed_floats(n, C))


def ring_units(C: int) -> int:
    """The forward ring's groups a slot for width C: the widest built that C is a multiple of
    (STEP_COLS units columns). A lane's copies and stores then cover 32 units contiguous bytes of a
    row: same-run A/B on the H200 (scripts/gpu_source_ab.py, queued forward, median us), units 1 /
    2 / 4: (1024, 32, 2048) 122.2 / 109.7 / 105.9, (1024, 16, 4096) 130.3 / 111.4 / 106.0, (4096,
    16, 1024) 136.7 / 123.1 / 113.4, (1024, 32, 3072) 172.8 / 153.4 / 148.1."""
    return next(u for u in RING_UNITS if C % (STEP_COLS * u) == 0)


def _forward_ring(x, L, hpre_raw, hpost_raw, w, iters, eps):
    B, n, C = x.shape
    _check_tc_token("mhc_forward_ring", x, STEP_COLS)
    R, K = _ring_slots(n, C), _ring_chunks(n, C)
    if R < K:
        raise ValueError(f"mhc_forward_ring keeps a whole token in shared memory: n={n}, C={C} needs {K} chunk slots "
                         f"of {RING_CHUNK_BYTES} bytes, this GPU's shared memory holds {R}: call ops with "
                         "backend='auto' (dispatch picks a kernel that serves this shape) or backend='portable'")
    G = min(B, device.sm_count())  # one persistent CTA per SM
    return _launch("mhc_forward_ring", "bf16", n, [x, L, hpre_raw, hpost_raw, w], [(B, n, C), (B,), (n, n)],
                   [x.dtype, F32, F32], [n, C, B, iters, eps, R], (G * RING_THREADS, 1, 1),
                   R * RING_CHUNK_BYTES // 4 + _ring_fixed_floats(n, C), RING_THREADS, ring_units(C))


def _fused_tc_ring_floats(dtype, n: int, C: int, nmax: int) -> int:
    """Shared floats of mhc_forward_fused's tensor-core pass 2 (its header: bfloat16, n == NMAX in
    FUSED_TC_N, C a multiple of FUSED_TC_COLS): FUSED_TC_STAGES chunks of n x FUSED_TC_COLS
    bfloat16, + 4 floats to reach a 16-byte boundary; 0 elsewhere."""
    if dtype != mx.bfloat16 or n != nmax or nmax not in FUSED_TC_N or C % FUSED_TC_COLS:
        return 0
    return FUSED_TC_STAGES * n * FUSED_TC_COLS // 2 + 4


# cuda_src/mhc_forward_resident.cu: per dtype tag, (most threads per CTA, registers per thread at
# most) from its __launch_bounds__; a thread holds 8 / NMAX 16-byte vectors of every stream.
RESIDENT_FWD_LIMITS = {"f32": (512, 64), "f16": (256, 80), "bf16": (256, 80)}
# float32 launches 512 threads from C > 2048 (n <= 4): a single THREADS entry failed those launches
BLOCK_THREADS["mhc_forward_resident"] = {tag: limit for tag, (limit, _) in RESIDENT_FWD_LIMITS.items()}
RESIDENT_FWD_SMEM = 64 + 4 * 4 + 2 * 4  # floats: reduction halves, M, H_pre, H_post (NMAX <= 4)
RESIDENT_BWD_CTAS = 2  # cuda_src/mhc_backward_resident.cu: __launch_bounds__(THREADS, 2)


def _resident_ctas(threads: int, regs: int) -> int:
    """CTAs of `threads` threads that fit one SM by threads and by registers (kernel's cap)."""
    return max(1, min(32, 2048 // threads, 65536 // (threads * regs)))


def _forward_resident(x, L, hpre_raw, hpost_raw, w, iters, eps):
    B, n, C = x.shape
    tag = dtype_tag(x.dtype)
    _, _, nmax = _binary("mhc_forward_resident", tag, n)
    max_threads, regs = RESIDENT_FWD_LIMITS[tag]
    per_thread = (16 // x.dtype.size) * (8 // nmax)  # columns a thread holds
    threads = 32 * -(-C // (32 * per_thread))
    if threads > max_threads:
        raise ValueError(f"mhc_forward_resident holds at most {max_threads * per_thread} columns of a "
                         f"{x.dtype} token at n={n}; got C={C} (dispatch.RESIDENT_MAX_C bounds the strategy)")
    G = min(B, device.sm_count() * _resident_ctas(threads, regs))
    return _launch("mhc_forward_resident", tag, n, [x, L, hpre_raw, hpost_raw, w], [(B, n, C), (B,), (n, n)],
                   [x.dtype, F32, F32], [n, C, B, iters, eps], (G * threads, 1, 1), RESIDENT_FWD_SMEM, threads)


def _backward_resident_smem_floats(n: int, C: int, itemsize: int) -> int:
    """Shared memory of mhc_backward_resident (its header): parameters + x and dout of a token."""
    nmax = 2 if n <= 2 else 4
    params = 64 + nmax * nmax + 2 * nmax + (THREADS // 32) * (nmax * nmax + 2 * nmax)
    return params + -(-2 * n * C * itemsize // 4)


def _backward_resident(x, M, hpre_raw, hpost_raw, w, inv_rms, dout):
    B, n, C = x.shape
    smem = 4 * _backward_resident_smem_floats(n, C, x.dtype.size)
    G = min(B, device.sm_count() * min(RESIDENT_BWD_CTAS, device.resident_ctas_per_sm(launch_smem(smem))))
    dx, partial = _launch("mhc_backward_resident", dtype_tag(x.dtype), n,
                          [x, dout, M, hpre_raw, hpost_raw, w, inv_rms], [(B, n, C), (G, n * n + 2 * n + C)],
                          [x.dtype, F32], [n, C, B], (G * THREADS, 1, 1), smem // 4)
    return dx, partial


def _forward_column(x, M, hpre_raw, hpost_raw, w, eps):
    B, n, C = x.shape
    pad = _pad(n, 0)
    ntiles = -(-C // TILE_C)
    (partial,) = _launch("mhc_forward_column_rms", dtype_tag(x.dtype), None, [x, hpre_raw], [(B, ntiles)], [F32],
                         [n, C], (ntiles * THREADS, B, 1), pad + 32)
    return _launch("mhc_forward_column", dtype_tag(x.dtype), None, [x, M, hpre_raw, hpost_raw, w, partial],
                   [(B, n, C), (B,)], [x.dtype, F32], [n, C, eps], (ntiles * THREADS, B, 1),
                   n * pad + 2 * pad + 32 + TILE_C)


def _backward_smem_floats(n: int, C: int) -> int:
    """Shared memory of mhc_backward_fused (layout in its header), in floats."""
    _, _, nmax = _binary("mhc_backward_fused", "f32", n)
    pad, ib, nwarps = _pad(n, nmax), _ib(nmax), THREADS // 32
    thread_slots = THREADS * ib + (nwarps * nmax * ib if nmax in (2, 4) else 0)
    return n * pad + 2 * pad + 32 + n * n + 2 * pad + nwarps * pad + thread_slots + 3 * C


def _dm_partials(x, dout):
    """Per-CTA partial sums [G, n*n] of dM[i, j] = sum over tokens and columns of dout[i] x[j]: on
    tensor cores for bfloat16 at n = 16 / 32 with C a multiple of DM_TC_CHUNK (mhc_backward_dm_tc),
    else on CUDA cores (mhc_backward_dm)."""
    B, n, C = x.shape
    if x.dtype == mx.bfloat16 and n in DM_TC_N and C % DM_TC_CHUNK == 0:
        smem = DM_TC_STAGES * 2 * n * DM_TC_CHUNK // 2  # floats: the stages of dout and x rows (bfloat16)
        G = min(B * (C // DM_TC_CHUNK), device.sm_count() * device.resident_ctas_per_sm(launch_smem(4 * smem)))
        (partial,) = _launch("mhc_backward_dm_tc", "bf16", n, [x, dout], [(G, n * n)], [F32], [n, C, B],
                             (G * DM_TC_THREADS, 1, 1), smem, DM_TC_THREADS)
        return partial
    G = min(B * -(-C // DM_CHUNK), 2 * device.sm_count())
    (partial,) = _launch("mhc_backward_dm", dtype_tag(x.dtype), None, [x, dout], [(G, n * n)], [F32], [n, C, B],
                         (G * THREADS, 1, 1), 2 * n * (DM_CHUNK + 1) + n * n)
    return partial


REDUCE_COLS = 32  # cuda_src/mhc_backward_reduce.cu: COLS


def _backward(x, M, hpre_raw, hpost_raw, w, inv_rms, dout):
    B, n, C = x.shape
    dm_in_partial = True  # dM in the CTAs' partials (resident, ring, fused n <= 4): no partial_dm
    strategy = dispatch.choose_backward(n, C, B=B, dtype=x.dtype).strategy
    if (strategy == "resident"
            and 4 * _backward_resident_smem_floats(n, C, x.dtype.size) <= device.max_shared_memory_per_block()):
        dx, partial = _backward_resident(x, M, hpre_raw, hpost_raw, w, inv_rms, dout)
    elif strategy == "ring":
        dx, partial = _backward_ring(x, M, hpre_raw, hpost_raw, w, inv_rms, dout)
    else:
        tag = dtype_tag(x.dtype)
        _, _, nmax = _binary("mhc_backward_fused", tag, n)
        G = min(B, 2 * device.sm_count())
        dx, partial = _launch("mhc_backward_fused", tag, n, [x, dout, M, hpre_raw, hpost_raw, w, inv_rms],
                              [(B, n, C), (G, n * n + 2 * n + C)], [x.dtype, F32], [n, C, B], (G * THREADS, 1, 1),
                              _backward_smem_floats(n, C))
        dm_in_partial = nmax in (2, 4)
    # the reduce ignores partial_dm when G_dm == 0: `partial` stands in (no placeholder launch)
    partial_dm = partial if dm_in_partial else _dm_partials(x, dout)
    G_dm = 0 if dm_in_partial else partial_dm.shape[0]
    G, P = partial.shape
    # cuda_src/mhc_backward_reduce.cu: REDUCE_COLS columns per CTA, its warps splitting the G rows
    dM, dpre, dpost, dw = _launch("mhc_backward_reduce", None, None, [partial, partial_dm, hpre_raw, hpost_raw],
                                  [(n, n), (n,), (n,), (C,)], [F32] * 4, [G, G_dm, n, C],
                                  (-(-P // REDUCE_COLS) * THREADS, 1, 1), (THREADS // REDUCE_COLS) * (REDUCE_COLS + 1))
    return dx, dM, dpre, dpost, dw


def _reference_graph_from_M(x, M, hpre_raw, hpost_raw, w, eps):
    H_pre, H_post = reference.activate_pre_post(hpre_raw, hpost_raw)
    y = reference.rms_norm(reference.stream_aggregate(x, H_pre), w, eps)
    return (reference.stream_mix(x, M) + reference.stream_distribute(y, H_post)).astype(x.dtype)


def _backward_ring_fixed_floats(n: int, C: int) -> int:
    """mhc_backward_ring's shared floats besides its rings (its header): agg, g, dw, M^T, hpre, hpost, scratch."""
    return 3 * C + n * n + 2 * n + 32


def _backward_ring_min_slots(n: int, C: int) -> int:
    """mhc_backward_ring's fewest ring slots: a token's dout chunks and two x slots (pair p + 1 must be
    on its way when pass A waits for it), and room for the warps' sums at the end (BRING_THREADS / 32
    x (n*n + 2n) floats over the rings)."""
    sums = 4 * (BRING_THREADS // 32) * (n * n + 2 * n)
    return max(_ring_chunks(n, C) + 2, -(-sums // RING_CHUNK_BYTES))


def backward_ring_smem_bytes(n: int, C: int) -> int:
    """Shared memory of mhc_backward_ring with its fewest ring slots (its least)."""
    return _backward_ring_min_slots(n, C) * RING_CHUNK_BYTES + 4 * _backward_ring_fixed_floats(n, C)


def _backward_ring(x, M, hpre_raw, hpost_raw, w, inv_rms, dout):
    B, n, C = x.shape
    _check_tc_token("mhc_backward_ring", x, STEP_COLS)  # C a multiple of its chunk (128 / 256 columns) and step
    K, slots = _ring_chunks(n, C), _free_slots(_backward_ring_fixed_floats(n, C))
    if slots < _backward_ring_min_slots(n, C):
        raise ValueError(f"mhc_backward_ring keeps a token's dout in shared memory: n={n}, C={C} needs "
                         f"{_backward_ring_min_slots(n, C)} chunk slots of {RING_CHUNK_BYTES} bytes, this GPU's shared "
                         f"memory holds {slots}: call ops with backend='auto' (dispatch picks a kernel that serves "
                         "this shape) or backend='portable'")
    RX = min(BRING_MAX_X_SLOTS, slots - K)  # the x ring; dout's holds a token and what is left
    RD = slots - RX
    G = min(B, device.sm_count())  # one persistent CTA per SM
    return _launch("mhc_backward_ring", "bf16", n, [x, dout, M, hpre_raw, hpost_raw, w, inv_rms],
                   [(B, n, C), (G, n * n + 2 * n + C)], [x.dtype, F32], [n, C, B, RD, RX],
                   (G * BRING_THREADS, 1, 1), slots * RING_CHUNK_BYTES // 4 + _backward_ring_fixed_floats(n, C),
                   BRING_THREADS)


def _backward_in_mlx(n: int, C: int) -> bool:
    """Documented rule (dispatch.BACKWARD_MAX_C, or the fused backward's shared memory over the
    GPU's): such tokens take MLX's own VJP of the reference's matmul-free graph, exact in float32
    (MLX's float32 matmuls use TF32 on CUDA by default)."""
    return (dispatch.choose_backward(n, C).strategy == "portable"
            or 4 * _backward_smem_floats(n, C) > device.max_shared_memory_per_block())


# ---------------------------------------------------------------- stream_mix_add
def _mix_add(x, M, bias):
    B, n, C = x.shape
    _, _, nmax = _binary("mhc_stream_mix_add", dtype_tag(x.dtype), n)
    ntiles = -(-C // TILE_C)
    (out,) = _launch("mhc_stream_mix_add", dtype_tag(x.dtype), n, [x, M, bias], [(B, n, C)], [x.dtype], [n, C],
                     (ntiles * THREADS, B, 1), n * _pad(n, nmax))
    return out


def _mix_add_dM(x, dout):
    # the backward's dM kernel, not an MLX matmul (TF32 on CUDA)
    return _dm_partials(x, dout).sum(axis=0).reshape(x.shape[1], x.shape[1])


_ops = kernel_ops.build(kernel_ops.Launchers(
    sinkhorn_fwd=_sinkhorn_fwd, sinkhorn_bwd=_sinkhorn_bwd,
    forward={"fused": _forward_fused, "column": _forward_column, "cluster": _forward_cluster}, backward=_backward,
    forward_from_logits={"resident": _forward_resident, "ring": _forward_ring},
    backward_in_mlx=_backward_in_mlx, mlx_graph=_reference_graph_from_M,
    mix_add=_mix_add, mix_add_dM=_mix_add_dM))
sinkhorn, mhc_forward, stream_mix_add, _forward_fn = _ops.sinkhorn, _ops.mhc_forward, _ops.stream_mix_add, _ops.forward_fn
