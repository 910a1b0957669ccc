"""Which implementation runs an op, decided by rules that are data.

A rule names a backend (cpu, cuda, metal), an op, a strategy, the largest B and C it serves
(None = no limit) and why. The first matching rule wins; `explain()` says which
rule matched and why, and `mhc info --dispatch` prints `RULES`. The reference never appears
here: it runs only when a caller passes backend="reference".
"""

from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass

import mlx.core as mx

from . import device as gpu
from . import manifest

BACKENDS = ("auto", "cpu", "cuda", "metal", "portable", "reference")
STRATEGIES = ("portable", "resident", "cluster", "ring", "fused", "column", "sinkhorn", "mix_add")


@dataclass(frozen=True)
class Rule:
    backend: str  # device backend the rule applies to
    op: str  # "sinkhorn", "mhc_forward", "mhc_backward" or "stream_mix_add"
    strategy: str  # what runs
    max_B: int | None  # tokens at most (None = any)
    max_C: int | None  # channels at most (None = any)
    why: str
    min_B: int = 1  # tokens at least (a rule with min_B > 1 never matches an unknown B)
    min_n: int = 1  # streams at least
    min_C: int = 1  # channels at least
    max_n: int | None = None  # streams at most (None = any)
    n_in: tuple[int, ...] | None = None  # exactly these n (None = any)
    C_multiple: int = 1  # C a multiple of this
    dtypes: tuple[str, ...] | None = None  # x's dtype tag among these (None = any; an unknown dtype never matches)
    min_sm: int = 0  # the CUDA GPU's compute capability at least (90 = sm_90)
    without_cuda_graphs: bool = False  # only where MLX launches kernels directly (MLX_USE_CUDA_GRAPHS=0)
    smem_need: str | None = None  # a key of SMEM_NEEDS: the kernel's shared memory for (n, C) must fit the GPU's

    def matches(self, B: int | None, C: int, n: int, dtype: str | None = None, sm: int = 0,
                cuda_graphs: bool = True, smem: int = 0) -> bool:
        return ((self.smem_need is None or smem_needed(self.smem_need, n, C) <= smem)
                and (self.max_B is None or (B is not None and B <= self.max_B))
                and (self.min_B <= 1 or (B is not None and B >= self.min_B))
                and n >= self.min_n and (self.max_n is None or n <= self.max_n)
                and (self.n_in is None or n in self.n_in) and C % self.C_multiple == 0
                and (self.dtypes is None or dtype in self.dtypes) and sm >= self.min_sm
                and not (self.without_cuda_graphs and cuda_graphs)
                and self.min_C <= C and (self.max_C is None or C <= self.max_C))


# Streams the generic Metal kernels hold per-stream values for in threadgroup memory
# (metal_src/mhc_common.h GENERIC_N_LIMIT, mhc_aot.metal.GENERIC_N_LIMIT)
METAL_GENERIC_N_LIMIT = 256
# Streams the Metal coefficient kernel's per-token matrices fit in threadgroup memory for
# (metal_src/mhc_dynamic_coeffs.metal COEFFS_N_LIMIT, mhc_aot.metal_dynamic.COEFFS_N_LIMIT)
METAL_COEFFS_N_LIMIT = 32


# `fused` runs one CTA per token and keeps agg (C floats) in shared memory: up to FUSED_MAX_C
# channels. `column` tiles each token's C over CTAs and reads x twice. Where column runs below
# FUSED_MAX_C, it was measured faster on the H100 (bf16, MLX 0.32.4, 2026-11-23):
#  - few tokens, wide (COLUMN_FEW_TOKENS): latency mode (1, 32, 8192): fused 427 us (one CTA
#    streams the whole 512 KB token) vs column 164 us; (1, 32, 4096): 231 vs 213 us; for
#    n*C <= 32*2048 fused was faster (157-208 us at C 1024-2048, and every B <= 256 queued at
#    n <= 8 or C = 512 in scripts/gpu_dispatch_sweep.py);
#  - n = 32 at C >= 2048 from 64 to 256 tokens (COLUMN_MID_B): column 1.0-1.3x faster queued
#    (the fused CTA's n x C token outgrows L1 and its mix pass re-reads it from L2); at 1024 tokens
#    fused was faster again (374 vs 397 us at (1024, 32, 2048)), hence the upper bound.
# (The column numbers at B = 1 predate the compiled forward; the fused ones do not.)
# The fused backward keeps 3 C floats per CTA in shared memory: up to BACKWARD_MAX_C channels;
# wider rows take MLX's own VJP of the portable graph (documented here, shown by `mhc info`).
# `resident` (CUDA only, n <= RESIDENT_MAX_N, C <= RESIDENT_MAX_C: cuda_src/mhc_*_resident.cu)
# keeps each token on chip from its load to its store, so x (and dout) are read from DRAM once, and
# the forward runs the Sinkhorn in the same launch. H100, bf16, (4096, 4, 4096): see docs/HISTORY.md; the
# fused forward there was 146 us per call (131 its kernel alone, a copy of x 98) and fused
# forward + backward 971 us. The backward takes it only where its token (x and dout: 2 n C
# elements, 64 KB in bf16 at the limits) fits the GPU's shared memory per block, else `fused`.
# `cluster` (CUDA only, cuda_src/mhc_forward_cluster.cu): a thread block cluster of 4 CTAs per token,
# each holding n x C/4 of it in shared memory, so x is read once even where a token outgrows one
# CTA (the fused kernel re-reads it through L2). Its tensor-core mix needs bfloat16 and n = 16 or
# 32; a CTA's quarter must be 64 columns of whole ldmatrix segments; n = 32 at C = 12288 needs
# 209 KB of shared memory per CTA; clusters need sm_90. And it runs only where MLX launches kernels
# directly (MLX_USE_CUDA_GRAPHS=0): MLX 0.32.4 keys its CUDA graph cache by node type, not by a
# kernel's cluster shape, and updates a cached executable graph in place, so after a graph that
# held this kernel, a later graph of the same shape launched an ordinary kernel in clusters of 4
# (H200: every forward whose grid was not a multiple of 4 failed to launch and left its output
# unwritten, with no error). The compile-time cluster shape (__cluster_dims__) is all MLX's
# custom-kernel primitive allows; a launch attribute it could key by is not exposed.
CLUSTER_FORWARD = dict(n_in=(16, 32), dtypes=("bf16",), C_multiple=256, max_C=12288, min_sm=90,
                       without_cuda_graphs=True)
# `ring` (CUDA, cuda_src/mhc_forward_ring.cu: bfloat16, n = 16 / 32, C % 256 == 0): one persistent
# CTA per SM, each warp streaming its own column groups of the CTA's tokens through its own ring in
# shared memory, x read once, the Sinkhorn in the same launch, no clusters (so CUDA graphs stay
# on). Its rings must hold a whole token (SMEM_NEEDS["ring"]: n = 32 up to C = 3072 on a 227 KB
# GPU, 2048 on an A100's 163 KB). H200, MLX 0.32.4, graphs on, same-run A/B against these rules
# without it (scripts/gpu_strategy_ab.py, session 12's kernel, queued forward, median us):
# (1024, 32, 2048) 125.3 vs 230.3 (fused), (1024, 32, 3072) 175.4 vs 362.5, (4096, 32, 1024) 205.3
# vs 543.6, (256, 32, 2048) 55.9 vs 104.1 (column), (64, 32, 2048) 43.8 vs 52.1, (32, 32, 2048)
# 34.4 vs 48.5, (1, 32, 2048) 34.7 vs 44.6; n = 16: (4096, 16, 1024) 139.5 vs 254.8, (1024, 16,
# 2048) 82.2 vs 112.0, (4096, 16, 2048) 231.2 vs 367.8, (1024, 16, 4096) 134.5 vs 205.7, (256, 16,
# 4096) 54.5 vs 68.1; evaluated latency mode alike. max_C is the widest measured (wider tokens fit
# but leave the rings little room to load the next token early). Session 13's kernel (wider ring
# slots, a faster Sinkhorn) is faster still on the ring's side: (1024, 32, 2048) 97.7 and (1024,
# 32, 3072) 140.0 in scripts/gpu_source_ab.py; the comparison without the rule was not re-run.
RING_FORWARD = dict(dtypes=("bf16",), C_multiple=256, smem_need="ring")
RING_MAX_C = {32: 3072, 16: 4096}
# The backward's `ring` (cuda_src/mhc_backward_ring.cu, same conditions; its dout ring holds a token:
# n = 32 up to C = 2560 on a 227 KB GPU): x and dout read once, dout kept in shared memory for dx,
# every parameter gradient from the same pass on tensor cores, where `fused` re-reads both through
# L2 and needs a second kernel for dM (ncu, (1024, 32, 2048): 574 us at 24% of DRAM peak + 64 for
# dM). H200, graphs on, same-run A/B with the forward ring in both (scripts/gpu_strategy_ab.py
# backward_ring, queued forward + backward, median us): (1024, 32, 2048) 430.5 vs 988.4,
# (4096, 32, 1024) 808.7 vs 2013.8, (256, 32, 2048) 157.2 vs 308.1, (64, 32, 2048) 101.5 vs 162.2,
# (32, 32, 2048) 97.3 vs 155.8, (1, 32, 2048) 96.5 vs 145.5; n = 16: (4096, 16, 1024) 474.2 vs 856.9,
# (1024, 16, 2048) 273.6 vs 413.8, (4096, 16, 2048) 888.9 vs 1406.4, (1024, 16, 4096) 484.6 vs
# 800.7, (256, 16, 4096) 164.7 vs 259.6; latency mode alike. max_C: the widest measured.
RING_BACKWARD = dict(dtypes=("bf16",), C_multiple=256, smem_need="backward_ring")
RING_BACKWARD_MAX_C = {32: 2048, 16: 4096}


# shared memory (bytes) a strategy's kernel needs for (n, C), by the name a rule's smem_need gives:
# functions of mhc_aot.cuda (the launchers' own arithmetic), looked up when a rule asks
SMEM_NEEDS = {"ring": "ring_smem_bytes", "backward_ring": "backward_ring_smem_bytes"}


def smem_needed(key: str, n: int, C: int) -> int:
    from . import cuda  # cuda imports this module

    return getattr(cuda, SMEM_NEEDS[key])(n, C)


RESIDENT_MAX_N = 4
RESIDENT_MAX_C = 4096
FUSED_MAX_C = 49152
COLUMN_FEW_TOKENS = dict(max_B=7, min_n=32, min_C=4096)
COLUMN_MID_B = dict(min_B=64, max_B=256, min_n=32, min_C=2048)
BACKWARD_MAX_C = 16384


def _gpu_rules(backend: str) -> tuple[Rule, ...]:
    def rule(op, strategy, why, max_B=None, max_C=None, **limits):
        return Rule(backend, op, strategy, max_B, max_C, why, **limits)

    few, mid, cl = COLUMN_FEW_TOKENS, COLUMN_MID_B, CLUSTER_FORWARD
    resident = (  # CUDA kernels only (no Metal twins)
        rule("mhc_forward", "resident", f"n <= {RESIDENT_MAX_N}, C <= {RESIDENT_MAX_C}: Sinkhorn and forward in one "
             "launch, each token in registers from load to store (x read once, never re-read)",
             max_C=RESIDENT_MAX_C, max_n=RESIDENT_MAX_N),
        rule("mhc_backward", "resident", f"n <= {RESIDENT_MAX_N}, C <= {RESIDENT_MAX_C}: x and dout in shared memory "
             "once per token, parameter gradients in registers (fused where the token outgrows shared memory)",
             max_C=RESIDENT_MAX_C, max_n=RESIDENT_MAX_N),
        rule("mhc_forward", "cluster", "bfloat16, n in {16, 32}, C a multiple of 256 up to 12288, sm_90+, "
             "MLX_USE_CUDA_GRAPHS=0 (MLX's graph cache ignores cluster shapes): a cluster of 4 CTAs per token, "
             "each holding n x C/4 of it in shared memory from one read of x, the RMS sum crossing the cluster "
             "through distributed shared memory", **cl),
        *(rule("mhc_forward", "ring", f"bfloat16, n = {n}, C a multiple of 256 up to {max_C}, a token in one "
               "CTA's shared memory: one persistent CTA per SM, each warp streaming its column groups of the "
               "tokens through its own ring (x read once, the next token's loads under this one's math), "
               "Sinkhorn in the same launch",
               max_C=max_C, n_in=(n,), **RING_FORWARD) for n, max_C in RING_MAX_C.items()),
        *(rule("mhc_backward", "ring", f"bfloat16, n = {n}, C a multiple of 256 up to {max_C}, a token's dout in "
               "one CTA's shared memory: one persistent CTA per SM streams x and dout once, keeps dout for dx and "
               "takes every parameter gradient (dM included) from the same pass on tensor cores",
               max_C=max_C, n_in=(n,), **RING_BACKWARD)
          for n, max_C in RING_BACKWARD_MAX_C.items()),
    ) if backend == "cuda" else ()
    return (
        rule("sinkhorn", "sinkhorn", "one CTA runs all iterations of the tiny [n, n] problem in one launch"),
        *resident,
        rule("mhc_forward", "column", f"B <= {few['max_B']}, n >= {few['min_n']}, C >= {few['min_C']}: one CTA "
             "per token would stream a whole wide token alone (measured 2.6x slower at (1, 32, 8192))", **few),
        rule("mhc_forward", "column", f"{mid['min_B']} <= B <= {mid['max_B']}, n >= {mid['min_n']}, "
             f"C >= {mid['min_C']}: measured 1.0-1.3x faster than fused (the fused CTA re-reads its n x C "
             "token from L2)", **mid),
        rule("mhc_forward", "fused", "one CTA per token: aggregate, RMS, mix and add with x read from DRAM once "
             "(a token beyond L1, e.g. n = 32 at C = 2048, is re-read through L2 by the mix)",
             max_C=FUSED_MAX_C),
        rule("mhc_forward", "column", f"C > {FUSED_MAX_C}: agg does not fit one CTA's shared memory"),
        rule("mhc_backward", "fused", "one pass per token for dx, per-CTA partial parameter gradients, one "
             "deterministic reduce", max_C=BACKWARD_MAX_C),
        rule("mhc_backward", "portable", f"C > {BACKWARD_MAX_C}: too wide for the fused backward's shared memory; "
             "MLX's VJP of the portable graph"),
        rule("stream_mix_add", "mix_add", "one pass: out = M x + bias, tiles of C across CTAs"),
    )


RULES: tuple[Rule, ...] = (
    *_gpu_rules("cuda"),
    # Metal: the same kernels and thresholds, written for Apple GPUs but never run here
    *_gpu_rules("metal"),
    *(Rule("cpu", op, "portable", None, None, "MLX has no custom-kernel primitive on its CPU backend")
      for op in ("sinkhorn", "mhc_forward", "mhc_backward", "stream_mix_add")),
    # Dynamic mHC (mhc_aot/dynamic.py): CUDA kernels (mhc_aot/cuda_dynamic.py)
    *(Rule("cuda", op, "fused", None, None, why) for op, why in (
        ("mhc_coeffs", "RMS scale and projection in one pass over x, then per-token activations and "
                       "Sinkhorn: a lane group per token for n <= 8 from 1024 tokens (x_in then one more "
                       "pass), else a CTA per token with x_in fused (cuda_dynamic.LANES_*)"),
        ("mhc_pre", "one pass: x_in = h_pre . x"),
        ("mhc_post_res", "one pass: out = h_res x + h_post f_out"))),
    # Metal (mhc_aot/metal_dynamic.py): kernels for the streams their threadgroup memory holds
    # (the coefficients' matrices: METAL_COEFFS_N_LIMIT; the token passes' per-stream values: mhc_aot/metal.py's
    # GENERIC_N_LIMIT), MLX ops above
    Rule("metal", "mhc_coeffs", "fused", None, None,
         f"n <= {METAL_COEFFS_N_LIMIT}: projection as one MLX matmul, then RMS scale, activations, Sinkhorn and x_in "
         "a threadgroup per token; backward: their derivatives a threadgroup per token, dx and dphi as MLX matmuls",
         max_n=METAL_COEFFS_N_LIMIT),
    Rule("metal", "mhc_coeffs", "portable", None, None,
         f"n > {METAL_COEFFS_N_LIMIT}: more streams than the Metal coefficient kernel's threadgroup memory holds: "
         "MLX ops (DynamicMHC then takes x_in from the pre kernel)"),
    *(Rule("metal", op, "fused", None, None, f"n <= {METAL_GENERIC_N_LIMIT}: {why}", max_n=METAL_GENERIC_N_LIMIT)
      for op, why in (("mhc_pre", "one pass: x_in = h_pre . x"),
                      ("mhc_post_res", "one pass: out = h_res x + h_post f_out"))),
    *(Rule("metal", op, "portable", None, None, f"n > {METAL_GENERIC_N_LIMIT}: more streams than the Metal "
           "kernels' threadgroup memory holds: MLX ops") for op in ("mhc_pre", "mhc_post_res")),
    *(Rule("cpu", op, "portable", None, None, "MLX has no custom-kernel primitive on its CPU backend")
      for op in ("mhc_coeffs", "mhc_pre", "mhc_post_res")),
)


@dataclass(frozen=True)
class Choice:
    backend: str
    strategy: str
    rule: Rule | None
    reason: str


@functools.lru_cache(maxsize=1)
def _gpu_backend() -> str:
    return "cuda" if mx.cuda.is_available() else "metal" if mx.metal.is_available() else "cpu"


def device_backend(device: mx.Device | None = None) -> str:
    """'cuda', 'metal' or 'cpu': the MLX backend that runs on `device` (default device if None)."""
    device = device or mx.default_device()
    return _gpu_backend() if device.type == mx.gpu else "cpu"


def dtype_tag(dtype: mx.Dtype | str | None) -> str | None:
    """The rules' dtype tag (f32 / f16 / bf16) of an mx dtype, a dtype name ("bfloat16") or a tag."""
    if dtype is None:
        return None
    name = dtype if isinstance(dtype, str) else str(dtype).split(".")[-1]
    return manifest.DTYPE_TAGS.get(name, name)


def cuda_graphs() -> bool:
    """Whether MLX's CUDA backend records kernels into CUDA graphs (its default; MLX_USE_CUDA_GRAPHS=0
    turns it off, read by MLX once per process, as here)."""
    try:
        return int(os.environ.get("MLX_USE_CUDA_GRAPHS", "1")) != 0
    except ValueError:
        return True


@functools.lru_cache(maxsize=1)
def cuda_sm() -> int:
    """This machine's CUDA compute capability as an integer (90 for sm_90); 0 without MLX's CUDA backend."""
    return gpu.mlx_arch_number() if mx.cuda.is_available() else 0


def choose(op: str, n: int, C: int, backend: str = "auto", B: int | None = None,
           dtype: mx.Dtype | str | None = None, sm: int | None = None, graphs: bool | None = None,
           smem: int | None = None) -> Choice:
    """Pick the strategy for `op` on B tokens of n x C values of `dtype` (an mx dtype, its name or
    its tag; rules that name dtypes never match an unknown one), on a CUDA GPU of compute capability `sm`
    that allows `smem` bytes of shared memory per block, with MLX's CUDA graphs on or off (None:
    this machine's, cuda_sm() and cuda_graphs(); smem: this GPU's where `sm` is this machine's, else
    the table's for `sm`, 0 for a GPU unknown to it).

    backend: "auto" follows MLX's default device; "cpu"/"portable" force MLX ops; "reference"
    forces the readable reference; "cuda"/"metal" force kernels of that backend.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "reference":
        return Choice("reference", "reference", None, "backend='reference' was asked for explicitly")
    if backend == "portable":
        return Choice("cpu", "portable", None, "backend='portable' was asked for explicitly")
    device = device_backend() if backend == "auto" else backend
    tag = dtype_tag(dtype)
    sm = (cuda_sm() if sm is None else sm) if device == "cuda" else 0
    graphs = cuda_graphs() if graphs is None else graphs
    if smem is None:
        smem = (gpu.max_shared_memory_per_block() if device == "cuda" and sm and sm == cuda_sm()
                else gpu.smem_per_block_of(sm))
    for rule in RULES:
        if rule.backend == device and rule.op == op and rule.matches(B, C, n, tag, sm, graphs, smem):
            return Choice(device, rule.strategy, rule, rule.why)
    raise ValueError(f"no dispatch rule for op={op!r} on backend={device!r}")


def choose_backward(n: int, C: int, backend: str = "cuda", B: int | None = None,
                    dtype: mx.Dtype | str | None = None) -> Choice:
    return choose("mhc_backward", n, C, backend, B, dtype)


def explain(op: str, n: int, C: int, backend: str = "auto", B: int | None = None,
            dtype: mx.Dtype | str | None = None) -> str:
    """One line: what runs for this op and shape, and why."""
    c = choose(op, n, C, backend, B, dtype)
    shape = (f"B={B}, " if B is not None else "") + f"n={n}, C={C}" + (f", {dtype}" if dtype is not None else "")
    return f"{op}({shape}) on {c.backend}: {c.strategy} - {c.reason}"


def rules_table() -> list[dict]:
    """The rule table as rows, for `mhc info --dispatch` and JSON output (tuples as lists, as JSON has them)."""
    return [{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(r).items()} for r in RULES]
