"""`mhc validate`: every shipped kernel family of this machine's backend, and the portable path,
forward and backward against the reference (DESIGN.md section 5), on fresh random inputs with
outputs poisoned, with the tolerances of mhc_aot.testing.

Shapes come from dispatch.RULES for the backend under test: for each rule, (B, C) that the rule
wins (first match), on both sides of its limits with --full; n covers the compile-time NMAX
values of the shipped variants and one n above the largest (the generic kernel).
Ground truth is float64: testing.numpy_forward / numpy_sinkhorn for outputs, mx.grad of the same
math in float64 on the CPU stream for gradients (the dynamic ops' readable reference,
mhc_aot.dynamic_reference, run in float64; their outputs are checked against its float32 run).
Outputs pass below the dtype's tolerance, and in
bfloat16 also within testing.BF16_REFERENCE_FACTOR x the reference's own bfloat16 error. Gradients
pass below the tolerance or, where mx.grad of the float32 reference itself cannot reach it (sums of
cancelling terms), within that factor of the reference's own error (as tests/test_gradients.py); a
dynamic op's shared arguments (phi, b, the alphas) also within the tolerance of the sum of their
gradient's terms' magnitudes (TERM_SHAPES), which bounds a cancelling sum's rounding.
"""

from __future__ import annotations

import math
import os
import time
import zlib
from dataclasses import dataclass
from typing import Annotated

import mlx.core as mx
import typer

from mhc_aot import device, dispatch, dynamic_reference, manifest, ops, reference, testing

from . import output
from .options import DtypeOpt, FormatOpt, OutOpt, QuietOpt, parse_dtypes

HELP = """Check every shipped kernel variant family of this machine's backend, and the portable
path, forward and backward against the reference on fresh random inputs with outputs poisoned
(NaN where a kernel does not write), using the tolerances of mhc_aot.testing.

Shapes are chosen from the dispatch rules of the backend so that every strategy runs (both sides
of every limit with --full), n over the compiled NMAX values and above the largest. On MLX's CPU
backend the portable path is what gets validated. Exits 1 naming the failing variant."""

EPILOG = """Examples:

  mhc validate --quick

  mhc validate --full --format json --out validate.json

  mhc validate --dtype bfloat16"""

STATIC_OPS = ("sinkhorn", "mhc_forward", "stream_mix_add")
DYNAMIC_OPS = ("mhc_coeffs", "mhc_pre", "mhc_post_res")  # when this build has dynamic mHC (mhc_aot.dynamic)
DEFAULT_NMAX = (2, 4, 8, 16, 32, 64)
BASE_B, BASE_C = 3, 130  # a few tokens, a C that is not a multiple of any tile
BIG_C_MAX_N = 8  # shapes at C limits of tens of thousands run with small n only (time, memory)
DYNAMIC_MAX_N = 16  # phi is [n C, n n + 2 n]: dynamic shapes stay small in n


@dataclass(frozen=True)
class Check:
    backend: str  # backend= passed to the op: "portable", "cuda" or "metal"
    op: str  # the op called: sinkhorn, mhc_forward, stream_mix_add, mhc_coeffs, mhc_pre, mhc_post_res
    grad: bool  # False: outputs; True: gradients of every input (mx.grad of sum(out * G))
    B: int
    n: int
    C: int
    dtype: str
    strategy: str
    variant: str
    phi: str = "float32"  # mhc_coeffs: phi's dtype (a bfloat16 phi takes the one-read kernel's rule)

    @property
    def name(self) -> str:
        """The op as dispatch names it: the static backward is its own op (mhc_backward)."""
        if self.grad:
            return "mhc_backward" if self.op == "mhc_forward" else f"{self.op} backward"
        return self.op

    @property
    def dispatch_op(self) -> str:
        return "mhc_backward" if self.grad and self.op == "mhc_forward" else self.op

    @property
    def dynamic(self) -> bool:
        return self.op in DYNAMIC_OPS

    @property
    def shape(self) -> str:
        return f"n={self.n}" if self.op == "sinkhorn" else f"{self.B}x{self.n}x{self.C}"


# ---------------------------------------------------------------- what to check
def ops_under_test() -> tuple[str, ...]:
    return STATIC_OPS + (DYNAMIC_OPS if hasattr(ops, "mhc_coeffs_pre") else ())


def backends_under_test() -> list[str]:
    current = dispatch.device_backend()
    return ["portable"] if current == "cpu" else [current, "portable"]


def _manifest_rows() -> list[dict]:
    try:
        return manifest.load()["variants"]
    except manifest.KernelArtifactError:
        return []


def n_values(backend: str, op: str, full: bool) -> list[int]:
    """Every compile-time NMAX of the op's shipped variants, and one n above the largest (the
    generic kernel); quick: n = 4, that n and the smallest NMAX of any strategy n = 4 cannot reach."""
    dispatch_ops = {op, "mhc_backward"} if op == "mhc_forward" else {op}
    rows = [r for r in _manifest_rows()
            if r["op"] in dispatch_ops and (backend == "portable" or r["backend"] == backend)]
    nmax = sorted({r["nmax"] for r in rows if r.get("nmax")})
    if not nmax:
        nmax = [4] if op in DYNAMIC_OPS else list(DEFAULT_NMAX)
    above = nmax[-1] + 1
    if not full:
        # and the smallest NMAX of a strategy whose kernels n = 4 never reaches (cluster: n = 16)
        per_strategy: dict[str, set[int]] = {}
        for r in rows:
            if r.get("nmax") and r["backend"] == backend:
                per_strategy.setdefault(r["strategy"], set()).add(r["nmax"])
        return sorted({4, above, *(min(v) for v in per_strategy.values() if min(v) > 4)})
    vals = sorted({1, 3, *nmax, above})
    return [v for v in vals if op not in DYNAMIC_OPS or v <= DYNAMIC_MAX_N]


def _device_of(backend: str) -> str:
    return "cpu" if backend == "portable" else backend


def _strategy(op: str, n: int, C: int, device: str, B: int, dtype: str | None = None) -> str:
    try:
        return dispatch.choose(op, n, C, device, B=B, dtype=dtype).strategy
    except ValueError:  # no rule: dynamic ops on the CPU run the portable path (mhc_aot.dynamic._choose)
        return "portable" if device == "cpu" else "no rule"


def rule_shapes(backend: str, op: str, n: int, full: bool, all_rules: bool = False,
                dtype: str | None = None) -> list[tuple[int, int, str]]:
    """(B, C, strategy): for every rule of `op` on this backend, a shape that it wins (first match)
    for x of `dtype` (a tag; rules naming dtypes need it), the cheapest; with full also both sides of
    every limit. all_rules adds the other backends' limits (the portable path must be right at their
    shapes too)."""
    device = _device_of(backend)
    sources = [r for r in dispatch.RULES if r.op == op and (r.backend == device or all_rules)]
    b_edges = ({b + d for b in {r.max_B for r in sources if r.max_B} for d in (0, 1)}
               | {r.min_B + d for r in sources if r.min_B > 1 and n >= r.min_n for d in (-1, 0)})
    c_edges = ({c + d for c in {r.max_C for r in sources if r.max_C} for d in (0, 1)}
               | {r.min_C + d for r in sources if r.min_C > 1 and n >= r.min_n for d in (-1, 0)})
    # a rule for C multiples (cluster: 256) wins at the multiple, and not half a multiple past it
    c_multiples = {c for r in sources if r.C_multiple > 1 for c in (r.C_multiple, r.C_multiple * 3 // 2)}
    candidates = sorted(((B, C) for B in {BASE_B, *b_edges} for C in {BASE_C, *c_edges, *c_multiples}),
                        key=lambda bc: (bc[0] * bc[1], bc))
    picked: dict[tuple[int, int], str] = {}
    own = [r for r in dispatch.RULES if r.backend == device and r.op == op]
    for rule in own:
        wins = [bc for bc in candidates if dispatch.choose(op, n, bc[1], device, B=bc[0], dtype=dtype).rule == rule]
        edges = [bc for bc in wins if bc[0] in b_edges or bc[1] in c_edges] if full else []
        for bc in wins[:1] + edges:
            picked.setdefault(bc, rule.strategy)
    if not own:
        picked[(BASE_B, BASE_C)] = _strategy(op, n, BASE_C, device, BASE_B, dtype)
    if all_rules and full:
        for B, C in candidates:
            picked.setdefault((B, C), _strategy(op, n, C, device, B, dtype))
    return [(B, C, s) for (B, C), s in picked.items() if C <= BASE_C or C in c_multiples or n <= BIG_C_MAX_N]


def variant_name(backend: str, op: str, strategy: str, dtype: str, n: int) -> str:
    """The shipped variant(s) that run: manifest names joined by '+'; 'portable' for MLX ops."""
    if backend == "portable" or strategy == "portable":
        return "portable"
    rows = [r for r in _manifest_rows() if r["backend"] == backend and r["op"] == op
            and (r["strategy"] == strategy or strategy == "no rule")]  # no rule: the shipped family, unreachable
    names, tag = [], manifest.DTYPE_TAGS[dtype]
    for source in dict.fromkeys(r["source"] for r in rows):
        typed = any(r["dtype"] for r in rows if r["source"] == source)
        if typed and not any(r["source"] == source and r["dtype"] == tag for r in rows):
            continue  # built for other dtypes only (mhc_dynamic_proj_tc: bfloat16): not on this dtype's path
        nmaxes = {r["nmax"] for r in rows if r["source"] == source}
        if 0 not in nmaxes and n > max(nmaxes):
            continue  # built for n <= its NMAX only, no generic kernel (mhc_dynamic_coeffs_pre: 4): not on n's path
        names.append(manifest.find(backend, source, tag if typed else None, n).name)
    return "+".join(names) or f"{backend}:{op}:{strategy}"


def plan(full: bool, dtypes: list[str]) -> list[Check]:
    checks = []
    for backend in backends_under_test():
        device = _device_of(backend)
        for op in ops_under_test():
            for n in n_values(backend, op, full):
                for grad in (False, True):
                    dispatch_op = "mhc_backward" if grad and op == "mhc_forward" else op
                    for dt in (["float32"] if op == "sinkhorn" else dtypes):
                        if op == "sinkhorn":
                            shapes = [(1, 1, _strategy(op, n, 1, device, 1))]
                        else:  # per dtype: a rule may name dtypes (cluster: bfloat16)
                            shapes = rule_shapes(backend, dispatch_op, n, full, dtype=dt,
                                                 all_rules=(backend == "portable" and full and op not in DYNAMIC_OPS))
                        for B, C, strategy in shapes:
                            try:
                                variant = variant_name(backend, dispatch_op, strategy, dt, n)
                            except manifest.KernelArtifactError as e:
                                variant = f"missing ({e})"
                            checks.append(Check(backend, op, grad, B, n, C, dt, strategy, variant))
                        if op == "mhc_coeffs" and device == "cuda":
                            for B, C, phi, path in coeffs_path_shapes(n, dt, full, grad):
                                strategy = _strategy(op, n, C, device, B, dt)
                                variant = variant_name(backend, op, strategy, dt, n)
                                checks.append(Check(backend, op, grad, B, n, C, dt, f"{strategy} ({path})", variant, phi))
    return checks


# mhc_coeffs on CUDA forms the coefficients (and x_in) by one of several kernel paths chosen inside the op
# (mhc_aot.cuda_dynamic.coeffs_path), beyond the rule's shapes (3 tokens: the few-token kernel): a shape
# for each other path this GPU takes. The one-read kernel's rule wants a bfloat16 phi and T n C = 1024 x 4 x
# 4096 at least: its gradients (float64 truth on the CPU) run with --full only.
PATH_SHAPES = ((1100, 130, "float32", True), (1024, 4096, "bfloat16", False))  # (B, C, phi, grads in --quick), n = 4


def coeffs_path_shapes(n: int, dtype: str, full: bool, grad: bool) -> list[tuple[int, int, str, str]]:
    """(B, C, phi dtype, path) of mhc_coeffs checks for the CUDA coefficient paths other than the
    few-token kernel's that this GPU takes for x of `dtype` at n (n = 4 only)."""
    from mhc_aot import cuda_dynamic, dynamic

    out = []
    for B, C, phi, quick_grads in PATH_SHAPES if n == 4 else ():
        if phi != "float32" and phi != dtype:
            continue  # a phi in x's dtype (bfloat16): that dtype's row only
        path = cuda_dynamic.coeffs_path(B, n, C, testing.DTYPES[dtype], testing.DTYPES[phi],
                                        dynamic.Config().tmax, True)
        if path == "few-token" or (grad and not (full or quick_grads)):
            continue
        if path not in {p for *_, p in out}:
            out.append((B, C, phi, path))
    return out


# ---------------------------------------------------------------- float64 ground truth of the static ops
# The test suite's own float64 twins (mhc_aot.testing), never a copy of them.
TRUTH64 = {"sinkhorn": testing.sinkhorn64, "mhc_forward": testing.forward64, "stream_mix_add": testing.mix_add64}


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _grads(fn, args, Gs):
    """Gradients of sum_i sum(out_i * G_i) with respect to every argument."""
    def loss(*a):
        return sum(mx.sum(o.astype(G.dtype) * G) for o, G in zip(_as_tuple(fn(*a)), Gs))

    g = _as_tuple(mx.grad(loss, argnums=tuple(range(len(args))))(*args))
    mx.eval(g)
    return list(g)


# The arguments with a leading token axis, per op (every op's outputs have one): the float32
# reference's gradients are also taken with the tokens in other orders (the same sums, rounded in
# another order), so a gradient's bound rests on more than one sample of float32 rounding.
TOKEN_ARGS = {"mhc_forward": (0,), "stream_mix_add": (0, 2), "mhc_coeffs": (0,), "mhc_pre": (0, 1),
              "mhc_post_res": (0, 1, 2, 3)}


def _token_orders(B: int) -> list[mx.array]:
    """As given, reversed, rotated by one: up to three distinct orders of B tokens."""
    orders = dict.fromkeys((tuple(range(B)), tuple(range(B - 1, -1, -1)), tuple((i + 1) % B for i in range(B))))
    return [mx.array(o) for o in orders]


def _reference_errors(check: Check, ref_fn, args, Gs, truth) -> list[float]:
    """Per argument: the largest error of the float32 reference's gradient over the token orders (one
    order for an op without a token axis). A sum of terms of both signs (the alpha gradients) has
    an error set by cancellation; one order's error is one draw of it, which a kernel's own order
    exceeded twice over in 1-3 of 100 runs of the float32 mhc_coeffs rows (H200, session 24)."""
    token = TOKEN_ARGS.get(check.op, ())
    errs = [0.0] * len(args)
    for order in _token_orders(args[0].shape[0]) if token else [None]:
        if order is None:
            grads = _grads(ref_fn, args, Gs)
        else:
            back = mx.argsort(order)
            grads = _grads(ref_fn, [a[order] if i in token else a for i, a in enumerate(args)], [G[order] for G in Gs])
            grads = [g[back] if i in token else g for i, g in enumerate(grads)]
        errs = [max(e, _rel(g, t)) for e, g, t in zip(errs, grads, truth)]
    return errs


# A shared argument's gradient (one without a token axis) is a sum over the argument's uses, and a
# float32 sum's rounding is set by its terms' magnitudes (|error| <= N u sum |terms| for N terms),
# not by the total, which cancellation can make small: dalpha_res sums dlogit * mix over every
# token and residual logit. Per op: the shape each shared argument is broadcast to, one copy per
# use (the alphas scale each logit; phi and b enter once per token); the reference takes such copies.
TERM_SHAPES = {"mhc_coeffs": lambda T, n, C: {1: (T, n * C, n * n + 2 * n), 2: (T, n * n + 2 * n), 3: (T, n),
                                              4: (T, n), 5: (T, n, n)}}
TERM_CHUNK_ELEMENTS = 1 << 22  # float64 elements of the largest copy per chunk of tokens (32 MB)


def _term_magnitudes(check: Check, truth_fn, args, Gs) -> dict[int, mx.array]:
    """Per shared argument i: the sum over its uses of |that use's term of the gradient| (float64
    gradients through _grads64, as float32), from mx.grad with respect to a copy per use
    (TERM_SHAPES), a chunk of tokens at a time."""
    shapes = TERM_SHAPES.get(check.op)
    if shapes is None:
        return {}
    token, T = TOKEN_ARGS[check.op], args[0].shape[0]
    step = max(1, TERM_CHUNK_ELEMENTS // max(math.prod(s) for s in shapes(1, check.n, check.C).values()))
    sums: dict[int, mx.array] = {}
    for t0 in range(0, T, step):
        rows = slice(t0, min(T, t0 + step))
        chunk = [a[rows] if i in token else a for i, a in enumerate(args)]
        uses = {i: mx.broadcast_to(chunk[i], s) for i, s in shapes(rows.stop - t0, check.n, check.C).items()}

        def per_use(*copies, chunk=chunk, uses=uses):
            a = [c.astype(copies[0].dtype) for c in chunk]  # the truth's float64
            for i, c in zip(uses, copies):
                a[i] = c
            return truth_fn(*a)

        terms = _grads64(per_use, list(uses.values()), [G[rows] for G in Gs])
        with mx.stream(mx.cpu):
            for i, g in zip(uses, terms):
                m = mx.sum(mx.abs(g).reshape(-1, *args[i].shape), axis=0)
                sums[i] = sums[i] + m if i in sums else m
            mx.eval(sums)
    return sums


def _magnitude_bound(tol: float, terms: mx.array | None, truth: mx.array) -> float:
    """The tolerance on the terms' magnitudes, as a relative error against the truth (what `_rel`
    reports): tol ||sum |terms| || / ||truth||; 0 for an argument without terms."""
    if terms is None:
        return 0.0
    size = float(mx.linalg.norm(terms.reshape(-1)).item())
    denom = float(mx.linalg.norm(truth.astype(mx.float32).reshape(-1)).item())
    return tol * size / denom if denom > 0 else tol * size


def _grads64(fn, args, Gs):
    """float64 gradients, returned as float32 made on the CPU stream too: float64 has no GPU
    kernels, so even the cast must not run on a GPU stream."""
    with mx.stream(mx.cpu):
        g = _grads(fn, [a.astype(mx.float64) for a in args], [G.astype(mx.float64) for G in Gs])
        g = [t.astype(mx.float32) for t in g]
        mx.eval(g)
    return g


def _rel(out, truth) -> float:
    return testing.rel_error(out, truth.astype(mx.float32))


# ---------------------------------------------------------------- inputs and functions per op
def _seed(check: Check) -> int:
    return zlib.crc32(repr((check, time.time_ns())).encode()) & 0x7FFFFFFF  # fresh inputs every run


def _inputs(check: Check):
    """(args, their names), fresh and non-trivial (not the identity init)."""
    seed, (B, n, C) = _seed(check), (check.B, check.n, check.C)
    dt = testing.DTYPES[check.dtype]
    keys = mx.random.split(mx.random.key(seed + 11), 8)
    p = testing.random_params(n, C, seed)
    x = testing.random_input((B, n, C), dt, seed)
    if check.op == "sinkhorn":
        return [p["H_res_raw"]], ["H_res_raw"]
    if check.op == "stream_mix_add":
        M = mx.random.normal((n, n), key=keys[0])
        return [x, M, testing.random_input(x.shape, dt, seed + 5)], ["x", "M", "bias"]
    if check.op == "mhc_forward":
        return [x, *(p[k] for k in ("H_pre_raw", "H_post_raw", "H_res_raw", "rms_weight"))], \
            ["x", "H_pre_raw", "H_post_raw", "H_res_raw", "rms_weight"]
    if check.op == "mhc_coeffs":
        Mc = n * n + 2 * n
        phi = (mx.random.normal((n * C, Mc), key=keys[1]) / math.sqrt(n * C)).astype(testing.DTYPES[check.phi])
        b = 0.5 * mx.random.normal((Mc,), key=keys[2])
        alphas = [1.0 + 0.3 * mx.random.normal((), key=keys[3 + i]) for i in range(3)]
        return [x, phi, b, *alphas], ["x", "phi", "b", "alpha_pre", "alpha_post", "alpha_res"]
    h_pre = mx.sigmoid(mx.random.normal((B, n), key=keys[1]))
    if check.op == "mhc_pre":
        return [x, h_pre], ["x", "h_pre"]
    f_out = testing.random_input((B, C), dt, seed + 3)
    h_post = 2 * mx.sigmoid(mx.random.normal((B, n), key=keys[2]))
    h_res = mx.softmax(mx.random.normal((B, n, n), key=keys[3]), axis=-1)
    return [x, f_out, h_post, h_res], ["x", "f_out", "h_post", "h_res"]


def _op_fn(op: str, backend: str):
    """The op under test as a function of its array arguments, through `ops` (so a test can
    replace what runs underneath)."""
    if op == "sinkhorn":
        return lambda H: ops.sinkhorn(H, backend=backend)
    if op == "stream_mix_add":
        return lambda x, M, bias: ops.stream_mix_add(x, M, bias, backend=backend)
    if op == "mhc_forward":
        return lambda x, *p: ops.mhc_forward(x, *p, backend=backend)
    if op == "mhc_coeffs":
        return lambda x, *p: ops.mhc_coeffs_pre(x, *p, backend=backend)
    if op == "mhc_pre":
        return lambda x, h: ops.mhc_pre(x, h, backend=backend)
    return lambda x, f, hp, hr: ops.mhc_post_res(x, f, hp, hr, backend=backend)


def _dynamic_truth_fn(op: str):
    """A dynamic op's reference (mhc_aot.dynamic_reference, with ops' defaults, which are Liger's)
    called directly, so that float64 inputs give float64 arithmetic: ops accept only the layer's
    dtypes."""
    if op == "mhc_coeffs":
        def coeffs_pre(x, phi, b, alpha_pre, alpha_post, alpha_res):
            h = dynamic_reference.mhc_coeffs(x, phi, b, alpha_pre, alpha_post, alpha_res)
            return (*h, dynamic_reference.mhc_pre(x, h[0]))
        return coeffs_pre
    return dynamic_reference.mhc_pre if op == "mhc_pre" else dynamic_reference.mhc_post_res


def _reference_fn(op: str):
    if op == "sinkhorn":
        return reference.mixing_matrix
    if op == "stream_mix_add":
        return lambda x, M, bias: reference.stream_mix_add(x, M, bias).astype(x.dtype)
    if op == "mhc_forward":
        return lambda x, *p: reference.mhc_forward(x, *p).astype(x.dtype)
    return _op_fn(op, "reference")  # dynamic ops: their readable reference (mhc_aot.dynamic_reference)


def _forward_truth(check: Check, args):
    import numpy as np

    if check.op == "sinkhorn":
        ref = testing.numpy_sinkhorn(np.array(args[0]))
    elif check.op == "stream_mix_add":
        x, M, bias = (np.asarray(a.astype(mx.float32), dtype=np.float64) for a in args)
        ref = M @ x + bias
    else:
        ref = testing.numpy_forward(*args)
    return mx.array(ref.astype(np.float32))


def _worst(items):
    """items: (what, err, bound); the one closest to (or furthest past) its bound."""
    return max(items, key=lambda t: (t[1] / t[2]) if t[2] > 0 else math.inf)


def run_check(check: Check) -> dict:
    """One row: the worst relative error over the outputs (forward) or every gradient (backward).

    Static ops: against float64 (outputs: testing's numpy reference; gradients: mx.grad of the same
    math in float64). Dynamic ops: against their float32 reference (mhc_aot.dynamic_reference),
    which the dynamic test suite holds to a float64 port of Liger-Kernel."""
    row = {"variant": check.variant, "backend": check.backend, "op": check.name, "strategy": check.strategy,
           "shape": check.shape, "B": check.B, "n": check.n, "C": check.C, "dtype": check.dtype}
    if check.op == "mhc_coeffs":
        row["phi"] = check.phi
    dt = testing.DTYPES[check.dtype]
    tol = testing.tolerance(dt)
    factor = testing.BF16_REFERENCE_FACTOR
    try:
        args, names = _inputs(check)
        fn, ref_fn = _op_fn(check.op, check.backend), _reference_fn(check.op)
        if check.grad:
            outs = _as_tuple(ref_fn(*args))
            Gs = [testing.random_input(o.shape, mx.float32, _seed(check) + 1 + i) for i, o in enumerate(outs)]
            with testing.poisoned_outputs():
                got = _grads(fn, args, Gs)
            # bound: the tolerance; or factor x the float32 reference's own error where it cannot
            # reach it (float32 gradients of sums over tokens: 2.3e-5 seen against a 1e-5 bound), its
            # largest over a few token orders (_reference_errors); or, for a shared argument, the
            # tolerance on its terms' magnitudes (_term_magnitudes: a cancelling sum)
            truth_fn = _dynamic_truth_fn(check.op) if check.dynamic else TRUTH64[check.op]
            truth = _grads64(truth_fn, args, Gs)
            ref_errs = _reference_errors(check, ref_fn, args, Gs, truth)
            terms = _term_magnitudes(check, truth_fn, args, Gs)
            items = [(f"d{nm}", _rel(g, t), max(testing.tolerance(g.dtype), factor * r,
                                                _magnitude_bound(testing.tolerance(g.dtype), terms.get(i), t)))
                     for i, (nm, g, r, t) in enumerate(zip(names, got, ref_errs, truth))]
        else:
            with testing.poisoned_outputs():
                got = _as_tuple(fn(*args))
                mx.eval(got)
            if check.dynamic:
                refs = _as_tuple(ref_fn(*args))
                labels = ("h_pre", "h_post", "h_res", "x_in") if check.op == "mhc_coeffs" else ("out",)
                items = [(w, _rel(g, r), testing.tolerance(g.dtype)) for w, g, r in zip(labels, got, refs)]
            else:
                truth = _forward_truth(check, args)
                err, bound = _rel(got[0], truth), tol
                if dt == mx.bfloat16:  # also within factor x the reference's own error in bfloat16
                    ref_err = _rel(ref_fn(*args), truth)
                    bound = min(tol, factor * ref_err) if ref_err > 0 else tol
                items = [("out", err, bound)]
        what, err, bound = _worst(items)
        passed = all(e < b or e == 0.0 for _, e, b in items)
        row.update({"checked": what, "max_rel_error": err, "tolerance": tol, "bound": bound,
                    "result": "pass" if passed else "FAIL"})
    except Exception as e:  # noqa: BLE001 - a kernel that raises is a failed check, reported as such
        row.update({"checked": "-", "max_rel_error": math.inf, "tolerance": tol, "bound": tol,
                    "result": "FAIL", "error": f"{type(e).__name__}: {' '.join(str(e).split())}"})
    return row


# ---------------------------------------------------------------- the command
# MLX runs float32 matmuls in TF32 on CUDA (and Apple's newest GPUs) unless MLX_ENABLE_TF32=0 is set
# before its first matmul, as MLX's own test harness does. The portable path's float32 projection is
# such a matmul; a float32 check is a check of float32 arithmetic, so validate pins it (an explicit
# setting by the caller wins and is reported).
TF32_ENV = device.TF32_ENV


def validate(
    quick: Annotated[bool, typer.Option("--quick", help="A few shapes per strategy (seconds); the default.")] = False,
    full: Annotated[bool, typer.Option(
        "--full", help="Both sides of every dispatch limit, every NMAX, every dtype.")] = False,
    dtype: DtypeOpt = None,
    fmt: FormatOpt = None,
    out: OutOpt = None,
    quiet: QuietOpt = False,
) -> None:
    if quick and full:
        output.fail("--quick and --full exclude each other: pick one")
    try:
        import numpy  # noqa: F401 - the float64 reference needs it
    except ImportError:
        output.fail("mhc validate needs numpy for its float64 reference: pip install numpy (or 'mhc-aot[test]')")
    dtypes = parse_dtypes(dtype, list(testing.DTYPES) if full else ["float32", "bfloat16"])
    tf32 = os.environ.setdefault(TF32_ENV, "0")
    checks = plan(full, dtypes)
    start = time.perf_counter()
    rows = []
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = None if quiet else Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                           TimeElapsedColumn(), console=output.stderr_console())
    try:
        if progress:
            progress.start()
            task = progress.add_task("validate", total=len(checks))
        for check in checks:
            if progress:
                progress.update(task, description=f"{check.variant} {check.name} {check.shape} {check.dtype}")
            rows.append(run_check(check))
            if progress:
                progress.advance(task)
    finally:
        if progress:
            progress.stop()
    elapsed = time.perf_counter() - start
    failures = [r for r in rows if r["result"] != "pass"]
    backend = dispatch.device_backend()
    notes = [f"{len(rows)} checks, {len(failures)} failed, {elapsed:.1f} s ({'full' if full else 'quick'}); "
             f"device {mx.default_device()}, backend {backend}",
             "error = ||out - ref|| / ||ref|| vs float64; backward = worst gradient of x and every parameter; "
             "bound: outputs = tolerance (bfloat16: and <= factor x the reference's error); "
             "gradients = max(tolerance, factor x the float32 reference's error, "
             "shared arguments: tolerance x ||sum |terms| || / ||truth||)"]
    if tf32 != "0":
        notes.append(f"{TF32_ENV}={tf32} (set by the caller): MLX's float32 matmuls may run in TF32, outside the "
                     f"float32 tolerance of the portable path's checks; unset it to validate float32 arithmetic")
    if backend == "cpu":
        notes.append("MLX's CPU backend has no kernels: the portable path (backend='portable') is what is validated")
    cols = [output.Column(k, h, justify="left") for k, h in
            (("variant", "variant"), ("backend", "backend"), ("op", "op"), ("strategy", "strategy"),
             ("shape", "shape"), ("dtype", "dtype"), ("checked", "worst"))]
    cols += [output.Column("max_rel_error", "max rel error", output.fmt_sci),
             output.Column("tolerance", "tolerance", output.fmt_sci), output.Column("bound", "bound", output.fmt_sci),
             output.Column("result", "result", justify="left")]
    meta = {"mode": "full" if full else "quick", "backend": backend, "device": str(mx.default_device()),
            "checks": len(rows), "failed": len(failures), "seconds": elapsed, TF32_ENV: tf32,
            "tolerances": {str(k).split(".")[-1]: v for k, v in testing.TOLERANCES.items()},
            "bf16_reference_factor": testing.BF16_REFERENCE_FACTOR}
    output.emit(output.Result("mhc validate", rows, cols, meta=meta, notes=notes, command="validate"), fmt, out, quiet)
    if failures:
        names = list(dict.fromkeys(f"{r['variant']} ({r['backend']} {r['op']})" for r in failures))
        first = failures[0]
        detail = first.get("error") or f"error {first['max_rel_error']:.2e} >= bound {first['bound']:.1e}"
        output.fail(f"{len(failures)} of {len(rows)} checks failed; variants: {', '.join(names)}; first: "
                    f"{first['variant']} {first['op']} {first['shape']} {first['dtype']}: {detail}", code=1)


def register(app: typer.Typer) -> None:
    app.command("validate", help=HELP, epilog=EPILOG,
                short_help="Check kernels and the portable path against the reference.")(validate)
