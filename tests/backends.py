"""What every test file shares: the backends to parametrize over, seeds, and the checks.

BACKENDS always holds "portable" and "reference"; "cuda" and "metal" are listed too, marked
`gpu`, and skipped with the reason when MLX reports no such device, so kernel backends plug in
by existing. Forward calls go through `run_forward`, which poisons outputs (kernel launchers fill
them with NaN first) and evaluates inside the poisoned block.
"""

from __future__ import annotations

import zlib

import mlx.core as mx
import numpy as np
import pytest

from mhc_aot import testing

GPU_AVAILABLE = {"cuda": mx.cuda.is_available(), "metal": mx.metal.is_available()}
GPU_BACKENDS = tuple(GPU_AVAILABLE)
DTYPE_NAMES = tuple(testing.DTYPES)  # float32, float16, bfloat16


def gpu_param(backend: str):
    reason = f"MLX reports no {backend} device (mx.{backend}.is_available() is False)"
    return pytest.param(backend, id=backend,
                        marks=[pytest.mark.gpu, pytest.mark.skipif(not GPU_AVAILABLE[backend], reason=reason)])


KERNEL_BACKENDS = [gpu_param(b) for b in GPU_BACKENDS]
# for tests of one CUDA kernel on the device (they are not parametrized over backends)
NEEDS_CUDA = pytest.mark.skipif(not GPU_AVAILABLE["cuda"], reason="MLX reports no cuda device (mx.cuda.is_available() is False)")
BACKENDS = [pytest.param("portable", id="portable"), pytest.param("reference", id="reference"), *KERNEL_BACKENDS]


def seed_of(*parts) -> int:
    """A seed that differs per parameter set and is stable across runs."""
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


def run_forward(fn, *args, **kwargs) -> mx.array:
    """fn(*args, **kwargs) built and evaluated with outputs poisoned (NaN where not written)."""
    with testing.poisoned_outputs():
        out = fn(*args, **kwargs)
        mx.eval(out)
    return out


def to64(a) -> np.ndarray:
    return np.asarray(a.astype(mx.float32) if isinstance(a, mx.array) else a, dtype=np.float64)


def rel_error64(out, ref64) -> float:
    """||out - ref|| / ||ref|| in float64 against a float64 reference; inf on any NaN/inf."""
    o, r = to64(out), np.asarray(ref64, dtype=np.float64)
    assert o.shape == r.shape, f"shape {o.shape} != reference shape {r.shape}"
    if not np.all(np.isfinite(o)):
        return float("inf")
    denom = np.linalg.norm(r)
    num = np.linalg.norm(o - r)
    return float(num / denom) if denom > 0 else float(num)


def assert_close(out, ref64, tol: float, what: str) -> float:
    """Relative error against the float64 reference below `tol` (a file's tolerance table entry)."""
    err = rel_error64(out, ref64)
    assert err < tol, f"{what}: relative error {err:.3e} >= {tol:.0e}"
    return err


def assert_bf16_factor(err: float, ref_err: float, factor: float, what: str) -> None:
    """bfloat16: the tested path's error is at most `factor` x the reference's own error when the
    reference runs on the same bfloat16 inputs (both against float64)."""
    assert err <= factor * ref_err or err == 0.0, (
        f"{what}: bfloat16 error {err:.3e} > {factor} x the bfloat16 reference's error {ref_err:.3e}")


def leading(B) -> tuple[int, ...]:
    return tuple(B) if isinstance(B, tuple) else (B,)


def import_mhc_mlx():
    """The seed package `mhc-mlx` (its reference and layer), or a clean skip saying why not."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns that Linux runs its pure-MLX path
        mhc_mlx = pytest.importorskip("mhc_mlx", reason="mhc-mlx is not installed (pip install 'mhc-aot[test]')")
        import mhc_mlx.reference  # noqa: F401
    return mhc_mlx


def random_M(n: int, seed: int) -> mx.array:
    """A dense float32 [n, n] mixing matrix with both signs (stream_mix_add takes any M)."""
    return mx.random.normal((n, n), key=mx.random.key(seed + 104729))


def dispatch_edges(op: str, n: int = 2) -> list[tuple[int, int, int]]:
    """(B, n, C) on both sides of every limit that the GPU dispatch rules of `op` set, read from
    `dispatch.RULES` so the tables follow the rules. Upper C limits are probed with more tokens
    than any B limit, so the rule that owns the C limit is the one in play."""
    from mhc_aot import dispatch

    rules = [r for r in dispatch.RULES if r.backend == "cuda" and r.op == op]
    plain = [r for r in rules if max(r.min_B, r.min_n, r.min_C) <= 1]  # the rest: below
    b_limits = sorted({r.max_B for r in plain if r.max_B})
    c_limits = sorted({r.max_C for r in plain if r.max_C})
    many = b_limits[-1] + 1 if b_limits else 2
    shapes = [(b + d, n, 64) for b in b_limits for d in (0, 1)]
    shapes += [(many, n, c + d) for c in c_limits for d in (0, 1)]
    # rules with an upper bound on n: both sides of it
    shapes += [(many, m + d, 64) for m in sorted({r.max_n for r in rules if r.max_n}) for d in (0, 1)]
    # rules with lower bounds (min_B, min_n, min_C): both sides of each bound and of their max_B,
    # at the rule's own n and C
    for r in rules:
        if max(r.min_B, r.min_n, r.min_C) <= 1:
            continue
        rn, C, B = max(n, r.min_n), max(64, r.min_C), r.min_B
        shapes.append((B, rn, C))
        if r.min_B > 1:
            shapes.append((r.min_B - 1, rn, C))
        if r.min_C > 1:
            shapes.append((B, rn, r.min_C - 1))
        if r.max_B:
            shapes += [(r.max_B, rn, C), (r.max_B + 1, rn, C)]
    # rules for exact n and C multiples (`cluster`): each n and one either side, C on both sides of
    # the multiple (two tokens) and of max_C (one) (dtype and GPU rules apply too: strategies_of)
    for r in rules:
        if r.n_in is None:
            continue
        m = r.C_multiple
        shapes += [(2, rn + d, m) for rn in r.n_in for d in (-1, 0)]
        shapes += [(2, rn, m + m // 2) for rn in r.n_in]
        shapes += [(1, rn, C) for rn in r.n_in for C in (r.max_C, r.max_C + m)]
    return list(dict.fromkeys(shapes))


# Shapes above this many elements run on GPU backends only: a float64 reference of them takes CI's
# 2-core CPU 5-17 s per case, and the CPU paths do not dispatch by the GPU rules they probe.
CPU_MAX_ELEMENTS = 1 << 21


def split_for_cpu(shapes) -> tuple[list, list]:
    """(shapes every backend runs, shapes only GPU backends run), by CPU_MAX_ELEMENTS."""
    small = [s for s in shapes if int(np.prod(leading(s[0]))) * s[1] * s[2] <= CPU_MAX_ELEMENTS]
    return small, [s for s in shapes if s not in small]


def strategies_of(op: str, shapes, backend: str = "cuda") -> set[str]:
    """The strategies that dispatch picks for `op` over a shape table of (B, n, C), in any dtype,
    on an sm_80 or an sm_90 GPU, with MLX's CUDA graphs on or off."""
    from mhc_aot import dispatch

    return {dispatch.choose(op, n, C, backend, B=int(np.prod(leading(B))), dtype=tag, sm=sm, graphs=graphs).strategy
            for B, n, C in shapes for tag in ("f32", "f16", "bf16") for sm in (80, 90) for graphs in (True, False)}


def gpu_strategies(op: str, backend: str = "cuda") -> set[str]:
    from mhc_aot import dispatch

    return {r.strategy for r in dispatch.RULES if r.backend == backend and r.op == op}


# ---------------------------------------------------------------- float64 ground truth for gradients
# The MLX float64 twin of DESIGN.md section 1 lives in mhc_aot.testing (shared with `mhc validate`).
exp64, sigmoid64, sinkhorn64 = testing.exp64, testing.sigmoid64, testing.sinkhorn64
mix_add64, forward64 = testing.mix_add64, testing.forward64


def value64(fn, *args):
    with mx.stream(mx.cpu):
        out = fn(*(a.astype(mx.float64) for a in args))
        mx.eval(out)
    return np.array(out)


def grads64(fn, args, G) -> list[np.ndarray]:
    """Gradients of sum(fn(*args) * G) in float64, for every argument."""
    with mx.stream(mx.cpu):
        a64 = [a.astype(mx.float64) for a in args]
        G64 = G.astype(mx.float64)
        g = mx.grad(lambda *a: mx.sum(fn(*a) * G64), argnums=tuple(range(len(a64))))(*a64)
        g = g if isinstance(g, (tuple, list)) else (g,)
        mx.eval(g)
    return [np.array(t) for t in g]


def outcomes_with_tf32(node_ids: list[str], timeout: int = 300) -> dict[str, str]:
    """node id -> "passed" / "failed" / "skipped" of these tests run again in a child pytest with
    MLX_ENABLE_TF32=1 (MLX's default, which conftest.py turns off for the suite): what a user who
    leaves MLX's default gets. The child tests the same mhc_aot as this process."""
    import os
    import subprocess
    import sys
    import tempfile
    import xml.etree.ElementTree as ET
    from pathlib import Path

    import mhc_aot

    tests = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        env = {**os.environ, "MLX_ENABLE_TF32": "1",
               "PYTHONPATH": str(Path(mhc_aot.__file__).resolve().parent.parent)}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
               *[str(tests / i) for i in node_ids]]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp, env=env)
        assert report.exists(), f"the child pytest wrote no report (exit {r.returncode}):\n{r.stdout[-3000:]}{r.stderr[-2000:]}"
        out = {}
        for case in ET.parse(report).getroot().iter("testcase"):
            # junit names the test by its module path with dots ("test_layer") and its name with the params
            kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
            out[f"{case.get('classname').split('.')[-1]}.py::{case.get('name')}"] = {"failure": "failed", "error": "failed"}.get(kind, kind)
    missing = [i for i in node_ids if i not in out]
    assert not missing, f"the child pytest did not run {missing}:\n{r.stdout[-3000:]}"
    return out


def assert_kernels_exact_with_tf32(checks: list[str]) -> None:
    """checks (node ids with "{}" for the backend), rerun with MLX_ENABLE_TF32=1: the CUDA kernels' pass,
    the portable path's fail (the control that the setting took effect)."""
    kernels, portable = [c.format("cuda") for c in checks], [c.format("portable") for c in checks]
    got = outcomes_with_tf32(kernels + portable)
    assert {i: got[i] for i in kernels} == dict.fromkeys(kernels, "passed")
    assert {i: got[i] for i in portable} == dict.fromkeys(portable, "failed"), \
        "with MLX_ENABLE_TF32=1 the portable path met float32 tolerances: TF32 no longer applies (MLX changed?)"
