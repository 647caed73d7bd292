"""``vhdtool copy-in IMAGE LOCAL... GUESTDIR``: copy local files into a folder of an offline guest."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import typer

from vhdtool.cli.images import fail_line

EPILOG = (
    "GUESTDIR is a folder of the guest's system volume (C:\\Windows\\Temp or /Windows/Temp), created as "
    "needed; an existing file of the same name is replaced. With --partition N it is a folder of that "
    "NTFS volume instead, so data disks without an operating system work too."
)


def copy_in(
    image: Path = typer.Argument(..., metavar="IMAGE", show_default=False, help="VHDX or VHD file"),
    paths: List[str] = typer.Argument(..., metavar="LOCAL... GUESTDIR", show_default=False,
                                      help="local files, then the guest folder"),
    partition: Optional[int] = typer.Option(None, "--partition", metavar="N", help="Write into NTFS partition N."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would change; write nothing."),
    output: Optional[Path] = typer.Option(None, "--output", metavar="NEW",
                                          help="Write a changed copy to NEW; the image is not opened for writing."),
    as_json: bool = typer.Option(False, "--json", help="Print the change set as JSON."),
) -> None:
    """Copy local files into a folder of an offline guest."""
    from vhdtool.cli.render import render_edit
    from vhdtool.editor import edit
    from vhdtool.errors import ImageNotFound

    if len(paths) < 2:
        raise typer.BadParameter("give at least one local file and the guest folder", param_hint="LOCAL... GUESTDIR")
    *locals_, guest_dir = paths
    for local in locals_:
        if not os.path.isfile(local):
            raise ImageNotFound(local, "no such local file", "give files to copy, then the guest folder")
    base = guest_dir.replace("\\", "/").rstrip("/")
    with edit(image, dry_run=dry_run, output=output) as ed:
        ed.mkdir(guest_dir, partition=partition)
        for local in locals_:
            ed.write_file(f"{base}/{os.path.basename(local)}", Path(local), partition=partition)
    result = ed.result
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        typer.echo(render_edit(result))
    if not result.files and not result.registry:
        fail_line(f"{image}: nothing to change; the guest already has these files")


copy_in.__doc__ = copy_in.__doc__ + "\n\n    " + EPILOG
