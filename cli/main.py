"""`mhc`: the Typer app; each command lives in its own module."""

from __future__ import annotations

import typer

from . import info

app = typer.Typer(help="mhc-aot: Manifold-Constrained Hyper-Connections for MLX, kernels compiled ahead of time.",
                  no_args_is_help=True, add_completion=False)
app.command("info", help=info.__doc__)(info.info)


@app.callback()
def _root() -> None:
    """mhc-aot command line: info, bench, validate, profile."""


def main() -> None:
    app()


if __name__ == "__main__":
    main()
