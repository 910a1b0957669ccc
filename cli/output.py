"""The one output helper: results as a rich table, JSON or CSV, on stdout or into --out; status
and progress on stderr; errors as one line with a non-zero exit code.

Every command hands `emit` a `Result`: rows (dicts, all keys kept in JSON/CSV), the columns the
table shows, a title, facts about the run (`meta`) and notes (table caption, JSON "notes").
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional

import typer
from rich.console import Console
from rich.table import Table

TABLE_WIDTH = 200  # when stdout is not a terminal: wide enough that rows never wrap


@dataclass
class Column:
    key: str
    header: str
    fmt: Optional[Callable[[Any], str]] = None  # how the table shows a value; JSON/CSV keep it raw
    justify: str = "right"


@dataclass
class Result:
    title: str
    rows: list[dict]
    columns: list[Column]
    meta: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    command: str = ""

    def as_dict(self) -> dict:
        return {"command": self.command, "title": self.title, "meta": self.meta, "notes": self.notes,
                "rows": self.rows}


def fail(message: str, code: int = 2) -> NoReturn:
    """One line on stderr, then exit: 2 for bad options and impossible requests, 1 for failures."""
    sys.stderr.write(f"mhc: error: {' '.join(str(message).split())}\n")
    sys.stderr.flush()
    raise typer.Exit(code)


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False)


def status(message: str, quiet: bool = False) -> None:
    if not quiet:
        stderr_console().print(message, markup=False, highlight=False, soft_wrap=True)


def stdout_console(file=None) -> Console:
    f = file if file is not None else sys.stdout
    tty = hasattr(f, "isatty") and f.isatty()
    return Console(file=f, width=None if tty else TABLE_WIDTH, highlight=False, soft_wrap=False,
                   no_color=not tty, force_terminal=False if not tty else None)


def resolve_format(fmt, out: Optional[Path]) -> str:
    """--format wins; else the suffix of --out (.json, .csv); else a table."""
    if fmt is not None:
        return fmt.value if hasattr(fmt, "value") else str(fmt)
    if out is not None and out.suffix.lower() in (".json", ".csv"):
        return out.suffix.lower()[1:]
    return "table"


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


def to_json(result: Result) -> str:
    return json.dumps(_jsonable(result.as_dict()), indent=2) + "\n"


def to_csv(result: Result) -> str:
    keys: list[str] = []
    for r in result.rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in result.rows:
        w.writerow({k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in r.items()})
    return buf.getvalue()


def to_table(result: Result) -> Table:
    t = Table(title=result.title, caption="\n".join(result.notes) or None, caption_justify="left")
    for c in result.columns:
        t.add_column(c.header, justify=c.justify)
    for r in result.rows:
        cells = []
        for c in result.columns:
            v = r.get(c.key)
            cells.append("" if v is None else (c.fmt(v) if c.fmt else str(v)))
        t.add_row(*cells)
    return t


def emit(result: Result, fmt, out: Optional[Path], quiet: bool = False) -> None:
    """Write `result` in the chosen format to stdout, or to `out` (and say so on stderr)."""
    kind = resolve_format(fmt, out)
    if out is not None:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out, "w", encoding="utf-8", newline="") as f:
                _write(result, kind, f)
        except OSError as e:
            fail(f"--out {out}: cannot write ({e.strerror or e}): pick a writable path")
        status(f"wrote {kind} to {out}", quiet)
    else:
        _write(result, kind, sys.stdout)


def _write(result: Result, kind: str, f) -> None:
    if kind == "json":
        f.write(to_json(result))
    elif kind == "csv":
        f.write(to_csv(result))
    else:
        stdout_console(f).print(to_table(result))
    f.flush()


# ---------------------------------------------------------------- value formatters for tables
def fmt_us(v) -> str:
    return f"{v:,.1f}" if isinstance(v, (int, float)) and math.isfinite(v) else str(v)


def fmt_float(digits: int) -> Callable[[Any], str]:
    return lambda v: f"{v:.{digits}f}" if isinstance(v, (int, float)) else str(v)


def fmt_gbps(v) -> str:
    if not isinstance(v, (int, float)):
        return str(v)
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}" if v >= 0.1 else f"{v:.3f}"


def fmt_sci(v) -> str:
    return f"{v:.2e}" if isinstance(v, (int, float)) else str(v)


def fmt_speedup(v) -> str:
    return f"x{v:.2f}" if isinstance(v, (int, float)) else str(v)


def fmt_pct(v) -> str:
    return f"{100 * v:.0f}%" if isinstance(v, (int, float)) else str(v)
