"""``vhdtool copy-in IMAGE LOCAL... GUESTDIR``: copy local files into a folder of an offline guest."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer

from vhdtool.cli.images import for_each_image
from vhdtool.cli.options import DRY_RUN, IMAGE, OUTPUT, json_option


def copy_in(
    image: Path = IMAGE,
    paths: List[str] = typer.Argument(..., metavar="LOCAL... GUESTDIR", show_default=False,
                                      help="local files, then the guest folder"),
    partition: Optional[int] = typer.Option(None, "--partition", metavar="N", help="Write into partition N (NTFS or ext2/3/4)."),
    dry_run: bool = DRY_RUN,
    output: Optional[Path] = OUTPUT,
    as_json: bool = json_option("Print the change set as JSON."),
) -> None:
    r"""Copy local files into a folder of an offline guest.

    GUESTDIR is a folder of the guest's system volume (C:\Windows\Temp or /Windows/Temp), created as
    needed; an existing file of the same name is replaced. On a Linux guest it is a folder of its
    root filesystem (ext2/3/4), files written as root's, 0644. With --partition N it is a folder of
    that NTFS or ext2/3/4 volume instead, so data disks without an operating system work too.
    """
    from vhdtool.cli.render import render_edit
    from vhdtool.editor import edit
    from vhdtool.editor.changes import SCHEMA
    from vhdtool.errors import ImageNotFound

    if len(paths) < 2:
        raise typer.BadParameter("give at least one local file and the guest folder", param_hint="LOCAL... GUESTDIR")
    *locals_, guest_dir = paths
    base = guest_dir.replace("\\", "/").rstrip("/")

    def work(image: Path):
        for local in locals_:
            if not os.path.isfile(local):  # a FIFO, a device, a folder: only a regular file's bytes stay put
                what = "not a regular file" if os.path.exists(local) else "no such local file"
                raise ImageNotFound(local, what, "give files to copy, then the guest folder")
        with edit(image, dry_run=dry_run, output=output) as ed:
            ed.mkdir(guest_dir, partition=partition)
            for local in locals_:
                ed.write_file(f"{base}/{os.path.basename(local)}", Path(local), partition=partition)
        return ed.result

    for_each_image([image], as_json, SCHEMA, work, render_edit, os.fspath, note=_unchanged)


def _unchanged(image: Path, result) -> str | None:
    if result.files or result.registry:
        return None
    return f"{image}: nothing to change; the guest already has these files"
