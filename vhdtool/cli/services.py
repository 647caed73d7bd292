"""``vhdtool services IMAGE``: the guest's integration services, and their start type set offline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from vhdtool.cli.images import fail_line


def services(
    image: Path = typer.Argument(..., metavar="IMAGE", show_default=False, help="VHDX or VHD file"),
    enable: List[str] = typer.Option([], "--enable", metavar="NAME", show_default=False,
                                     help="Set service NAME to manual start, as Windows ships it; repeatable."),
    disable: List[str] = typer.Option([], "--disable", metavar="NAME", show_default=False,
                                      help="Set service NAME to disabled (Start=4); repeatable."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would change; write nothing."),
    output: Optional[Path] = typer.Option(None, "--output", metavar="NEW",
                                          help="Write a changed copy to NEW; the image is not opened for writing."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON: the services, or with --enable/--disable the change set."),
) -> None:
    """List the integration services of a guest; set how they start."""
    from vhdtool.cli.render import render_edit, render_services
    from vhdtool.editor.services import list_services, set_services, wanted_starts

    wanted = wanted_starts(enable, disable)
    if not wanted:
        doc = list_services(image)
        if as_json:
            typer.echo(json.dumps(doc, indent=2))
        else:
            typer.echo(render_services(doc))
        return
    result = set_services(image, wanted, dry_run=dry_run, output=output)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        typer.echo(render_edit(result))
    if not result.registry:
        fail_line(f"{image}: nothing to change; the services already start that way")
