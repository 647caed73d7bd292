"""vhdtool command line: ``vhdtool inspect IMAGE... [--json]``.

Errors become exit codes here and only here: a VhdtoolError prints one line
``vhdtool: <file>: <problem>; <what to do>`` on stderr and exits with its code.
Documents go to stdout, everything else to stderr.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List

import typer

from vhdtool.errors import VhdtoolError

INTERNAL_ERROR = 70

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Service offline Hyper-V disk images (VHDX/VHD).",
)


def _fail_line(message: str) -> None:
    typer.echo(f"vhdtool: {message}", err=True)


@app.callback()
def _root() -> None:
    """Service offline Hyper-V disk images (VHDX/VHD)."""


@app.command()
def inspect(
    images: List[Path] = typer.Argument(..., help="VHDX or VHD files", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="print one JSON document per image (a list for several)"),
    stats: bool = typer.Option(False, "--stats", help="print how much of each image file was read (stderr)"),
) -> None:
    """Report the guest OS, its integration services and the disk layout of each image."""
    from vhdtool.cli.render import render_inspection
    from vhdtool.guest.inspection import SCHEMA, inspect_measured

    docs = []
    code = 0
    for i, image in enumerate(images):
        try:
            result, io = inspect_measured(image)
        except VhdtoolError as e:
            _fail_line(e.message)
            code = code or e.exit_code
            docs.append({"schema": SCHEMA, "image": {"path": os.fspath(image)}, "error": {"code": e.exit_code, "message": e.message}})
            continue
        if stats:
            typer.echo(f"vhdtool: stats: {image}: read {io.bytes_read} bytes in {io.reads} reads", err=True)
        if as_json:
            docs.append(result.to_dict())
        else:
            if i:
                typer.echo("")
            typer.echo(render_inspection(result))
    if as_json:
        out = docs[0] if len(images) == 1 else docs
        if len(images) > 1 or code == 0:
            typer.echo(json.dumps(out, indent=2))
    raise typer.Exit(code)


def main() -> None:
    try:
        app()
    except VhdtoolError as e:
        _fail_line(e.message)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        _fail_line("interrupted")
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - the last line of defence: no traceback for users
        if os.environ.get("VHDTOOL_DEBUG"):
            raise
        detail = str(e).splitlines()[0] if str(e) else ""
        _fail_line(f"internal error: {type(e).__name__}: {detail} (set VHDTOOL_DEBUG=1 for a traceback and report it)")
        sys.exit(INTERNAL_ERROR)


if __name__ == "__main__":
    main()
