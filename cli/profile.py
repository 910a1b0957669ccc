"""`mhc profile`: stage timings as a Chrome/Perfetto trace, plus the platform's GPU profilers.

Always: DIR/trace.json (mhc_aot.profile: Sinkhorn, forward, backward, synchronised timers) and
DIR/summary.json, with the summary table on stdout. On CUDA with `ncu` on PATH: an Nsight Compute
report of a child run (DIR/ncu_report.ncu-rep). On macOS with Xcode: a Metal System Trace
(DIR/mhc.trace, xcrun xctrace) and an MLX GPU capture (DIR/mhc.gputrace, mx.metal.start_capture
in a child run with MTL_CAPTURE_ENABLED=1). Otherwise a note names what to install.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Optional

import mlx.core as mx
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mhc_aot import bench, dispatch
from mhc_aot import profile as prof

from . import output
from .options import BOpt, COpt, DtypeOpt, FormatOpt, ItersOpt, Layer, LayerOpt, NOpt, QuietOpt, WarmupOpt, parse_dtypes, parse_ints

HELP = """Run the layer and write a Chrome/Perfetto trace (DIR/trace.json: one event per call of
each stage: Sinkhorn alone, the forward, forward + backward; with --layer dynamic: the
coefficients with x_in, post-res, the forward, forward + backward) timed between synchronisations,
and print a summary table.

On CUDA, when Nsight Compute's `ncu` is on PATH, also profile the kernels of a child run into
DIR/ncu_report.ncu-rep. On macOS with Xcode, also record a Metal System Trace (DIR/mhc.trace)
and an MLX GPU capture (DIR/mhc.gputrace). Without those tools the trace is written alone and a
note says what to install."""

EPILOG = """Examples:

  mhc profile --out prof

  mhc profile --B 4096 --n 4 --C 4096 --dtype float16 --out prof-large

  mhc profile --layer dynamic --B 8192 --n 4 --C 4096 --out prof-dynamic

  mhc profile --no-ncu --format json --out prof"""

DEFAULT_SHAPE = (32, 32, 2048)  # the seed README's first throughput row
CHILD_TIMEOUT_S = 900
NCU_LAUNCHES = 32  # every kernel of each stage's two child calls (dynamic: 26 launches) with room to spare


def _one(flag: str, values: list[int], default: int) -> int:
    if len(values) > 1:
        output.fail(f"{flag}: mhc profile runs one shape; got {len(values)} values")
    return values[0] if values else default


def _child_args(B, n, C, dtype, backend, layer, out_dir: Path) -> list[str]:
    return [sys.executable, "-m", "mhc_aot.cli.main", "profile", "--no-ncu", "--no-xctrace", "--no-gpu-capture",
            "--quiet", "--iters", "1", "--warmup", "1", "--B", str(B), "--n", str(n), "--C", str(C),
            "--dtype", dtype, "--backend", backend, "--layer", layer, "--out", str(out_dir)]


def _run_child(cmd: list[str], cwd: Path, env=None) -> tuple[bool, str]:
    """Run a profiler around a child `mhc profile`; cwd is the output directory, so `python -m`
    never picks up a source tree's mhc_aot in place of the installed one."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, env=env, cwd=cwd)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"{type(e).__name__}: {e}"
    tail = " ".join((p.stderr or p.stdout or "").strip().splitlines()[-3:])
    return p.returncode == 0, tail


def _ncu(use: Optional[bool], out_dir: Path, child, quiet) -> dict:
    backend = dispatch.device_backend()
    if use is False:
        return {"tool": "ncu", "status": "skipped (--no-ncu)"}
    if backend != "cuda":
        return {"tool": "ncu", "status": f"not applicable: MLX runs on {backend}, Nsight Compute profiles CUDA"}
    ncu = shutil.which("ncu")
    if ncu is None:
        return {"tool": "ncu", "status": "ncu not on PATH: install Nsight Compute (ships with the CUDA toolkit, "
                                         "e.g. /usr/local/cuda/bin) for a per-kernel report; trace JSON only"}
    report = out_dir / "ncu_report"
    output.status(f"running ncu on a child run (this replays every kernel; it can take minutes): {report}.ncu-rep",
                  quiet)
    # only this package's kernels (every name starts with mhc_), at most NCU_LAUNCHES of them: MLX's
    # own kernels (random inputs, casts) would multiply the replay time and the report's size
    ok, tail = _run_child([ncu, "--clock-control", "none", "--target-processes", "all", "--kernel-name",
                           "regex:^mhc_", "--launch-count", str(NCU_LAUNCHES), "--nvtx", "-f", "-o", str(report),
                           *child(out_dir / "ncu_run")], out_dir)
    return {"tool": "ncu", "status": "ok" if ok else f"failed: {tail}",
            "report": f"{report}.ncu-rep" if ok else None}


def _xcode_tool(name: str) -> bool:
    if platform.system() != "Darwin" or shutil.which("xcrun") is None:
        return False
    return subprocess.run(["xcrun", "--find", name], capture_output=True).returncode == 0


XCODE_HINT = ("install Xcode (App Store), then `sudo xcode-select -s /Applications/Xcode.app`; "
              "the Command Line Tools alone have no xctrace")


def _xctrace(use: Optional[bool], out_dir: Path, child, quiet) -> dict:
    if use is False:
        return {"tool": "xctrace", "status": "skipped (--no-xctrace)"}
    if platform.system() != "Darwin":
        return {"tool": "xctrace", "status": "not applicable: Metal System Trace is macOS only"}
    if not _xcode_tool("xctrace"):
        return {"tool": "xctrace", "status": f"xctrace not found: {XCODE_HINT}"}
    trace = out_dir / "mhc.trace"
    if trace.exists():
        shutil.rmtree(trace, ignore_errors=True)
    output.status(f"recording a Metal System Trace of a child run: {trace}", quiet)
    ok, tail = _run_child(["xcrun", "xctrace", "record", "--template", "Metal System Trace", "--output", str(trace),
                           "--launch", "--", *child(out_dir / "xctrace_run")], out_dir)
    return {"tool": "xctrace", "status": "ok" if ok else f"failed: {tail}", "report": str(trace) if ok else None}


def _gpu_capture(use: Optional[bool], out_dir: Path, child, quiet) -> dict:
    if use is False:
        return {"tool": "mx.metal capture", "status": "skipped (--no-gpu-capture)"}
    if dispatch.device_backend() != "metal":
        return {"tool": "mx.metal capture", "status": "not applicable: MLX GPU capture needs the Metal backend"}
    capture = out_dir / "mhc.gputrace"
    if capture.exists():
        shutil.rmtree(capture, ignore_errors=True)
    output.status(f"capturing one forward + backward with MTL_CAPTURE_ENABLED=1: {capture}", quiet)
    ok, tail = _run_child([*child(out_dir / "capture_run"), "--capture-to", str(capture)], out_dir,
                          env={**os.environ, "MTL_CAPTURE_ENABLED": "1"})
    status = "ok" if ok else f"failed: {tail}"
    if not ok and not _xcode_tool("metal"):
        status += f" ({XCODE_HINT})"
    return {"tool": "mx.metal capture", "status": status, "report": str(capture) if ok else None}


def _capture(fns: dict, path: Path) -> None:
    """Child side of the GPU capture: warm up, then capture one call of each stage."""
    for fn in fns.values():
        mx.eval(fn())
    mx.synchronize()
    mx.metal.start_capture(str(path))
    try:
        for fn in fns.values():
            mx.eval(fn())
        mx.synchronize()
    finally:
        mx.metal.stop_capture()


def profile_command(
    B: BOpt = None,
    n: NOpt = None,
    C: COpt = None,
    dtype: DtypeOpt = None,
    layer: LayerOpt = Layer.static,
    backend: Annotated[str, typer.Option(
        "--backend", help="auto, portable, reference, cuda or metal (as ops' backend=).")] = "auto",
    iters: ItersOpt = None,
    warmup: WarmupOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for trace.json, summary.json and reports.",
                                      file_okay=False)] = Path("mhc-profile"),
    ncu: Annotated[Optional[bool], typer.Option(
        "--ncu/--no-ncu", help="Nsight Compute report (default: when on CUDA and ncu is on PATH).")] = None,
    xctrace: Annotated[Optional[bool], typer.Option(
        "--xctrace/--no-xctrace", help="Metal System Trace (default: on macOS with Xcode).")] = None,
    gpu_capture: Annotated[Optional[bool], typer.Option(
        "--gpu-capture/--no-gpu-capture", help="MLX GPU capture (default: on the Metal backend).")] = None,
    capture_to: Annotated[Optional[Path], typer.Option("--capture-to", hidden=True)] = None,
    fmt: FormatOpt = None,
    quiet: QuietOpt = False,
) -> None:
    Bv = _one("--B", parse_ints("--B", B), DEFAULT_SHAPE[0])
    nv = _one("--n", parse_ints("--n", n), DEFAULT_SHAPE[1])
    Cv = _one("--C", parse_ints("--C", C), DEFAULT_SHAPE[2])
    dtypes = parse_dtypes(dtype, [bench.DEFAULT_DTYPE])
    if len(dtypes) > 1:
        output.fail(f"--dtype: mhc profile runs one dtype; got {', '.join(dtypes)}")
    dt = dtypes[0]
    if backend not in dispatch.BACKENDS or backend == "cpu":
        output.fail(f"--backend {backend!r}: expected auto, portable, reference, cuda or metal")
    if backend in ("cuda", "metal") and not getattr(mx, backend).is_available():
        output.fail(f"--backend {backend}: MLX reports no {backend} device here; use --backend auto or portable")
    gpu = dispatch.device_backend() != "cpu"
    iters_v = iters if iters is not None else (50 if gpu else 10)
    warmup_v = warmup if warmup is not None else (5 if gpu else 2)
    if iters_v < 1:
        output.fail(f"--iters {iters_v}: expected an integer >= 1")
    if warmup_v < 0:
        output.fail(f"--warmup {warmup_v}: expected an integer >= 0")
    case = bench.Case("latency", Bv, nv, Cv, dt, True, layer.value)
    try:
        bench.check_memory([case], ["kernels"])
    except bench.BenchError as e:
        output.fail(str(e))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        output.fail(f"--out {out}: cannot create the directory ({e.strerror or e}): pick a writable path")
    shown_out, out = out, out.resolve()

    fns = prof.stage_functions(Bv, nv, Cv, dt, backend, layer=layer.value)
    if capture_to is not None:  # child of --gpu-capture
        _capture(fns, capture_to)
        return

    progress = None if quiet else Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                           TimeElapsedColumn(), console=output.stderr_console())
    explain = prof.strategies(Bv, nv, Cv, backend, layer.value, dt)
    shape_args = {"B": Bv, "n": nv, "C": Cv, "dtype": dt, "backend": backend, "layer": layer.value}
    try:
        if progress:
            progress.start()
            task = progress.add_task("profile", total=len(fns) * (iters_v + warmup_v))

        def step(stage: str) -> None:
            if progress:
                progress.update(task, description=f"profile {stage}", advance=1)

        events = prof.record(fns, iters_v, warmup_v, on_step=step, args=shape_args)
    finally:
        if progress:
            progress.stop()

    meta = {"device": str(mx.default_device()), "backend": dispatch.device_backend(), "mlx": mx.__version__,
            "device_name": mx.device_info().get("device_name", ""), **shape_args, "iters": iters_v,
            "warmup": warmup_v, "strategies": explain, "timer": "mx.synchronize + perf_counter around each call"}
    trace_path = out / "trace.json"
    prof.write_trace(events, trace_path, meta)
    shown_trace = shown_out / "trace.json"
    output.status(f"wrote Chrome/Perfetto trace to {shown_trace} (open in https://ui.perfetto.dev)", quiet)

    def child(run_dir: Path) -> list[str]:
        return _child_args(Bv, nv, Cv, dt, backend, layer.value, run_dir)

    tools = [_ncu(ncu, out, child, quiet), _xctrace(xctrace, out, child, quiet),
             _gpu_capture(gpu_capture, out, child, quiet)]
    meta["tools"] = tools
    meta["trace"] = str(trace_path)

    rows = prof.summary(events)
    for r in rows:
        r["strategy"] = explain.get(r["stage"], "")
    notes = [f"{layer.value} layer, B={Bv} n={nv} C={Cv} {dt}, backend={backend} on {meta['device']}; {iters_v} timed calls per stage "
             f"after {warmup_v} warmup; trace: {shown_trace}"]
    if dispatch.device_backend() == "cpu":
        notes.append("MLX's CPU backend: backend='auto' is the portable path; ncu (CUDA) and xctrace / Metal "
                     "capture (macOS) do not apply: trace JSON only")
    notes += [f"{t['tool']}: {t['status']}" + (f" -> {t['report']}" if t.get("report") else "") for t in tools
              if not (dispatch.device_backend() == "cpu" and t["status"].startswith("not applicable"))]
    cols = [output.Column("stage", "stage", justify="left"), output.Column("calls", "calls"),
            output.Column("median_us", "median us", output.fmt_us), output.Column("p20_us", "p20 us", output.fmt_us),
            output.Column("p80_us", "p80 us", output.fmt_us),
            output.Column("first_call_us", "first call us", output.fmt_us),
            output.Column("strategy", "dispatch", justify="left")]
    result = output.Result("mhc profile", rows, cols, meta=meta, notes=notes, command="profile")
    (out / "summary.json").write_text(output.to_json(result))
    output.emit(result, fmt, None, quiet)
    requested = {"ncu": ncu, "xctrace": xctrace, "mx.metal capture": gpu_capture}
    failed = [t for t in tools if t["status"].startswith("failed") and requested.get(t["tool"])]
    if failed:
        output.fail(f"{failed[0]['tool']} {failed[0]['status']}", code=1)


def register(app: typer.Typer) -> None:
    app.command("profile", help=HELP, epilog=EPILOG,
                short_help="Stage timings as a Chrome/Perfetto trace, plus GPU profiler reports.")(profile_command)
