"""`mhc`: the Typer app; each command lives in its own module.

Usage errors (unknown option, bad value) end as one line on stderr with exit code 2, like the
commands' own checks (`output.fail`), never as a box or a traceback.
"""

from __future__ import annotations

import sys

import typer
from typer.core import TyperGroup

from . import bench, info, profile, validate


def _is_usage_error(e: BaseException) -> bool:
    # click's ClickException, bundled inside Typer or not: never import click directly
    return hasattr(e, "format_message") and isinstance(getattr(e, "exit_code", None), int)


class OneLineErrors(TyperGroup):
    """Runs the command non-standalone so that usage errors come back here to be printed as one line."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                              standalone_mode=False, **extra)
        except Exception as e:  # noqa: BLE001 - re-raised unless it is a usage error or an abort
            if _is_usage_error(e):
                message = " ".join(e.format_message().split())
                if "no_args_is_help" in type(e).__name__.lower() or type(e).__name__ == "NoArgsIsHelpError":
                    sys.stdout.write(e.format_message() + "\n")
                    code = 0
                else:
                    ctx = getattr(e, "ctx", None)
                    where = getattr(ctx, "command_path", None) or "mhc"
                    sys.stderr.write(f"mhc: error: {message} (see {where} --help)\n")
                    code = e.exit_code
            elif type(e).__name__ == "Abort":
                sys.stderr.write("mhc: aborted\n")
                code = 1
            else:
                raise
            sys.stdout.flush()
            sys.stderr.flush()  # click < 8.2's CliRunner reads stderr without flushing it
            if not standalone_mode:
                return code
            sys.exit(code)
        code = rv if isinstance(rv, int) else 0
        if not standalone_mode:
            return rv
        sys.exit(code)


# Markdown mode: a help paragraph flows at the terminal's width (rich mode keeps the docstrings' line breaks)
app = typer.Typer(cls=OneLineErrors, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode="markdown",
                  help="mhc-aot: Manifold-Constrained Hyper-Connections for MLX, kernels compiled ahead of time.")
for _module in (info, bench, validate, profile):
    _module.register(app)


@app.callback()
def _root() -> None:
    """mhc-aot command line: info, bench, validate, profile. Data goes to stdout, progress and
    status to stderr; `mhc COMMAND --help` shows each command's options and examples."""


def main() -> None:
    app()


if __name__ == "__main__":
    main()
