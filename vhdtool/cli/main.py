"""vhdtool command line: one module per command; errors become exit codes here and only here.

A VhdtoolError prints one line ``vhdtool: <file>: <problem>; <what to do>`` on
stderr and exits with its code (vhdtool.errors). Documents go to stdout,
everything else to stderr. Each command imports what it needs when it runs.
"""

from __future__ import annotations

import os
import sys

import typer

from vhdtool.cli.batch import batch_app, report
from vhdtool.cli.copy_in import copy_in
from vhdtool.cli.doctor import doctor
from vhdtool.cli.images import fail_line
from vhdtool.cli.inspect import inspect
from vhdtool.cli.matrix import matrix
from vhdtool.cli.plan import plan
from vhdtool.cli.services import services
from vhdtool.cli.stage import stage, status
from vhdtool.errors import EXIT_INTERNAL_ERROR, EXIT_INTERRUPTED, VhdtoolError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Plain help: it reads the same in a pipe, a log and an 80-column terminal.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        from vhdtool import __version__

        typer.echo(f"vhdtool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", is_eager=True, callback=_print_version, help="Print the version and exit."
    ),
) -> None:
    """Service offline Hyper-V disk images (VHDX/VHD) from Linux: inspect guests, plan integration services."""


app.command()(inspect)
app.command()(matrix)
app.command()(plan)
app.command("copy-in")(copy_in)
app.command()(services)
app.command()(stage)
app.command()(status)
app.add_typer(batch_app, name="batch")
app.command()(report)
app.command()(doctor)


def main() -> None:
    try:
        app()
    except VhdtoolError as e:
        fail_line(e.message)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        fail_line("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except Exception as e:  # noqa: BLE001 - the last line of defence: no traceback for users
        if os.environ.get("VHDTOOL_DEBUG"):
            raise
        detail = str(e).splitlines()[0] if str(e) else ""
        fail_line(f"internal error: {type(e).__name__}: {detail} (set VHDTOOL_DEBUG=1 for a traceback and report it)")
        sys.exit(EXIT_INTERNAL_ERROR)


if __name__ == "__main__":
    main()
