"""`mhc bench`: the one benchmark (mhc_aot.bench holds the shapes, timing and byte model)."""

from __future__ import annotations

import importlib.util
from enum import Enum
from pathlib import Path
from typing import Annotated, List, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mhc_aot import bench, dispatch

from . import output
from .options import (BackwardOpt, BOpt, COpt, DtypeOpt, FormatOpt, ItersOpt, Layer, LayerOpt, Mode, NOpt, OutOpt, QuietOpt,
                      WarmupOpt, check_count, parse_dtypes, parse_ints, split_list)

HELP = """Time the mHC layer's forward (or forward + backward) against other implementations.

latency mode evaluates each call before the next (mx.eval per call); throughput mode queues
calls with mx.async_eval and synchronises once at the end, reporting time per call. Each row:
median and p20/p80 microseconds, effective GB/s (x read once + out written once; with --backward
also x, dout read and dx written: see mhc_aot.bench), its fraction of the copy bandwidth measured
in the same run, and on the kernels row the speedup over each --compare implementation.

The kernels row is backend="auto": the precompiled kernels on a GPU; on MLX's CPU backend it IS
the portable path.

Shapes: by default the seed (mhc-mlx) README's tables: latency B=1, n=32, C in 256..8192;
throughput B=32 with (n, C) in (32, 2048), (32, 512), (4, 4096). --B/--n/--C take lists (every
combination is run); --config n:C (or B:n:C) gives explicit pairs; --suite large runs
(B=4096, n=4, C=4096) and (B=1024, n=32, C=2048). --layer dynamic times DynamicMHC (the
paper's input-dependent form, n=4 by default) against its portable path and its reference."""

EPILOG = """Examples:

  mhc bench --mode latency

  mhc bench --mode throughput --B 32

  mhc bench --mode throughput --config 32:2048,4:4096 --compare seed,portable

  mhc bench --C 1024,4096 --dtype float16 --backward --format json --out bench.json

  mhc bench --suite large --compare torch

  mhc bench --layer dynamic --mode throughput --compare portable

  mhc bench --layer dynamic --suite large --phi-dtype float32

  mhc bench --plot speedup.png"""


class Suite(str, Enum):
    latency = "latency"
    throughput = "throughput"
    large = "large"


ConfigOpt = Annotated[Optional[List[str]], typer.Option(
    "--config", metavar="[B:]n:C[,...]",
    help="Explicit shapes as n:C or B:n:C (repeat or comma-separate); --B applies to n:C pairs.")]
SuiteOpt = Annotated[Optional[Suite], typer.Option(
    "--suite", help="A named shape table: latency, throughput or large (then --mode defaults to throughput).")]
CompareOpt = Annotated[Optional[List[str]], typer.Option(
    "--compare", "-c", metavar="NAME[,NAME...]",
    help=f"Implementations to compare with: {', '.join(bench.COMPARISONS)} or none "
                            f"(default: {', '.join(bench.DEFAULT_COMPARE)}); repeat or comma-separate.")]
RepeatsOpt = Annotated[Optional[int], typer.Option(
    "--repeats", help="Throughput mode: batches of --iters calls (one sample each).")]
PhiDtypeOpt = Annotated[Optional[str], typer.Option(
    "--phi-dtype", metavar="DTYPE",
    help="--layer dynamic: phi's dtype, float32 (DynamicMHC's default), float16 or bfloat16; default: "
         "x's dtype, as the liger peer's phi, so both time one configuration.")]
PlotOpt = Annotated[Optional[Path], typer.Option(
    "--plot", help="Also draw the kernels' speedup by C into this PNG (needs the `plot` extra: matplotlib).",
    dir_okay=False)]


def resolve_shapes(mode: str, Bs: list[int], ns: list[int], Cs: list[int], configs: list[str],
                   suite: Optional[str], layer: str = "static") -> list[tuple[int, int, int]]:
    """The (B, n, C) list from the shape options (see the command's help)."""
    if suite is not None:
        if Bs or ns or Cs or configs:
            output.fail("--suite names a whole shape table: do not combine it with --B/--n/--C/--config")
        return list(bench.default_shapes(suite, layer))
    default = bench.default_shapes(mode, layer)
    if configs:
        if ns or Cs:
            output.fail("--config gives explicit shapes: do not combine it with --n/--C")
        shapes = []
        for spec in configs:
            parts = spec.split(":")
            try:
                vals = [int(p) for p in parts]
            except ValueError:
                vals = []
            if len(vals) not in (2, 3) or min(vals) < 1:
                output.fail(f"--config {spec!r}: expected n:C or B:n:C with integers >= 1 (e.g. --config 32:2048)")
            if len(vals) == 3:
                if Bs:
                    output.fail(f"--config {spec!r} names B itself: do not combine B:n:C with --B")
                shapes.append(tuple(vals))
            else:
                shapes += [(B, vals[0], vals[1]) for B in (Bs or [default[0][0]])]
        return shapes
    if not ns and not Cs:
        return [(B, n, C) for B in (Bs or [default[0][0]]) for (_, n, C) in default]
    ns = ns or [default[0][1]]
    Cs = Cs or sorted({C for (_, _, C) in default})
    return [(B, n, C) for B in (Bs or [default[0][0]]) for n in ns for C in Cs]


def parse_compare(values: Optional[List[str]]) -> list[str]:
    names = split_list(values)
    if not names:
        return list(bench.DEFAULT_COMPARE)
    if [x.lower() for x in names] == ["none"]:
        return []
    for name in names:
        if name not in bench.COMPARISONS:
            output.fail(f"--compare {name!r}: expected any of {', '.join(bench.COMPARISONS)} (or none)")
    return list(dict.fromkeys(names))


def parse_phi_dtype(value: Optional[str], layer: str) -> Optional[str]:
    """--phi-dtype as a dtype name (None: x's dtype); only the dynamic layer has a phi."""
    if value is None:
        return None
    if layer != "dynamic":
        output.fail(f"--phi-dtype {value}: only --layer dynamic has a phi (got --layer {layer})")
    return parse_dtypes([value], [], "--phi-dtype")[0]


class _ProgressSteps:
    """bench.run's on_step callback driving a rich progress bar on stderr."""

    def __init__(self, progress: Optional[Progress], total: int):
        self.progress, self.started = progress, False
        self.task = progress.add_task("starting", total=total) if progress else None

    def __call__(self, message: str) -> None:
        if self.progress is None:
            return
        if self.started:
            self.progress.advance(self.task)
        self.started = True
        self.progress.update(self.task, description=message)

    def finish(self) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=self.progress.tasks[0].total, description="done")


def columns(compare: list[str], backward: bool, dynamic: bool = False) -> list[output.Column]:
    cols = [output.Column("B", "B"), output.Column("n", "n"), output.Column("C", "C"),
            output.Column("dtype", "dtype", justify="left")]
    if dynamic:
        cols.append(output.Column("phi_dtype", "phi", justify="left"))
    if backward:
        cols.append(output.Column("pass", "pass", justify="left"))
    cols += [output.Column("impl", "impl", justify="left"),
             output.Column("median_us", "median us", output.fmt_us),
             output.Column("p20_us", "p20 us", output.fmt_us), output.Column("p80_us", "p80 us", output.fmt_us),
             output.Column("GBps", "GB/s", output.fmt_gbps),
             output.Column("copy_fraction", "of copy BW", output.fmt_pct)]
    cols += [output.Column(f"speedup_vs_{c}", f"vs {c}", output.fmt_speedup) for c in compare]
    cols.append(output.Column("note", "runs", justify="left"))
    return cols


def bench_command(
    mode: Annotated[Optional[Mode], typer.Option(
        "--mode", "-m", help="latency (evaluate each call) or throughput (queue calls, sync at the end); "
                             "default latency, or throughput with --suite throughput/large.")] = None,
    B: BOpt = None,
    n: NOpt = None,
    C: COpt = None,
    config: ConfigOpt = None,
    suite: SuiteOpt = None,
    dtype: DtypeOpt = None,
    layer: LayerOpt = Layer.static,
    backward: BackwardOpt = False,
    iters: ItersOpt = None,
    warmup: WarmupOpt = None,
    repeats: RepeatsOpt = None,
    compare: CompareOpt = None,
    phi_dtype: PhiDtypeOpt = None,
    plot: PlotOpt = None,
    fmt: FormatOpt = None,
    out: OutOpt = None,
    quiet: QuietOpt = False,
) -> None:
    mode_name = mode.value if mode else ("throughput" if suite in (Suite.throughput, Suite.large) else "latency")
    shapes = resolve_shapes(mode_name, parse_ints("--B", B), parse_ints("--n", n), parse_ints("--C", C),
                            split_list(config), suite.value if suite else None, layer.value)
    dtypes = parse_dtypes(dtype, [bench.DEFAULT_DTYPE])
    comparisons = parse_compare(compare)
    phi = parse_phi_dtype(phi_dtype, layer.value)
    check_count("--iters", iters, 1)
    check_count("--warmup", warmup, 0)
    check_count("--repeats", repeats, 1)
    if plot is not None:
        if importlib.util.find_spec("matplotlib") is None:
            output.fail("--plot needs matplotlib: pip install 'mhc-aot[plot]' (or pip install matplotlib)")
        if not comparisons:
            output.fail("--plot draws the speedup over the --compare implementations: pass --compare (not none)")
    d = bench.default_settings(mode_name)
    settings = bench.Settings(iters=iters or d.iters, warmup=d.warmup if warmup is None else warmup,
                              repeats=repeats or d.repeats)
    cases = bench.make_cases(mode_name, shapes, dtypes, backward, layer.value, phi)
    impls = ["kernels", *comparisons]
    for c in impls:
        why = bench.availability(c, layer.value)
        if why:
            output.fail(f"--compare {c}: {why}" if c != "kernels" else f"--layer {layer.value}: {why}")
    try:
        bench.check_memory(cases, impls)
    except bench.BenchError as e:
        output.fail(str(e))

    progress = None if quiet else Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=output.stderr_console(), transient=False)
    steps = _ProgressSteps(progress, 1 + bench.measures_matmul_rate() + len(cases) * len(impls))
    try:
        if progress is not None:
            progress.start()
        result = bench.run(cases, comparisons, settings, on_step=steps)
        steps.finish()
    except bench.BenchError as e:
        output.fail(str(e))
    finally:
        if progress is not None:
            progress.stop()

    meta = result.meta
    backend = dispatch.device_backend()
    notes = [f"{meta['device']} ({meta.get('device_name') or backend}), MLX {meta['mlx']}; "
             f"copy bandwidth {meta['copy_GBps']:.1f} GB/s (float32 x + 1, read + write)"
             + ("" if meta.get("cuda_graphs") is None else
                f"; MLX CUDA graphs {'on' if meta['cuda_graphs'] else 'off (MLX_USE_CUDA_GRAPHS=0)'}"),
             f"{settings.iters} calls x {settings.repeats if mode_name == 'throughput' else 1} "
             f"{'batches' if mode_name == 'throughput' else 'run'}, {settings.warmup} warmup; GB/s counts "
             + ("x, out, x, dout, dx (5 E s)" if backward else "x read + out written (2 E s)")]
    if backend == "cpu":
        notes.append("kernels = backend='auto', which on MLX's CPU backend IS the portable path "
                     "(MLX has no custom-kernel primitive on CPU)")
        gflops = meta.get("matmul_GFLOPs")
        if gflops is not None:
            T, K, M = bench.MATMUL_SHAPE
            notes.append(f"MLX's float32 matmul: {gflops:.1f} GFLOP/s at [{T}, {K}] @ [{K}, {M}] (DynamicMHC's "
                         "projection at T = 256)"
                         + ("; that is the reference BLAS's speed, and every matmul of the portable path runs on "
                            "it: README, \"MLX's CPU matmuls on Linux\", shows an OpenBLAS preload"
                            if gflops < bench.SLOW_CPU_MATMUL_GFLOPS else ""))
    title = (f"mhc bench: {mode_name}{', dynamic layer' if layer == Layer.dynamic else ''}"
             f"{', forward+backward' if backward else ', forward'}")
    res = output.Result(title, result.rows, columns(comparisons, backward, layer == Layer.dynamic), meta=meta,
                        notes=notes, command="bench")
    output.emit(res, fmt, out, quiet)
    if plot is not None:
        try:
            bench.plot_speedup(result.rows, plot, title=f"{title} ({meta.get('device_name') or backend})")
        except OSError as e:
            output.fail(f"--plot {plot}: cannot write ({e.strerror or e}): pick a writable path")
        output.status(f"wrote plot to {plot}", quiet)


def register(app: typer.Typer) -> None:
    app.command("bench", help=HELP, epilog=EPILOG,
                short_help="Time the layer against other implementations (latency / throughput).")(bench_command)
