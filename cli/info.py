"""Versions, device, build toolchains, the shipped kernel manifest and what dispatch picks.

Exits 1 (with the fix in the message) when shipped kernels are missing or corrupted.
"""

from __future__ import annotations

import platform
import sys
from collections import Counter
from typing import Annotated

import mlx.core as mx
import typer

import mhc_aot
from mhc_aot import device, dispatch, manifest

from . import output
from .options import FormatOpt, OutOpt, QuietOpt

HELP = """Print versions, the MLX device and backend, GPU facts, the toolchains found at build time,
a summary of the shipped kernel manifest (variants per backend and architecture, sha256 checked)
and what dispatch picks for a few standard shapes, and why.

Exits 1 when a shipped kernel is missing or corrupted; the message says how to fix it."""

EPILOG = """Examples:

  mhc info

  mhc info --dispatch

  mhc info --format json --out info.json"""

# (label, B, n, C): the seed README's tables, the large suite, and shapes past each limit
STANDARD_SHAPES = (
    ("latency", 1, 32, 2048),
    ("throughput", 32, 32, 2048),
    ("large", 4096, 4, 4096),
    ("large", 1024, 32, 2048),
    ("wide C", 16, 4, dispatch.FUSED_MAX_C + 1024),
    ("n > 64", 1024, 100, 64),
)


BYTE_KEYS = ("memory_size", "total_memory", "free_memory", "max_buffer_size", "max_recommended_working_set_size")


def _gib(v) -> str:
    return f"{v / 2**30:.1f} GiB" if isinstance(v, (int, float)) else str(v)


def _device_facts() -> dict:
    facts = {"default device": str(mx.default_device()), "backend": dispatch.device_backend()}
    try:
        info = mx.device_info()
    except Exception as e:  # noqa: BLE001 - a fact we can report, not a reason to stop
        info = {"error": str(e)}
    for k, v in info.items():
        facts[k] = _gib(v) if k in BYTE_KEYS and isinstance(v, int) else v
    if dispatch.device_backend() == "cuda":
        try:
            cuda = device.cuda_facts()  # mhc_aot._shim.cuda_device_facts, when this build has it
        except Exception as e:  # noqa: BLE001 - a fact we can report, not a reason to stop
            cuda = {"available": False, "reason": f"{type(e).__name__}: {e}"}
        if cuda.get("available"):
            for k, v in cuda.items():
                if k != "available":
                    facts[f"cuda {k}"] = v
        else:
            facts["cuda driver query"] = cuda.get("reason", "unavailable")
        facts["MLX CUDA graphs"] = ("on (MLX's default; the `cluster` forward stays off: see `mhc info --dispatch`)"
                                    if dispatch.cuda_graphs() else "off (MLX_USE_CUDA_GRAPHS=0)")
        facts["MLX float32 matmuls"] = (
            "TF32 (MLX's default; MLX_ENABLE_TF32=0 for float32): the kernels use none, the portable path and "
            "the dynamic layer's documented exits do" if device.mlx_tf32() else "float32 (MLX_ENABLE_TF32=0)")
    return facts


def _shim_facts() -> dict:
    try:
        _shim = device.load_shim()
    except ImportError as e:
        return {"shim": f"not importable ({e})"}
    facts = {}
    if hasattr(_shim, "build_info"):
        facts.update({f"shim {k}": v for k, v in dict(_shim.build_info()).items()})
    return facts


def _manifest_facts() -> tuple[dict, list[str], list[str]]:
    """(facts, problems (exit 1), toolchain rows)."""
    facts: dict = {}
    problems: list[str] = []
    try:
        m = manifest.load()
    except manifest.KernelArtifactError as e:
        return {"manifest": "missing or unreadable"}, [str(e)], []
    facts["manifest"] = str(manifest.MANIFEST_PATH)
    facts["built at"] = f"{m.get('built_at', '?')} ({m.get('build_seconds', '?')} s)"
    facts["built for"] = f"mhc-aot {m.get('package_version', '?')}, MLX {m.get('mlx_version', '?')}"
    if m.get("mlx_version") and m["mlx_version"] != mx.__version__:
        facts["MLX mismatch"] = (f"kernels built for MLX {m['mlx_version']}, running {mx.__version__}: "
                                 f"pip install mlx=={m['mlx_version']}")
    toolchains = {}
    for name, t in m.get("toolchains", {}).items():
        if t.get("found"):
            detail = ", ".join(str(t[k]) if k != "archs" else "/".join(t[k])
                               for k in ("compiler", "nvcc", "version", "archs", "ptx_arch") if t.get(k))
            toolchains[name] = f"found: {detail}" if detail else "found"
        else:
            toolchains[name] = f"absent ({t.get('reason', 'not found')})"
    rows = m.get("variants", [])
    by_backend = Counter(r["backend"] for r in rows)
    for b, count in sorted(by_backend.items()):
        archs = Counter(tag for r in rows if r["backend"] == b for tag in r.get("files", {}))
        families = len({(r["op"], r["strategy"], r["source"]) for r in rows if r["backend"] == b})
        facts[f"{b} variants"] = (f"{count} variants in {families} families; files per arch: "
                                  + ", ".join(f"{a}: {c}" for a, c in sorted(archs.items())))
    if not rows:
        facts["variants"] = "none shipped (no GPU toolchain at build time): the portable path serves every op"
    current = dispatch.device_backend()
    metal_rows = [r for r in rows if r["backend"] == "metal"]
    if current == "metal" and metal_rows:
        try:  # the MLX-internal cache key the Metal preload depends on (DESIGN.md section 7)
            from mhc_aot import metal

            key = metal.kernel_key(metal_rows[0])
            facts["metal preload key"] = f"{metal_rows[0]['name']}: library {key.get('library_name')}"
        except Exception as e:  # noqa: BLE001 - reported, and the sha256 / load checks still run
            problems.append(f"Metal preload key of {metal_rows[0]['name']} could not be computed ({e}): "
                            f"{manifest.REINSTALL_HINT}")
    if current != "cpu" and not by_backend.get(current):
        problems.append(f"MLX runs on {current} but this install ships no {current} kernels: {manifest.REINSTALL_HINT}")
    verify = manifest.verify_all()
    nfiles = sum(len(r.get("files", {})) for r in rows)
    facts["sha256"] = (f"all {nfiles} kernel files match the manifest" if not verify
                       else f"{len(verify)} of {nfiles} kernel files missing or corrupted")
    problems += verify
    return facts, problems, toolchains


def _dispatch_facts() -> dict:
    facts = {}
    for label, B, n, C in STANDARD_SHAPES:
        fwd = dispatch.choose("mhc_forward", n, C, "auto", B=B, dtype="bfloat16")  # the bench's default dtype
        bwd = dispatch.choose("mhc_backward", n, C, "auto", B=B)
        if fwd.reason == bwd.reason:
            text = f"forward {fwd.backend}:{fwd.strategy}, backward {bwd.strategy}: {fwd.reason}"
        else:
            text = f"forward {fwd.backend}:{fwd.strategy} ({fwd.reason}); backward {bwd.strategy} ({bwd.reason})"
        facts[f"{label} B={B} n={n} C={C} bfloat16"] = text
    if dispatch.device_backend() == "cpu":
        facts["note"] = "on MLX's CPU backend backend='auto' is the portable path (MLX ops, mx.compile'd)"
    return facts


def collect(with_rules: bool = False) -> tuple[output.Result, list[str]]:
    sections = {
        "versions": {"mhc-aot": mhc_aot.__version__, "MLX": mx.__version__, "Python": sys.version.split()[0]},
        "system": {"OS": f"{platform.system()} {platform.release()}", "machine": platform.machine()},
        "device": _device_facts(),
        "shim": _shim_facts(),
    }
    kernel_facts, problems, toolchains = _manifest_facts()
    sections["build toolchains"] = toolchains
    sections["kernels"] = kernel_facts
    sections["dispatch"] = _dispatch_facts()
    if with_rules:
        sections["dispatch rules"] = {
            f"{i + 1}. {r['backend']} {r['op']}":
                f"{r['strategy']} (max_B={r['max_B']}, max_C={r['max_C']}"
                + "".join(f", {k}={r[k]}" for k in ("min_B", "min_n", "min_C") if r[k] > 1) + f"): {r['why']}"
            for i, r in enumerate(dispatch.rules_table())}
    rows = [{"section": s, "what": k, "value": v} for s, facts in sections.items() for k, v in facts.items()]
    meta = {s: facts for s, facts in sections.items()}
    if with_rules:
        meta["dispatch rules"] = dispatch.rules_table()
    meta["problems"] = problems
    cols = [output.Column("section", "section", justify="left"), output.Column("what", "what", justify="left"),
            output.Column("value", "value", justify="left")]
    return output.Result("mhc-aot info", rows, cols, meta=meta, command="info"), problems


def info(
    dispatch_table: Annotated[bool, typer.Option(
        "--dispatch", help="Also print the full dispatch rule table.")] = False,
    fmt: FormatOpt = None,
    out: OutOpt = None,
    quiet: QuietOpt = False,
) -> None:
    result, problems = collect(dispatch_table)
    output.emit(result, fmt, out, quiet)
    if problems:
        extra = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        output.fail(problems[0] + extra, code=1)


def register(app: typer.Typer) -> None:
    app.command("info", help=HELP, epilog=EPILOG,
                short_help="Versions, device, build toolchains, kernel manifest and dispatch choices.")(info)
