"""Versions, device, toolchains found at build time and the shipped kernel manifest.

Examples:
  mhc info
  mhc info --dispatch
"""

from __future__ import annotations

import platform
import sys

import mlx.core as mx
import typer
from rich.console import Console
from rich.table import Table

import mhc_aot
from mhc_aot import dispatch, manifest


def _device_rows() -> list[tuple[str, str]]:
    rows = [("MLX default device", str(mx.default_device())), ("MLX backend", dispatch.device_backend())]
    if dispatch.device_backend() != "cpu":
        info = mx.device_info()
        for key in ("device_name", "architecture", "memory_size"):
            if key in info:
                rows.append((f"GPU {key}", str(info[key])))
    return rows


def info(dispatch_table: bool = typer.Option(False, "--dispatch", help="Print the full dispatch rule table.")) -> None:
    out = Console()
    t = Table(title="mhc-aot", show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value")
    t.add_row("mhc-aot", mhc_aot.__version__)
    t.add_row("MLX", mx.__version__)
    t.add_row("Python", sys.version.split()[0])
    t.add_row("OS", f"{platform.system()} {platform.release()} {platform.machine()}")
    for k, v in _device_rows():
        t.add_row(k, v)
    code = 0
    try:
        m = manifest.load()
        for name, facts in m["toolchains"].items():
            t.add_row(f"toolchain {name}", "found" if facts.get("found") else f"absent ({facts.get('reason', '')})")
        counts: dict[str, int] = {}
        for r in m["variants"]:
            counts[r["backend"]] = counts.get(r["backend"], 0) + 1
        t.add_row("kernel variants", ", ".join(f"{b}: {c}" for b, c in counts.items()) or "none")
        problems = manifest.verify_all()
        t.add_row("kernel files", "all match their sha256" if not problems else f"{len(problems)} problems")
        if problems:
            code = 1
    except manifest.KernelArtifactError as e:
        t.add_row("kernel manifest", f"[red]{e}[/red]")
        code = 1
    for B, n, C in ((1, 32, 2048), (4096, 4, 4096), (1024, 100, 64)):
        t.add_row(f"dispatch B={B} n={n} C={C}", dispatch.explain("mhc_forward", n, C, B=B))
    out.print(t)
    if dispatch_table:
        rt = Table(title="dispatch rules (first match wins)")
        for col in ("backend", "op", "strategy", "max_B", "max_C", "why"):
            rt.add_column(col)
        for r in dispatch.rules_table():
            rt.add_row(*(str(r[c]) for c in ("backend", "op", "strategy", "max_B", "max_C", "why")))
        out.print(rt)
    raise typer.Exit(code)
