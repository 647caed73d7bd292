"""The per-image loop every command that takes IMAGE... shares: one document per image, the first error's code."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import typer

from vhdtool.errors import VhdtoolError


def fail_line(message: str) -> None:
    typer.echo(f"vhdtool: {message}", err=True)


def for_each_image(
    images: Sequence[Path],
    as_json: bool,
    schema: int,
    work: Callable[[Path], Any],
    render: Callable[[Any], str],
    error_image: Callable[[Path], Any],
) -> None:
    """Run ``work`` on each image; print one document each (a list for several); exit with the first error's code.

    ``work(image)`` returns a value with ``to_dict()``; ``render(value)`` is its text;
    a failed image's JSON document is ``{"schema": schema, "image": error_image(image),
    "error": {code, message}}``, so that it carries the schema of the command's documents.
    """
    docs = []
    code = 0
    for i, image in enumerate(images):
        try:
            result = work(image)
        except VhdtoolError as e:
            fail_line(e.message)
            code = code or e.exit_code
            error = {"code": e.exit_code, "message": e.message}
            docs.append({"schema": schema, "image": error_image(image), "error": error})
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


def path_document(image: Path) -> dict:
    return {"path": os.fspath(image)}
