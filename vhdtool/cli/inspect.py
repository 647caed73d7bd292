"""``vhdtool inspect IMAGE...``: the guest OS, its integration services and the disk layout."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer

from vhdtool.cli import options
from vhdtool.cli.images import for_each_image, path_document


def inspect(
    images: List[Path] = options.IMAGES,
    as_json: bool = options.JSON_PER_IMAGE,
    stats: bool = typer.Option(False, "--stats", help="Say on stderr how much of each image file was read."),
) -> None:
    """Report each IMAGE's guest OS, integration services and disks."""
    from vhdtool.cli.render import render_inspection
    from vhdtool.guest.discover import inspect_measured
    from vhdtool.guest.inspection import SCHEMA

    def work(image: Path):
        result, io = inspect_measured(image)
        if stats:
            typer.echo(f"vhdtool: stats: {image}: read {io.bytes_read} bytes in {io.reads} reads", err=True)
        return result

    for_each_image(images, as_json, SCHEMA, work, render_inspection, path_document)
