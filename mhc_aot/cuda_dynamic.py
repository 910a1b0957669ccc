"""CUDA launchers of dynamic mHC (cuda_src/mhc_dynamic_*.cu) through the launch helper of
`mhc_aot.cuda` (cubin for this GPU, else PTX; NaN-poisoned outputs under
`testing.poisoned_outputs()`; shared-memory buckets). Gradients: `mx.custom_function` VJPs
that launch the backward kernels.

Kernels per op (geometry mirrors each kernel's header comment; grids are given in threads):
  mhc_coeffs    forward  few tokens (PROJ_*), n <= 4: coeffs_proj alone (a CTA per token projects it
                         itself, phi in its own dtype; the CTA mode below, with x_in), else
                         [phi_split: phi's bfloat16 terms in fragment order, once] -> proj_tc
                         (bfloat16 x, n <= 4: mma.sync, four-stage cp.async) or skinny
                         (z = vec(x) @ phi, K split S ways, + sum of squares)
                         -> coeffs: RMS scale, activations, Sinkhorn per token, by a half-warp
                            with a lane per matrix element (n <= ELEMS_MAX_N) or a lane group
                            (n <= 8), from LANES_MIN_T tokens (then x_in by pre), else by a CTA
                            (with x_in)
                backward [pre_bwd without dx: the dots dx_in . x, lane mode only]
                         -> coeffs_bwd (sigmoid and Sinkhorn backward; a half-warp per token with
                            a lane per matrix element (n <= ELEMS_MAX_N), a lane group or a CTA)
                         -> dx (token-tiled dz @ phi^T + RMS term + h_pre dx_in [+ post_res's dx])
                         -> dphi_tc (bfloat16 x, n <= 4: tensor cores) or skinny (dphi = x^T dz,
                            tokens split S ways) -> colsum (dphi unless S = 1, db, dalpha: one launch)
                 [mhc_dynamic_coeffs_pre: projection + coefficients + x_in with x read from DRAM once,
                  a persistent grid, tiles moved by TMA (sm_90a, C % 8 == 0); dispatched from
                  CP_MIN_T tokens at the shapes of its rule (CP_SHAPES), else the three kernels above]
  mhc_pre       pre / pre_bwd (per token)
  mhc_post_res  post_res (x and f read once) / post_res_bwd (per token)
DynamicMHC reads x in post_res through an alias output of mhc_coeffs (x itself, see coeffs), so
post_res's x-gradient reaches coeffs' backward and dx adds it: one pass instead of MLX's add.
Nothing accumulates with atomics: per-CTA (or per-token) partials and a fixed-order reduce.
Documented exits to the portable graph (MLX ops): a per-token Sinkhorn that does not fit one
CTA's shared memory (forward: 2 n n + 2 tmax n floats, backward with its history: (tmax + 1) n n
+ 2 tmax n floats; large n only), and F's output in a dtype other than x's (post_res).
"""

from __future__ import annotations

import functools
import itertools

import mlx.core as mx

from . import cuda, device, dispatch, tma
from .kernel_ops import compiled_call, dtype_tag, scalars_of, single

F32 = mx.float32
THREADS = cuda.THREADS  # cuda_src/mhc_common.cuh
WARPS = THREADS // 32
SK_RB, SK_MB, SK_JC = 64, 32, 32  # cuda_src/mhc_dynamic_skinny.cu
DX_TT, DX_KB = 64, 128  # cuda_src/mhc_dynamic_dx.cu
TC_TB, TC_MP, TC_KC, TC_SMEM_BYTES = 128, 24, 64, 92160  # cuda_src/mhc_dynamic_proj_tc.cu (three terms)
# mhc_dynamic_phi_split: a thread per (k16 step, n8 tile, lane) slot, each writing `terms` uint2 terms
TC_STEP_SLOTS = 3 * 32
TC_STEP_U32 = TC_STEP_SLOTS * 2  # a k16 step's fragments, one term
# phi's bfloat16 terms in the projection when phi is bfloat16: it is then its own first term, so one
# gives the same product as three (the variant MHC_PHI_TERMS = 1) in a third of the MMAs; a float32
# (or float16) phi takes three. A knob for same-run A/Bs (scripts/gpu_dynamic_ab.py @BF16_PHI_TERMS=3).
BF16_PHI_TERMS = 1


def _tc_smem_bytes(terms: int) -> int:
    """proj_tc's shared memory: its x stages and two stages of phi's fragments, `terms` terms each."""
    return TC_SMEM_BYTES - 2 * (3 - terms) * (TC_KC // 16) * TC_STEP_SLOTS * 8
DPHI_KB, DPHI_TC, DPHI_SMEM_BYTES = 128, 64, 88064  # cuda_src/mhc_dynamic_dphi_tc.cu
POST_RES_BWD_CHUNK = 8  # cuda_src/mhc_dynamic_post_res_bwd.cu
# mhc_dynamic_coeffs(_bwd) lane mode: a group of lanes (the power of two >= n) per token, synchronised
# by __syncwarp, for n <= LANES_MAX_N and at least LANES_MIN_T tokens, LANES_THREADS per CTA; x_in and
# the backward's stream dots then come from mhc_dynamic_pre / mhc_dynamic_pre_bwd, pure streams over x.
# Few tokens keep one CTA per token (mode 0): its x_in is fused, one launch fewer, which is what
# counts at small T. (ncu, H100, T = 8192, one thread per token: forward 80 us, backward 128 us at
# 3% occupancy, serial-latency bound; CTA per token: 311 / 621 us holding x behind barriers.)
LANES_MAX_N, LANES_MIN_T, LANES_THREADS = 8, 1024, 128
# Element mode of the forward (lanes = ELEMS, n <= ELEMS_MAX_N = dyn::LANE_N, from LANES_MIN_T tokens):
# a half-warp per token, a lane per matrix element, ELEMS_THREADS per CTA (cuda_src/mhc_dynamic_coeffs.cu).
# (Same-run A/B, H200, DynamicMHC forward: 372.5 vs 381.3 us at T = 8192, n = 4, C = 4096, 94.0 vs
# 101.8 at T = 1024, the same at (4096, 4, 2048) and (8192, 2, 4096), against the register mode, which
# the forward no longer has; ncu: 37-39 us vs 47-54.) The forward's modes: a CTA per token, elements,
# lane groups (n > ELEMS_MAX_N). The alphas and b come through shared memory (3 + M floats), one load per
# CTA (ncu, H200, T = 8192, n = 4: 26.7 us vs 38.1 with every warp loading them; forward A/B 370.4 vs
# 373.5 us at (8192, 4, 4096), 232.5 vs 241.2 at (8192, 2, 4096)), in CTAs of ELEMS_THREADS: every CTA's
# load of those few addresses queues at their L2 slices, so the fewer CTAs the better (kernel's MAX_BLOCK;
# same-run A/B, H200, forward: 356.1 us at T = 8192, n = 4, C = 4096 vs 361.4 with 128 threads and 359.2
# with 256; 117.7 vs 122.8 / 126.1 at T = 2048; the same within noise at (16384, 4, 2048)). Most of what
# was left waited on the alphas' 4-byte arrays in MLX's managed small pool: on the tensor-core path the
# coefficient kernels (forward and backward) read phi_split's copy of them in an ordinary array (its
# header; same-run A/B, H200, forward at (8192, 4, 4096): 342.9 vs 356.4 us, ncu 11.2-11.6 us vs ~26;
# forward + backward 1231.7 vs 1238.4; within noise at T = 32 and 1024; docs/HISTORY.md, session 19).
ELEMS, ELEMS_MAX_N, ELEMS_THREADS = -2, 4, 1024
# The backward's element mode (the same rule: n <= ELEMS_MAX_N, from LANES_MIN_T tokens): a half-warp per
# token, its Sinkhorn history (~2 KB at n = 4, tmax = 20) in shared memory, ELEMS_BWD_THREADS per CTA
# (16 tokens: 32 KB, seven CTAs an SM). It replaced a register mode (a thread per token, its matrices in
# registers: one serial chain of ~4 tmax phases per thread at ~2 warps an SM; ncu, H200, T = 8192, n = 4:
# 52 us). Same-run A/B, H200, DynamicMHC forward + backward, bfloat16, sorted medians of 5 rounds:
# 1192.2 vs 1220.2 us at (8192, 4, 4096), 371.8 vs 408.1 at (4096, 4, 2048), 1280.7 vs 1328.5 at
# (16384, 4, 2048), 704.2 vs 709.0 at (8192, 2, 4096) (docs/HISTORY.md, session 33).
ELEMS_BWD_THREADS = 256
COLSUM_CTA_ROWS = 64  # colsum: above this many rows, one CTA per column
# mhc_dynamic_coeffs_pre: coefficients + x_in reading x from DRAM once (bfloat16, n <= CP_NMAX, with x_in,
# from CP_MIN_T tokens, on sm_90 (its sm_90a cubin: TMA) with C % 8 == 0 (TMA's 16-byte row strides)): a
# persistent grid of groups of ceil(C / CP_CW) CTAs walking CP_TT-token tiles. It reads x from DRAM once
# (ncu, its ring: 270 MB for x's 268) where the three kernels read ~600 MB, but it is paced by its
# hand-over (README, Results), not by DRAM: it pays where DRAM is slow next to the SMs. The rule
# (CP_SHAPES): tokens of at least CP_MIN_K = n C values, C <= CP_MAX_C and a bfloat16 phi (its one-term
# products), where it was timed ahead: with n <= 4 that is n = 4, C = 4096 today (C = 2048 was mixed,
# larger C untimed; the bounds widen with the next A/B, `gpu_check.sh dynamic_ab`). A float32 phi (three
# terms) tied on the H200 at (8192, 4, 4096) (session 22, below) and is untimed on the H100 with this
# kernel: the three kernels until it is.
# Same-run A/B, session 38, H100 (scripts/gpu_dynamic_ab.py --phi-dtype bfloat16, DynamicMHC forward,
# identity F, medians of 3 rounds, us, one-read / three kernels): (8192, 4, 4096) 403.7 / 451.6,
# (16384, 4, 4096) 762.5 / 869.6, (2048, 4, 4096) 133.0 / 139.8, (1024, 4, 4096) 101.9 / 115.3; outside the
# rule (8192, 4, 2048) 235.3 / 242.4 (spread 228-244), (4096, 4, 2048) 139.8 / 135.1. H200, (8192, 4, 4096):
# 327.9 / 337.8 and 335.6 / 337.4 (session 28), 322.6-341.8 / 333.5-344.5 in session 32's calls but one
# machine's 362.7-368.8 / 333.5, ahead at T = 1024; slower outside the rule: (8192, 2, 4096) 253.0 / 212.6,
# (4096, 4, 2048) 120.8 / 110.0, (16384, 4, 2048) 362.1 / 345.4 (session 22, a float32 phi).
# Tests and the A/B scripts set CP_SHAPES = False (and CP_MIN_T) to run it at any shape.
CP_TT, CP_CW, CP_RL, CP_NMAX, CP_BLOCK, CP_SMEM_BYTES, CP_NSLOT = 32, 128, 25, 4, 512, 223424, 8  # its header
CP_BOXC, CP_ARCH = 64, 90  # its TMA boxes' columns (128-byte swizzled lines); the one arch its cubin runs on
CP_MIN_T: int | None = 1024  # None: never
CP_SHAPES = True
CP_MIN_K, CP_MAX_C = 16384, 4096
# mhc_dynamic_coeffs_proj: for few tokens (n <= PROJ_NMAX) a CTA per token projects its own token, phi read
# in its own dtype: one launch for the coefficients (and x_in) instead of phi_split, proj_tc and coeffs
# (and, until session 34, phi's cast before them). Few tokens are host-bound (scripts/dynamic_host_probe.py,
# H200, T = 32: ~14-20 us of async_eval a kernel), but every CTA reads all of phi from L2, so the rule
# bounds those bytes, T n C M itemsize: ncu, H200, n = 4, C = 4096, bfloat16 phi, the kernel takes ~34 us at
# T = 32 and ~51 at T = 256. Same-run A/B on the H200, session 30 (gpu_dynamic_ab.py --source
# mhc_dynamic_coeffs_proj proj=@PROJ_MAX_T=100000, PROJ_PHI_BYTES=1000000000000 partials=@PROJ_MAX_T=0,
# DynamicMHC forward, identity F, medians of 3 rounds, us, this kernel / the three-kernel path): bfloat16
# phi (T, n, C) (32, 4, 4096) 57.8 / 78.9, (256, 4, 4096) 60.7 / 84.5, (1024, 4, 1024) 65.8 / 75.1 [201 MB
# of phi each at most], (512, 4, 4096) 83.7 / 76.2, (1024, 4, 2048) 106.9 / 77.8 [402 MB]; float32 phi (32,
# 4, 4096) 62.3 / 84.8, (128, 4, 4096) 55.2 / 73.7 [201 MB], (256, 4, 4096) 79.0 / 75.8 [402 MB]. So: at
# most 201 MB (PROJ_PHI_BYTES) and T <= 1024 (the most tokens timed). The host's speed moves these medians
# by tens of us from one machine to the next, and near the bound the order with them: the same A/B on a
# slower host read 95.2 / 132.2 at (512, 4, 4096), where the extra launches of the three-kernel path cost
# more; the bound is the faster host's.
PROJ_MAX_T: int | None = 1024
PROJ_PHI_BYTES = 256 * 4 * 4096 * 24 * 2  # phi's bytes read from L2 by all CTAs together, T n C M itemsize
PROJ_NMAX, PROJ_PV = 4, 8  # its header: PV


# mhc_dynamic_proj_cluster: the projection and x_in with x read from DRAM once, in thread block clusters of
# PC_CLUSTER CTAs that split a token's columns (PC_CW of each stream a CTA) and sum their partials through
# distributed shared memory; then mhc_dynamic_coeffs forms the coefficients from its sums (one split).
# bfloat16 x and phi (one term), n <= PC_NMAX, (PC_CLUSTER - 1) PC_CW < C <= PC_CLUSTER PC_CW (a whole
# cluster's columns used), C % 8 == 0, from PC_MIN_T tokens, sm_90 (its sm_90a cubin: TMA, clusters), and
# only where MLX launches kernels directly (MLX_USE_CUDA_GRAPHS=0): MLX 0.32.4's graph cache does not
# key a kernel node by a compile-time cluster shape (mhc_aot/dispatch.py, strategy `cluster`). PC_CLUSTERS:
# clusters in the grid (None: as many as the SMs hold, one CTA an SM); PROJ_CLUSTER: the rule's knob.
PC_CLUSTER, PC_TT, PC_CW, PC_NMAX, PC_BLOCK, PC_SMEM_BYTES, PC_BOXC, PC_ARCH = 8, 16, 512, 4, 512, 226840, 64, 90
PC_MIN_T = 1024
# the launch sizes' table (cuda.BLOCK_THREADS): the largest CTA of each source here not launched with THREADS
cuda.BLOCK_THREADS.update(mhc_dynamic_coeffs=max(THREADS, LANES_THREADS, ELEMS_THREADS),
                          mhc_dynamic_coeffs_bwd=max(THREADS, LANES_THREADS, ELEMS_BWD_THREADS),
                          mhc_dynamic_coeffs_pre=CP_BLOCK, mhc_dynamic_proj_cluster=PC_BLOCK)
PC_CLUSTERS: int | None = None
# Off: slower than the three kernels in this first version (a serial tile loop; docs/HISTORY.md, session 37)
PROJ_CLUSTER = False

_launch = cuda._launch
_tag = dtype_tag


def _nmax(source: str, tag: str | None, n: int) -> int:
    return cuda._binary(source, tag, n)[2]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def sinkhorn_floats(n: int, tmax: int, slots: int) -> int:
    return slots * n * n + 2 * tmax * n  # cuda_src/mhc_dynamic_common.cuh


def _fits(floats: int) -> bool:
    return 4 * floats <= device.max_shared_memory_per_block()


def coeffs_cta_floats(n: int, tmax: int) -> int:
    """Shared floats of mhc_dynamic_coeffs's CTA mode: mix, the residual logits, h_pre, then an area
    for the Sinkhorn's rows that first holds the partial sums' WARPS x 32 scratch (its header)."""
    return n * n + 2 * n + n * n + n + max(sinkhorn_floats(n, tmax, 2), 32 * WARPS)


# ---------------------------------------------------------------- shared building blocks
PHI_KINDS = {mx.float32: 0, mx.bfloat16: 1, mx.float16: 2}  # phi_kind of the kernels that read phi as it is


def _skinny(A: mx.array, B: mx.array, R: int, J: int, Mc: int, sr: int, sj: int, want_sq: bool, tag: str):
    """part [S, R, Mc] (and sq [S, R]) of sum_j A(r, j) B(j, m) over S splits of j: enough
    CTAs for ~4 per SM whatever R is."""
    rt, mt = _cdiv(R, SK_RB), _cdiv(Mc, SK_MB)
    S = max(1, min(_cdiv(J, SK_JC), _cdiv(4 * device.sm_count(), rt * mt)))
    jsplit = _cdiv(_cdiv(J, S), SK_JC) * SK_JC
    S = _cdiv(J, jsplit)
    part, sq = _launch("mhc_dynamic_skinny", tag, None, [A, B], [(S, R, Mc), (S, R) if want_sq else (1,)],
                       [F32, F32], [R, J, Mc, sr, sj, jsplit, int(want_sq)], (mt * THREADS, rt, S))
    return part, sq, S


def _uses_phi_split(tag: str | None, M: int) -> bool:
    """The forward projection runs on tensor cores (bfloat16 x, M <= 24): phi_split precedes it."""
    return tag == "bf16" and M <= TC_MP


def _from_consts(consts: mx.array) -> tuple:
    """(b, alpha_pre, alpha_post, alpha_res) as views of phi_split's consts [3 + M] (no copies)."""
    return consts[3:], consts[0:1], consts[1:2], consts[2:3]


def _projection(xk: mx.array, phi: mx.array, params: tuple, T: int, K: int, M: int, tag: str, terms: int = 3):
    """part [S, T, M], sq [S, T], S of z = vec(x) @ phi (tensor cores for bfloat16 x and M <= 24,
    n <= 4, with phi in `terms` bfloat16 terms (1 only for a bfloat16 phi), else the
    CUDA-core skinny kernel), and consts: phi_split's copy of params = (b, alpha_pre, alpha_post,
    alpha_res) on the tensor-core path (its header says why the coefficient kernels read that copy),
    else None."""
    if not _uses_phi_split(tag, M):
        return (*_skinny(xk, phi.astype(F32), T, K, M, K, 1, True, tag), None)
    # phi's three bfloat16 terms in the MMAs' fragment order, once: every token tile reads the same chunks,
    # which each proj_tc CTA used to load and split itself (same-run A/B, H200, forward: 358.7 vs 369.7 us
    # at T = 8192, n = 4, C = 4096; 71.2 vs 74.8 at T = 32, 74.5 vs 77.9 at T = 1024; within noise at
    # (4096, 4, 2048) and (8192, 2, 4096); ncu: phi_split 3.3 us, proj_tc 88-90 vs 105)
    steps = _cdiv(K, TC_KC) * (TC_KC // 16)
    b32, ap, apo, ar = params
    frag, consts = _launch("mhc_dynamic_phi_split", None, None, [phi, b32, ap, apo, ar],
                           [(steps * TC_STEP_U32 * terms,), (3 + M,)], [mx.uint32, F32],
                           [K, M, steps, terms, PHI_KINDS[phi.dtype]],
                           (_cdiv(steps * TC_STEP_SLOTS, THREADS) * THREADS, 1, 1))
    tiles = _cdiv(T, TC_TB)
    smem = _tc_smem_bytes(terms)
    # as many K splits as keep every CTA resident at once: a partial second wave would double the time
    resident = device.resident_ctas_per_sm(cuda.launch_smem(smem)) * device.sm_count()
    # (split s takes K chunks s, s + S, ...: the kernel's header says why)
    S = max(1, min(_cdiv(K, TC_KC), resident // tiles))
    part, sq = _launch("mhc_dynamic_proj_tc", "bf16", None, [xk, frag], [(S, T, M), (S, T)], [F32, F32],
                       [T, K, M], (THREADS, S, tiles), smem // 4, terms=terms)
    return part, sq, S, consts


def _dphi_partials(xk: mx.array, dz: mx.array, T: int, K: int, M: int, tag: str):
    """part [S, K, M] of dphi = x^T dz over S splits of the tokens: tensor cores for bfloat16 x and
    M <= 24 (n <= 4), else the CUDA-core skinny kernel."""
    if tag != "bf16" or M > TC_MP:
        part, _, S = _skinny(xk, dz, K, T, M, 1, K, False, tag)
        return part, S
    tiles = _cdiv(K, DPHI_KB)
    # as many token splits as keep every CTA resident at once (as _projection)
    resident = device.resident_ctas_per_sm(cuda.launch_smem(DPHI_SMEM_BYTES)) * device.sm_count()
    S = max(1, min(_cdiv(T, DPHI_TC), resident // tiles))
    tsplit = _cdiv(_cdiv(T, S), DPHI_TC) * DPHI_TC
    S = _cdiv(T, tsplit)
    (part,) = _launch("mhc_dynamic_dphi_tc", "bf16", None, [xk, dz], [(S, K, M)], [F32], [T, K, M, tsplit],
                      (THREADS, tiles, S), DPHI_SMEM_BYTES // 4)
    return part, S


def _colsums(a: mx.array, b: mx.array | None = None) -> list[mx.array]:
    """Sums over the rows of a [Ra, Na] (and of b [Rb, Nb]) in one launch: per problem, a thread
    per column for few rows, a CTA per column for many."""
    problems = [a] if b is None else [a, b]
    ctas, scalars = 0, []
    for p in problems:
        R, N = p.shape
        per_cta = R > COLSUM_CTA_ROWS
        ctas += N if per_cta else _cdiv(N, THREADS)
        scalars += [R, N, int(per_cta)]
    if b is None:  # b's slots: a itself as an input never read, a one-float output never written
        scalars += [0, 0, 0]
    outs = _launch("mhc_dynamic_colsum", None, None, [a, a if b is None else b],
                   [(a.shape[1],), (1,) if b is None else (b.shape[1],)], [F32, F32], scalars, (ctas * THREADS, 1, 1))
    return outs[: len(problems)]


# ---------------------------------------------------------------- mhc_coeffs (+ pre)
def _lanes(n: int, T: int) -> int:
    """Lanes per token of the lane mode (a lane group), 0 for one CTA per token."""
    if n > LANES_MAX_N or T < LANES_MIN_T:
        return 0
    return _group_lanes(n)


def _group_lanes(n: int) -> int:
    """Lanes per token of a lane group: the power of two >= n."""
    return 1 << max(0, n - 1).bit_length()


def _lane_slice(lanes: int, floats: int) -> int | None:
    """Shared floats per token of a lane-mode launch (odd: neighbouring groups' slices start in
    different banks), or None when LANES_THREADS / lanes of them do not fit one CTA."""
    slice_ = floats | 1
    return slice_ if lanes and _fits(LANES_THREADS // lanes * slice_) else None


def _elems_bwd_slice(n: int, tmax: int) -> int | None:
    """Shared floats per token (a half-warp) of the backward's element mode: its Sinkhorn history (odd,
    as _lane_slice), or None when ELEMS_BWD_THREADS / 16 of them do not fit one CTA (a very long tmax)."""
    slice_ = sinkhorn_floats(n, tmax, tmax + 1) | 1
    return slice_ if _fits(ELEMS_BWD_THREADS // 16 * slice_) else None


def _lane_grid(T: int, lanes: int, threads: int = LANES_THREADS) -> tuple[int, int, int]:
    """Grid (threads) of a lane-mode launch: `lanes` threads per token, `threads` per CTA."""
    return (_cdiv(T * lanes, threads) * threads, 1, 1)


def proj_smem_bytes(n: int, C: int, tmax: int, itemsize: int) -> int:
    """mhc_dynamic_coeffs_proj's shared memory in bytes: the CTA mode's floats (rounded up to 16 bytes), the
    threads' partial sums and the token (n C values); 0 where that exceeds a CTA's (not that kernel)."""
    need = 4 * (-(-coeffs_cta_floats(n, tmax) // 4) * 4 + THREADS * PROJ_PV) + n * C * itemsize
    return need if need <= device.max_shared_memory_per_block() else 0


def _uses_proj(T: int, n: int, C: int, dtype, tmax: int, phi_dtype) -> bool:
    """The coefficients by mhc_dynamic_coeffs_proj: few tokens (at most PROJ_MAX_T, and phi read from L2 by
    every CTA at most PROJ_PHI_BYTES), n <= PROJ_NMAX, the token in shared memory."""
    M = n * n + 2 * n
    return (PROJ_MAX_T is not None and T <= PROJ_MAX_T and T * n * C * M * phi_dtype.size <= PROJ_PHI_BYTES
            and n <= PROJ_NMAX and proj_smem_bytes(n, C, tmax, dtype.size) > 0)


def coeffs_pre_groups(T: int, n: int, C: int, dtype, phi_dtype=mx.bfloat16) -> int:
    """Groups of mhc_dynamic_coeffs_pre's persistent grid for x [T, n, C] (0: not that kernel): one
    CTA per SM, so the groups of ceil(C / CP_CW) CTAs that the GPU holds at once, at most one per tile."""
    if CP_MIN_T is None or dtype != mx.bfloat16 or n > CP_NMAX or T < CP_MIN_T or C % 8:
        return 0
    if CP_SHAPES and not (n * C >= CP_MIN_K and C <= CP_MAX_C and phi_dtype == mx.bfloat16):
        return 0
    if device.mlx_arch_number() != CP_ARCH:  # its one cubin is sm_90a (TMA)
        return 0
    if device.max_shared_memory_per_block() < CP_SMEM_BYTES:
        return 0
    S = _cdiv(C, CP_CW)
    resident = device.resident_ctas_per_sm(cuda.launch_smem(CP_SMEM_BYTES)) * device.sm_count()
    return min(_cdiv(T, CP_TT), resident // S)


def _x_tile_map(T: int, n: int, C: int, box_cols: int, box_tokens: int) -> mx.array:
    """The TMA map template of bfloat16 x [T, n, C] for the one-read kernels: x as (C, T, n) in boxes of
    box_cols columns x box_tokens tokens x n streams, 128-byte swizzle: a box lands as n x box_tokens lines
    of 128 bytes, a stream's tokens consecutive (the kernels' ldmatrix rows)."""
    return tma.template("bf16", (C, T, n), (n * C * 2, C * 2), (box_cols, box_tokens, n), 128)


def proj_cluster_clusters(T: int, n: int, C: int, dtype, phi_dtype) -> int:
    """Clusters of mhc_dynamic_proj_cluster's grid for x [T, n, C] (0: not that kernel; its rule above)."""
    if not PROJ_CLUSTER or dispatch.cuda_graphs() or dtype != mx.bfloat16 or phi_dtype != mx.bfloat16:
        return 0
    if n > PC_NMAX or C % 8 or not (PC_CLUSTER - 1) * PC_CW < C <= PC_CLUSTER * PC_CW or T < PC_MIN_T:
        return 0
    if device.mlx_arch_number() != PC_ARCH or device.max_shared_memory_per_block() < PC_SMEM_BYTES:
        return 0
    clusters = PC_CLUSTERS or max(1, device.resident_ctas_per_sm(cuda.launch_smem(PC_SMEM_BYTES))
                                  * device.sm_count() // PC_CLUSTER)
    return min(_cdiv(T, PC_TT), clusters)


def _proj_cluster(x3, phi, b32, ap, cfg, clusters: int):
    """mhc_dynamic_proj_cluster: (x_in [T, C], part [1, T, M], sq [1, T]), x read once."""
    T, n, C = x3.shape
    M = n * n + 2 * n
    tmpl = _x_tile_map(T, n, C, PC_BOXC, PC_TT)
    P = clusters * PC_CLUSTER
    outs = _launch("mhc_dynamic_proj_cluster", "bf16", n, [x3, tmpl, phi, b32, ap],
                   [(T, C), (1, T, M), (1, T), (P * 32,)], [x3.dtype, F32, F32, mx.uint32],
                   [n, C, T, cfg.rms_eps, cfg.pre_eps], (P * PC_BLOCK, 1, 1), PC_SMEM_BYTES // 4, PC_BLOCK)
    return outs[0], outs[1], outs[2]


# Each launch of mhc_dynamic_coeffs_pre gets counters of its own. mx.compile merges equal zeros arrays of
# one graph into one buffer, and MLX's CUDA graph orders kernels only by the arrays they write and read,
# so two launches that read one zeroed buffer and nothing of each other's may run at once, their CTAs
# taking tickets from one counter (session 48, H100: two independent launches in one compiled graph died
# with an illegal instruction; test_gpu_coeffs_pre_two_launches_one_graph). So each launch traced pads
# its buffer by a different count of words (the kernel reads the first coeffs_pre_sync_len): launches of
# one graph share a buffer only if CP_SYNC_PAD launches were traced between them.
CP_SYNC_PAD = 4096
_sync_pads = itertools.count()


def coeffs_pre_sync_len(T: int) -> int:
    """int32 counters of mhc_dynamic_coeffs_pre: ticket, projected per tile, then ready per group (G <= tiles).
    Zeroed for a launch; the kernel leaves them counted on (launches that share the buffer in sequence go by
    the ticket's epoch), never zeroed."""
    return 1 + 2 * _cdiv(T, CP_TT)


def coeffs_pre_mailbox_words(G: int, S: int) -> int:
    """uint32 words of mhc_dynamic_coeffs_pre's mailboxes (scratch: 64-bit tagged words, each CTA zeroes
    its own): every group's CP_NSLOT slots of partials [S, CP_TT, CP_RL] and of h_pre [CP_TT, CP_NMAX]."""
    return 2 * G * CP_NSLOT * CP_TT * (S * CP_RL + CP_NMAX)


def _coeffs_pre(x3, phi, b32, ap, apo, ar, cfg, G: int, sync=None, phi_terms: int = 3):
    """mhc_dynamic_coeffs_pre: (h_pre, h_post, h_res, x_in, mix, invr, consts), x read once; consts as
    phi_split's (the alphas and b in an ordinary array for the backward). phi in its own dtype (float32,
    bfloat16 or float16: no float32 copy first). sync: the kernel's
    zeroed counters (default: new zeros; a test passes one buffer to several launches). phi_terms: phi's
    bfloat16 terms in its products, as the projection's (see BF16_PHI_TERMS)."""
    T, n, C = x3.shape
    M, S = n * n + 2 * n, _cdiv(C, CP_CW)
    # its counters, zeroed (the kernel counts on from them: coeffs_pre_sync_len), in a buffer no other
    # launch of a compiled graph shares (CP_SYNC_PAD)
    if sync is None:
        sync = mx.zeros((coeffs_pre_sync_len(T) + next(_sync_pads) % CP_SYNC_PAD,), mx.int32)
    tmpl = _x_tile_map(T, n, C, CP_BOXC, CP_TT)
    outs = _launch("mhc_dynamic_coeffs_pre", "bf16", n, [x3, tmpl, phi, b32, ap, apo, ar, sync],
                   [(T, n), (T, n), (T, n, n), (T, C), (T, M), (T,), (coeffs_pre_mailbox_words(G, S),),
                    (G * S * 32,), (3 + M,)],
                   [F32, F32, F32, x3.dtype, F32, F32, mx.uint32, mx.uint32, F32],
                   [n, C, T, S, G, cfg.tmax, cfg.rms_eps, cfg.pre_eps, cfg.sinkhorn_eps, cfg.post_mult,
                    PHI_KINDS[phi.dtype]],
                   (G * S * CP_BLOCK, 1, 1), CP_SMEM_BYTES // 4, CP_BLOCK, terms=phi_terms)
    return list(outs[:6]) + [outs[8]]


def _coeffs_proj(x3, phi, b32, ap, apo, ar, cfg, with_pre: bool):
    """mhc_dynamic_coeffs_proj: (h_pre, h_post, h_res, x_in (or [1]), mix, invr) of few tokens, phi in its dtype."""
    T, n, C = x3.shape
    M = n * n + 2 * n
    smem = proj_smem_bytes(n, C, cfg.tmax, x3.dtype.size)
    return list(_launch("mhc_dynamic_coeffs_proj", _tag(x3.dtype), n, [x3, phi, b32, ap, apo, ar],
                        [(T, n), (T, n), (T, n, n), (T, C) if with_pre else (1,), (T, M), (T,)],
                        [F32, F32, F32, x3.dtype, F32, F32],
                        [n, C, T, cfg.tmax, cfg.rms_eps, cfg.pre_eps, cfg.sinkhorn_eps, cfg.post_mult, int(with_pre),
                         PHI_KINDS[phi.dtype]], (T * THREADS, 1, 1), -(-smem // 4)))


def _coeffs_route(T: int, n: int, C: int, dtype, phi_dtype, tmax: int, with_pre: bool) -> tuple[str, int]:
    """(path, its grid's groups or clusters; 0 where it has none): coeffs_path, with the grid its rule gave."""
    if _uses_proj(T, n, C, dtype, tmax, phi_dtype):
        return "few-token", 0
    G = coeffs_pre_groups(T, n, C, dtype, phi_dtype) if with_pre else 0
    if G:
        return "one-read", G
    P = proj_cluster_clusters(T, n, C, dtype, phi_dtype) if with_pre else 0
    return ("cluster", P) if P else ("projection", 0)


def coeffs_path(T: int, n: int, C: int, dtype, phi_dtype, tmax: int, with_pre: bool) -> str:
    """Which kernels form the coefficients (and x_in with_pre) of x [T, n, C], in the rules' order:
    "few-token" (mhc_dynamic_coeffs_proj), "one-read" (mhc_dynamic_coeffs_pre), "cluster"
    (mhc_dynamic_proj_cluster, then the coefficients), else "projection" (phi_split, proj_tc or the
    skinny product, the coefficients, then pre with_pre: x read twice)."""
    return _coeffs_route(T, n, C, dtype, phi_dtype, tmax, with_pre)[0]


def _coeffs_fwd(x3, phi, b32, ap, apo, ar, cfg, with_pre: bool, phi_terms: int = 3):
    """[h_pre, h_post, h_res, x_in (or [1]), mix, invr, consts]: consts as _projection returns it,
    b32 where it returned None. phi in its own dtype (coeffs_proj, coeffs_pre and phi_split read it so);
    phi_terms: the projection's bfloat16 terms of phi (see BF16_PHI_TERMS)."""
    T, n, C = x3.shape
    K, M, tag = n * C, n * n + 2 * n, _tag(x3.dtype)
    path, grid = _coeffs_route(T, n, C, x3.dtype, phi.dtype, cfg.tmax, with_pre)
    if path == "few-token":
        return [*_coeffs_proj(x3, phi, b32, ap, apo, ar, cfg, with_pre), b32]
    if path == "one-read":
        return _coeffs_pre(x3, phi, b32, ap, apo, ar, cfg, grid, phi_terms=phi_terms)
    x_in = None
    if path == "cluster":  # the projection and x_in in one read of x; the coefficients from its sums below
        x_in, part, sq = _proj_cluster(x3, phi, b32, ap, cfg, grid)
        S, consts = 1, None
    else:  # phi as it is: phi_split reads its dtype (a bfloat16 phi's float32 copy was a launch a forward)
        part, sq, S, consts = _projection(x3.reshape(T, K), phi, (b32, ap, apo, ar), T, K, M, tag, phi_terms)
    if consts is not None:
        b32, ap, apo, ar = _from_consts(consts)
    floats = M + n * n + n + sinkhorn_floats(n, cfg.tmax, 2)
    lanes = _lanes(n, T)
    if lanes and n <= ELEMS_MAX_N:  # a lane per matrix element, else the lane groups _lanes gave
        lanes = ELEMS
    slice_ = 0 if lanes == ELEMS else _lane_slice(lanes, floats)  # registers: no shared memory
    fused_pre = with_pre and slice_ is None and x_in is None  # a CTA per token computes x_in itself
    if slice_ is None:
        mode, geometry = [int(fused_pre), 0, 0], ((T * THREADS, 1, 1), coeffs_cta_floats(n, cfg.tmax), THREADS)
    elif lanes == ELEMS:
        mode, geometry = [0, ELEMS, 0], (_lane_grid(T, 16, ELEMS_THREADS), 3 + M, ELEMS_THREADS)  # the alphas and b
    else:
        mode, geometry = [0, lanes, slice_], (_lane_grid(T, lanes), LANES_THREADS // lanes * slice_, LANES_THREADS)
    outs = list(_launch("mhc_dynamic_coeffs", tag, n, [x3, part, sq, b32, ap, apo, ar],
                        [(T, n), (T, n), (T, n, n), (T, C) if fused_pre else (1,), (T, M), (T,)],
                        [F32, F32, F32, x3.dtype, F32, F32],
                        [n, C, T, S, cfg.tmax, cfg.rms_eps, cfg.pre_eps, cfg.sinkhorn_eps, cfg.post_mult, *mode],
                        *geometry))
    if with_pre and not fused_pre:
        outs[3] = _pre_fwd(x3, outs[0]) if x_in is None else x_in
    # consts for the backward (b32, unread there, where no phi_split ran: see _coeffs_bwd)
    return outs + [b32 if consts is None else consts]


def _coeffs_bwd_smem(n: int, tmax: int, nmax: int) -> int:
    M, nr = n * n + 2 * n, max(nmax, 1)
    return 2 * M + n * n + n + WARPS * nr + nr + sinkhorn_floats(n, tmax, tmax + 1)


def _pre_bwd(x3, h_pre, g, want_dx: bool):
    """mhc_dynamic_pre_bwd: (dx [T, n, C] or an unwritten [1], dots [T, n] = sum_c g[t, c] x[t, j, c])."""
    T, n, C = x3.shape
    tag = _tag(x3.dtype)
    nr = max(_nmax("mhc_dynamic_pre_bwd", tag, n), 1)
    return _launch("mhc_dynamic_pre_bwd", tag, n, [x3, h_pre, g], [(T, n, C) if want_dx else (1,), (T, n)],
                   [x3.dtype, F32], [n, C, int(want_dx)], (T * THREADS, 1, 1), 2 * n + WARPS * nr + nr)


def _coeffs_bwd(primals, cotangents, outputs, cfg, with_pre: bool, alias: bool):
    x3, phi, b32, ap, apo, ar = primals
    alphas = (ap, apo, ar)  # their cotangents take these shapes (ap ... may become views of consts below)
    phi32 = phi.astype(F32)
    primals = (x3, phi32, b32, ap, apo, ar)
    # alias: the layer's mhc_post_res read x through this op's last output (x itself), so that
    # output's cotangent is x's gradient from post_res: the dx kernel adds it in its one pass
    acc = cotangents[7].astype(x3.dtype).reshape(x3.shape[0], -1) if alias else None
    dh_pre, dh_post, dh_res, dx_in = cotangents[:4]
    h_pre, mix, invr = outputs[0], outputs[4], outputs[5]
    T, n, C = x3.shape
    K, M, tag = n * C, n * n + 2 * n, _tag(x3.dtype)
    if outputs[6].shape[0] == 3 + M:  # the forward ran phi_split (else it passed b32 on): read its copy
        b32, ap, apo, ar = _from_consts(outputs[6])  # (phi_split's header says why)
    # with_pre false: an unused input slot gets x3 itself (the kernels never read it then; a fresh
    # placeholder array would cost a launch)
    g_in = dx_in.astype(x3.dtype) if with_pre else x3
    # alias: the layer discards h_pre, so dh_pre is zero; not passed (MLX would fill it in a launch)
    zero_dh_pre = alias and with_pre
    inputs = [x3, mix, invr, b32, ap, apo, ar, mix if zero_dh_pre else dh_pre.astype(F32), dh_post.astype(F32),
              dh_res.astype(F32), g_in]
    has_pre, has_dh_pre = int(with_pre), int(not zero_dh_pre)
    lanes = _lanes(n, T)
    # element mode (n <= ELEMS_MAX_N): only the Sinkhorn history in each half-warp's slice
    elems = _elems_bwd_slice(n, cfg.tmax) if lanes and n <= ELEMS_MAX_N else None
    if elems is not None:
        lanes, slice_ = ELEMS, elems
    else:
        slice_ = _lane_slice(lanes, 2 * M + n * n + n + sinkhorn_floats(n, cfg.tmax, cfg.tmax + 1))
    if slice_ is not None:
        dots = _pre_bwd(x3, h_pre, g_in, want_dx=False)[1] if with_pre else mix  # mix: an unused slot
        if zero_dh_pre:  # the dots are then dl_pre's whole sum: read from dh_pre's slot, has_pre 0
            inputs[7], dots, has_pre, has_dh_pre = dots, mix, 0, 1
        per_token, threads = (16, ELEMS_BWD_THREADS) if lanes == ELEMS else (lanes, LANES_THREADS)
        mode = [lanes, slice_]
        geometry = (_lane_grid(T, per_token, threads), threads // per_token * slice_, threads)
    else:
        smem = _coeffs_bwd_smem(n, cfg.tmax, _nmax("mhc_dynamic_coeffs_bwd", tag, n))
        if not _fits(smem):
            from . import dynamic

            vjps = dynamic._portable_coeffs_vjp(primals, cotangents, cfg, with_pre)
            vjps = (vjps[0], vjps[1].astype(phi.dtype), *vjps[2:])
            return (vjps[0] + acc.reshape(x3.shape), *vjps[1:]) if alias else vjps
        dots, mode, geometry = mix, [0, 0], ((T * THREADS, 1, 1), smem, THREADS)  # the CTA computes the dots
    dz, factor, rows = _launch("mhc_dynamic_coeffs_bwd", tag, n, inputs + [dots], [(T, M), (T,), (T, M + 3)],
                               [F32, F32, F32], [n, C, T, cfg.tmax, cfg.sinkhorn_eps, cfg.post_mult,
                                                 has_pre, has_dh_pre, *mode], *geometry)
    xk = x3.reshape(T, K)
    # dx reads a float32 phi: a variant reading phi in its dtype (cuda_dynamic.PHI_KINDS, one branch per
    # staged load) made the kernel ~30 us slower at (8192, 4, 4096) even when fed float32 (H200, session 34)
    (dx,) = _launch("mhc_dynamic_dx", tag, None, [xk, dz, phi32, factor, h_pre, g_in, xk if acc is None else acc],
                    [(T, K)], [x3.dtype], [T, K, M, C, n, int(with_pre), int(acc is not None)],
                    (_cdiv(K, DX_KB) * THREADS, _cdiv(T, DX_TT), 1))
    part, S = _dphi_partials(xk, dz, T, K, M, tag)
    if S == 1:  # one token split (small T): its partial is dphi
        dphi, (sums,) = part.reshape(K, M), _colsums(rows)
    else:
        dphi, sums = _colsums(part.reshape(S, K * M), rows)
        dphi = dphi.reshape(K, M)
    return dx.reshape(T, n, C), dphi.astype(phi.dtype), sums[:M], *scalars_of(sums, M, alphas)


@functools.lru_cache(maxsize=None)
def _coeffs_fn(cfg, with_pre: bool, alias: bool, phi_terms: int = 3):
    @mx.custom_function
    def f(x3, phi, b32, ap, apo, ar):
        outs = tuple(_coeffs_fwd(x3, phi, b32, ap, apo, ar, cfg, with_pre, phi_terms))
        # x itself as a last output (MLX shares its buffer: no copy): see _coeffs_bwd
        return (*outs, x3) if alias else outs

    @f.vjp
    def f_vjp(primals, cotangents, outputs):
        return _coeffs_bwd(primals, cotangents, outputs, cfg, with_pre, alias)

    return f


def coeffs(x3, phi, b, alpha_pre, alpha_post, alpha_res, cfg, with_pre: bool, strategy: str = "fused",
           alias: bool = False):
    """(h_pre, h_post, h_res[, x_in][, x]) of x3 [T, n, C]; dynamic.Config cfg. alias (the layer):
    also return x itself, through which the layer's mhc_post_res must read x, so that post_res's
    x-gradient reaches this op's backward and joins its dx in one kernel; and the layer discards h_pre,
    whose cotangent the backward then takes as zero (not passed: _coeffs_bwd)."""
    n = x3.shape[1]
    if not _fits(coeffs_cta_floats(n, cfg.tmax)):
        # the per-token Sinkhorn of a very large n does not fit one CTA's shared memory: MLX ops
        from . import dynamic

        outs = dynamic._portable_coeffs(cfg, with_pre)(x3, phi, b, alpha_pre, alpha_post, alpha_res)
        return (*outs, x3) if alias else outs
    # a bfloat16 phi is exact in one bfloat16 term (its float32 copy holds the same values). phi goes in
    # as it is: the few-token kernel, the one-read kernel and phi_split read it so; skinny and dx get a
    # float32 cast inside the op
    phi_terms = BF16_PHI_TERMS if phi.dtype == mx.bfloat16 else 3
    outs = compiled_call(_coeffs_fn(cfg, with_pre, alias, phi_terms), x3, phi, b.astype(F32),
                         alpha_pre.astype(F32), alpha_post.astype(F32), alpha_res.astype(F32))
    picked = list(outs[:4]) if with_pre else list(outs[:3])
    return (*picked, outs[7]) if alias else tuple(picked)


# ---------------------------------------------------------------- mhc_pre
def _pre_fwd(x3, hp):
    T, n, C = x3.shape
    chunks = _cdiv(_cdiv(C, 16 // x3.itemsize), THREADS)
    (out,) = _launch("mhc_dynamic_pre", _tag(x3.dtype), n, [x3, hp], [(T, C)], [x3.dtype], [n, C],
                     (T * THREADS, chunks, 1))
    return out


@mx.custom_function
def _pre_fn(x3, hp):
    return _pre_fwd(x3, hp)


@_pre_fn.vjp
def _pre_vjp(primals, cotangents, outputs):
    x3, hp = primals
    return tuple(_pre_bwd(x3, hp, single(cotangents).astype(x3.dtype), want_dx=True))


def pre(x3, h_pre, strategy: str = "fused"):
    return compiled_call(_pre_fn, x3, h_pre.astype(F32))


# ---------------------------------------------------------------- mhc_post_res
def _post_res_fwd(x3, f2, hp, hr):
    T, n, C = x3.shape
    chunks = _cdiv(_cdiv(C, 16 // x3.itemsize), THREADS)
    (out,) = _launch("mhc_dynamic_post_res", _tag(x3.dtype), n, [x3, f2, hp, hr], [(T, n, C)], [x3.dtype], [n, C],
                     (T * THREADS, chunks, 1), n * n + n)
    return out


@mx.custom_function
def _post_res_fn(x3, f2, hp, hr):
    return _post_res_fwd(x3, f2, hp, hr)


@_post_res_fn.vjp
def _post_res_vjp(primals, cotangents, outputs):
    x3, f2, hp, hr = primals
    T, n, C = x3.shape
    tag = _tag(x3.dtype)
    nmax = _nmax("mhc_dynamic_post_res_bwd", tag, n)
    R = nmax + nmax * nmax if nmax else POST_RES_BWD_CHUNK + 1
    g = single(cotangents).astype(x3.dtype)
    dx, df, dhp, dhr = _launch("mhc_dynamic_post_res_bwd", tag, n, [x3, f2, hp, hr, g],
                               [(T, n, C), (T, C), (T, n), (T, n, n)], [x3.dtype, x3.dtype, F32, F32], [n, C],
                               (T * THREADS, 1, 1), n * n + n + WARPS * R + R)
    return dx, df, dhp, dhr


def post_res(x3, f2, h_post, h_res, strategy: str = "fused"):
    if f2.dtype != x3.dtype:
        # the kernels read f in x's dtype; Liger reads f in its own dtype: keep its values exact
        from . import dynamic

        return dynamic._portable_post_res(x3, f2, h_post, h_res)
    return compiled_call(_post_res_fn, x3, f2, h_post.astype(F32), h_res.astype(F32))
