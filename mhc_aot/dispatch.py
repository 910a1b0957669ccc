"""Which implementation runs an op, decided by rules that are data.

A rule names a backend (cpu, cuda, metal), an op, a strategy, the largest token it serves
(n * C elements; None = no limit) and why. The first matching rule wins; `explain()` says which
rule matched and why, and `mhc info --dispatch` prints `RULES`. The reference never appears
here: it runs only when a caller passes backend="reference".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import mlx.core as mx

BACKENDS = ("auto", "cpu", "cuda", "metal", "portable", "reference")
STRATEGIES = ("portable", "fused", "column", "sinkhorn", "mix_add")


@dataclass(frozen=True)
class Rule:
    backend: str  # device backend the rule applies to
    op: str  # "mhc_forward", "stream_mix_add" or "sinkhorn"
    strategy: str  # what runs
    max_token_elems: int | None  # n * C at most; None = any
    why: str


# Measured on the H100 with MLX 0.32.4 (see README "Results"): one CTA per token keeps a token
# of up to FUSED_MAX_TOKEN_ELEMS values in registers, so x is read once; beyond that the
# register budget spills and tiles of C over several CTAs (column) are faster.
FUSED_MAX_TOKEN_ELEMS = 32 * 1024

RULES: tuple[Rule, ...] = (
    Rule("cuda", "sinkhorn", "sinkhorn", None, "one CTA runs all iterations of the tiny [n, n] problem"),
    Rule("cuda", "mhc_forward", "fused", FUSED_MAX_TOKEN_ELEMS,
         "token fits one CTA's registers: aggregate, RMS, mix and add in one pass over x"),
    Rule("cuda", "mhc_forward", "column", None,
         "token too large for one CTA: RMS reduction pass, then tiles of C across CTAs"),
    Rule("cuda", "stream_mix_add", "mix_add", None, "one elementwise-like pass: out = M x + bias"),
    Rule("metal", "sinkhorn", "sinkhorn", None, "same design as CUDA (never run: no Apple hardware here)"),
    Rule("metal", "mhc_forward", "fused", FUSED_MAX_TOKEN_ELEMS, "same thresholds as CUDA until measured on Apple GPUs"),
    Rule("metal", "mhc_forward", "column", None, "same thresholds as CUDA until measured on Apple GPUs"),
    Rule("metal", "stream_mix_add", "mix_add", None, "same design as CUDA"),
    Rule("cpu", "sinkhorn", "portable", None, "MLX has no custom-kernel primitive on its CPU backend"),
    Rule("cpu", "mhc_forward", "portable", None, "MLX has no custom-kernel primitive on its CPU backend"),
    Rule("cpu", "stream_mix_add", "portable", None, "MLX has no custom-kernel primitive on its CPU backend"),
)


@dataclass(frozen=True)
class Choice:
    backend: str
    strategy: str
    rule: Rule | None
    reason: str


def device_backend(device: mx.Device | None = None) -> str:
    """'cuda', 'metal' or 'cpu': the MLX backend that runs on `device` (default device if None)."""
    device = device or mx.default_device()
    if device.type == mx.gpu:
        if mx.cuda.is_available():
            return "cuda"
        if mx.metal.is_available():
            return "metal"
    return "cpu"


def choose(op: str, n: int, C: int, backend: str = "auto") -> Choice:
    """Pick the strategy for `op` on a token of n x C values.

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
        if rule.backend != device or rule.op != op:
            continue
        if rule.max_token_elems is not None and n * C > rule.max_token_elems:
            continue
        return Choice(device, rule.strategy, rule, rule.why)
    raise ValueError(f"no dispatch rule for op={op!r} on backend={device!r}")


def explain(op: str, n: int, C: int, backend: str = "auto") -> str:
    """One line: what runs for this op and shape, and why."""
    c = choose(op, n, C, backend)
    limit = "" if c.rule is None or c.rule.max_token_elems is None else f" (n*C={n * C} <= {c.rule.max_token_elems})"
    return f"{op}(n={n}, C={C}) on {c.backend}: {c.strategy}{limit} - {c.reason}"


def rules_table() -> list[dict]:
    """The rule table as rows, for `mhc info --dispatch` and JSON output."""
    return [asdict(r) for r in RULES]
