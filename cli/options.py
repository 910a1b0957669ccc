"""Options shared across commands, defined once as `Annotated` aliases, and their parsers.

Shape options take repeated flags or comma lists (`--C 256 --C 1024` == `--C 256,1024`);
parsing and validation errors end the command through `output.fail` as one line with exit code 2.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from . import output


class Format(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


class Mode(str, Enum):
    latency = "latency"
    throughput = "throughput"


class Layer(str, Enum):
    static = "static"
    dynamic = "dynamic"


LayerOpt = Annotated[Layer, typer.Option(
    "--layer", help="static (MHCLayer) or dynamic (DynamicMHC around an identity block, the paper's "
                    "input-dependent form; default shapes use n=4).")]

FormatOpt = Annotated[Optional[Format], typer.Option(
    "--format", "-f", help="Result format: table (rich, the default), json or csv. "
                           "Without it, --out FILE.json / FILE.csv picks the format by suffix.")]
OutOpt = Annotated[Optional[Path], typer.Option(
    "--out", "-o", help="Write the results to this file instead of stdout.", dir_okay=False)]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or status lines on stderr.")]

BOpt = Annotated[Optional[List[str]], typer.Option(
    "--B", "-B", metavar="INT[,INT...]",
    help="Tokens per call (leading dims flattened); repeat or comma-separate for several.")]
NOpt = Annotated[Optional[List[str]], typer.Option(
    "--n", "-n", metavar="INT[,INT...]", help="Residual streams; repeat or comma-separate for several.")]
COpt = Annotated[Optional[List[str]], typer.Option(
    "--C", "-C", metavar="INT[,INT...]", help="Channels per stream; repeat or comma-separate for several.")]
DtypeOpt = Annotated[Optional[List[str]], typer.Option(
    "--dtype", "-d", metavar="DTYPE[,DTYPE...]",
    help="float32, float16 or bfloat16 (aliases f32/fp32, f16/fp16/half, bf16); "
                          "repeat or comma-separate for several.")]
ItersOpt = Annotated[Optional[int], typer.Option(
    "--iters", help="Timed calls per measurement (default: modest on CPU, more on a GPU).")]
WarmupOpt = Annotated[Optional[int], typer.Option("--warmup", help="Untimed calls before timing.")]
BackwardOpt = Annotated[bool, typer.Option(
    "--backward", help="Forward + backward: mx.vjp with a fixed dout as the output's cotangent, w.r.t. x and all parameters.")]

DTYPE_ALIASES = {
    "float32": "float32", "f32": "float32", "fp32": "float32",
    "float16": "float16", "f16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}


def split_list(values: Optional[List[str]]) -> list[str]:
    """Repeated flags and comma lists, flattened: ["256,1024", "2048"] -> ["256", "1024", "2048"]."""
    return [p.strip() for v in values or [] for p in str(v).split(",") if p.strip()]


def parse_ints(flag: str, values: Optional[List[str]], minimum: int = 1) -> list[int]:
    out = []
    for p in split_list(values):
        try:
            v = int(p)
        except ValueError:
            output.fail(f"{flag} {p!r}: expected an integer (e.g. {flag} 256,1024)")
        if v < minimum:
            output.fail(f"{flag} {v}: expected an integer >= {minimum}")
        out.append(v)
    return out


def parse_dtypes(values: Optional[List[str]], default: list[str], flag: str = "--dtype") -> list[str]:
    names = split_list(values)
    out = []
    for p in names:
        key = p.lower()
        if key not in DTYPE_ALIASES:
            output.fail(f"{flag} {p!r}: unknown dtype; expected float32, float16 or bfloat16")
        out.append(DTYPE_ALIASES[key])
    return out or list(default)


def check_count(flag: str, value: Optional[int], minimum: int) -> None:
    if value is not None and value < minimum:
        output.fail(f"{flag} {value}: expected an integer >= {minimum}")
