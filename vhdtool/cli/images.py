"""The per-image loop every command over images shares: one document per image, the first error's code."""

from __future__ import annotations

import gc
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
    note: Callable[[Path, Any], str | None] | None = None,
) -> None:
    """Run ``work`` on each image; print one document each (a list for several); exit with the first error's code.

    ``work(image)`` returns a document (a dict) or a value with ``to_dict()``; ``render(value)``
    is its text; ``note(image, value)``, when given, is a line for stderr after the image's
    document (None: nothing to say). A failed image's JSON document is ``{"schema": schema,
    "image": error_image(image), "error": {code, message}}``, so that it carries the schema
    of the command's documents.
    """
    docs = []
    notes = []
    code = 0
    for i, image in enumerate(images):
        if i:
            gc.collect()  # the previous image's garbage (main() runs with the collector off)
        try:
            result = work(image)
        except VhdtoolError as e:
            fail_line(e.message)
            code = code or e.exit_code
            error = {"code": e.exit_code, "message": e.message}
            docs.append({"schema": schema, "image": error_image(image), "error": error})
            continue
        line = note(image, result) if note else None
        if as_json:
            docs.append(result if isinstance(result, dict) else result.to_dict())
            notes.append(line)
        else:
            if i:
                typer.echo("")
            typer.echo(render(result))
            if line:
                fail_line(line)
    if as_json:
        out = docs[0] if len(images) == 1 else docs
        if len(images) > 1 or code == 0:
            typer.echo(json.dumps(out, indent=2))
        for line in filter(None, notes):
            fail_line(line)
    raise typer.Exit(code)


def path_document(image: Path) -> dict:
    return {"path": os.fspath(image)}
