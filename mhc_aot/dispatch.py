"""Which implementation runs an op, decided by rules that are data.

A rule names a backend (cpu, cuda, metal), an op, a strategy, the largest B and C it serves
(None = no limit) and why. The first matching rule wins; `explain()` says which
rule matched and why, and `mhc info --dispatch` prints `RULES`. The reference never appears
here: it runs only when a caller passes backend="reference".
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import mlx.core as mx

BACKENDS = ("auto", "cpu", "cuda", "metal", "portable", "reference")
STRATEGIES = ("portable", "fused", "column", "sinkhorn", "mix_add")


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

    def matches(self, B: int | None, C: int, n: int = 1) -> bool:
        return ((self.max_B is None or (B is not None and B <= self.max_B))
                and (self.min_B <= 1 or (B is not None and B >= self.min_B))
                and n >= self.min_n and (self.max_C is None or C <= self.max_C))


# `fused` runs one CTA per token and keeps agg (C floats) in shared memory: up to FUSED_MAX_C
# channels. `column` tiles each token's C over CTAs (x read twice). Measured on the H100
# (scripts/gpu_dispatch_sweep.py, bf16, 2026-11-23): for n <= 8, and n = 32 at C = 512, fused is
# as fast or faster at every B from 1 to 256 (small B is bound by the per-call host cost, not by
# idle SMs); at n = 32 and C >= 2048 column wins from B = 64 (1.0-1.3x), where the fused CTA's
# n x C token no longer stays in L1 and the mix pass re-reads it from L2.
# The fused backward keeps 3 C floats per CTA in shared memory: up to BACKWARD_MAX_C channels;
# wider rows take MLX's own VJP of the portable graph (documented here, shown by `mhc info`).
FUSED_MAX_C = 49152
COLUMN_MIN_N, COLUMN_MIN_B, COLUMN_MIN_C = 32, 64, 2048
BACKWARD_MAX_C = 16384

_GPU_RULES = (
    ("sinkhorn", "sinkhorn", None, None, "one CTA runs all iterations of the tiny [n, n] problem in one launch"),
    ("mhc_forward", "fused", None, COLUMN_MIN_C - 1,
     "one CTA per token: aggregate, RMS, mix and add with x read from memory once"),
    ("mhc_forward", "column", None, FUSED_MAX_C,
     f"n >= {COLUMN_MIN_N}, B >= {COLUMN_MIN_B}, C >= {COLUMN_MIN_C}: measured faster than fused (the "
     f"token's n x C values outgrow L1 and fused re-reads them from L2)", COLUMN_MIN_B, COLUMN_MIN_N),
    ("mhc_forward", "fused", None, FUSED_MAX_C,
     "one CTA per token: aggregate, RMS, mix and add with x read from memory once"),
    ("mhc_forward", "column", None, None, f"C > {FUSED_MAX_C}: agg does not fit one CTA's shared memory"),
    ("mhc_backward", "fused", None, BACKWARD_MAX_C,
     "one pass per token for dx, per-CTA partial parameter gradients, one deterministic reduce"),
    ("mhc_backward", "portable", None, None,
     f"C > {BACKWARD_MAX_C}: too wide for the fused backward's shared memory; MLX's VJP of the portable graph"),
    ("stream_mix_add", "mix_add", None, None, "one pass: out = M x + bias, tiles of C across CTAs"),
)

RULES: tuple[Rule, ...] = (
    *(Rule("cuda", *r) for r in _GPU_RULES),
    # Metal: the same kernels and thresholds, written for Apple GPUs but never run here
    *(Rule("metal", *r) for r in _GPU_RULES),
    *(Rule("cpu", op, "portable", None, None, "MLX has no custom-kernel primitive on its CPU backend")
      for op in ("sinkhorn", "mhc_forward", "mhc_backward", "stream_mix_add")),
    # Dynamic mHC (mhc_aot/dynamic.py): CUDA kernels (mhc_aot/cuda_dynamic.py); Metal has none yet.
    *(Rule("cuda", op, "fused", None, None, why) for op, why in (
        ("mhc_coeffs", "RMS scale and projection in one pass over x, per-token activations and Sinkhorn "
                       "in one launch (with mhc_pre fused when the layer asks for x_in)"),
        ("mhc_pre", "one pass: x_in = h_pre . x"),
        ("mhc_post_res", "one pass: out = h_res x + h_post f_out"))),
    *(Rule(backend, op, "portable", None, None,
           "MLX has no custom-kernel primitive on its CPU backend" if backend == "cpu" else
           "no Metal kernels for dynamic mHC yet: MLX ops")
      for backend in ("metal", "cpu") for op in ("mhc_coeffs", "mhc_pre", "mhc_post_res")),
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


def choose(op: str, n: int, C: int, backend: str = "auto", B: int | None = None) -> Choice:
    """Pick the strategy for `op` on B tokens of n x C values.

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
    for rule in RULES:
        if rule.backend == device and rule.op == op and rule.matches(B, C, n):
            return Choice(device, rule.strategy, rule, rule.why)
    raise ValueError(f"no dispatch rule for op={op!r} on backend={device!r}")


def choose_backward(n: int, C: int, backend: str = "cuda") -> Choice:
    return choose("mhc_backward", n, C, backend)


def explain(op: str, n: int, C: int, backend: str = "auto", B: int | None = None) -> str:
    """One line: what runs for this op and shape, and why."""
    c = choose(op, n, C, backend, B)
    shape = f"B={B}, n={n}, C={C}" if B is not None else f"n={n}, C={C}"
    return f"{op}({shape}) on {c.backend}: {c.strategy} - {c.reason}"


def rules_table() -> list[dict]:
    """The rule table as rows, for `mhc info --dispatch` and JSON output."""
    return [asdict(r) for r in RULES]
