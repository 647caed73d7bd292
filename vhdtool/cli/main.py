"""vhdtool command line: ``inspect``, ``matrix`` and ``plan``.

Errors become exit codes here and only here: a VhdtoolError prints one line
``vhdtool: <file>: <problem>; <what to do>`` on stderr and exits with its code.
Documents go to stdout, everything else to stderr.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

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


def _for_each_image(images, as_json: bool, work, render, error_image) -> None:
    """Run ``work`` on each image; one document each (a list for several); exit with the first error's code.

    ``work(image)`` returns the result; ``render(result)`` its text; ``error_image(image)``
    what the JSON document of a failed image names it by.
    """
    from vhdtool.guest.inspection import SCHEMA

    docs = []
    code = 0
    for i, image in enumerate(images):
        try:
            result = work(image)
        except VhdtoolError as e:
            _fail_line(e.message)
            code = code or e.exit_code
            docs.append({"schema": SCHEMA, "image": error_image(image), "error": {"code": e.exit_code, "message": e.message}})
            continue
        if as_json:
            docs.append(result.to_dict())
        else:
            if i:
                typer.echo("")
            typer.echo(render(result))
    if as_json:
        out = docs[0] if len(images) == 1 else docs
        if len(images) > 1 or code == 0:
            typer.echo(json.dumps(out, indent=2))
    raise typer.Exit(code)


@app.command()
def inspect(
    images: List[Path] = typer.Argument(..., help="VHDX or VHD files", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="print one JSON document per image (a list for several)"),
    stats: bool = typer.Option(False, "--stats", help="print how much of each image file was read (stderr)"),
) -> None:
    """Report the guest OS, its integration services and the disk layout of each image."""
    from vhdtool.cli.render import render_inspection
    from vhdtool.guest.inspection import inspect_measured

    def work(image):
        result, io = inspect_measured(image)
        if stats:
            typer.echo(f"vhdtool: stats: {image}: read {io.bytes_read} bytes in {io.reads} reads", err=True)
        return result

    _for_each_image(images, as_json, work, render_inspection, lambda image: {"path": os.fspath(image)})


@app.command()
def matrix(
    host: Optional[str] = typer.Option(None, "--host", help="one host: win8, win8.1, win10 or an alias (2012, 2012r2, 2016...)"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON list of rows"),
    revision: Optional[str] = typer.Option(None, "--matrix-revision", help="revision of the source document"),
) -> None:
    """Show the host/guest OS matrix: how each guest gets its integration services."""
    from vhdtool.cli.render import render_matrix
    from vhdtool.plan.matrix import load_matrix

    m = load_matrix(revision)
    hosts = [m.resolve_host(host)] if host else [h.key for h in m.hosts]
    rows = [r for h in hosts for r in m.table(h)]
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in rows], indent=2))
    else:
        typer.echo(render_matrix(m, hosts))


@app.command()
def plan(
    images: List[Path] = typer.Argument(..., help="VHDX or VHD files", show_default=False),
    host: str = typer.Option(..., "--host", help="the Hyper-V host: win8, win8.1, win10 or an alias (2012, 2012r2, 2016...)"),
    cabs: List[Path] = typer.Option([], "--cabs", help="folder, .cab or vmguest.iso to take cabs from (repeatable)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON document per image (a list for several)"),
    revision: Optional[str] = typer.Option(None, "--matrix-revision", help="revision of the source document"),
) -> None:
    """Decide how each image's guest gets its integration services on HOST, and which cab to stage."""
    from vhdtool.cli.render import render_plan
    from vhdtool.guest.inspection import inspect as inspect_image
    from vhdtool.plan.decide import plan as make_plan
    from vhdtool.plan.matrix import load_matrix
    from vhdtool.plan.sources import load_sources

    m = load_matrix(revision)
    host_key = m.resolve_host(host)
    catalog = load_sources(cabs)
    _for_each_image(
        images, as_json, lambda image: make_plan(inspect_image(image), host_key, catalog, m), render_plan, os.fspath
    )


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
