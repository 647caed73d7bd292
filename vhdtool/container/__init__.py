"""Container layer: VHDX (own reader) and VHD (libvhdi) as one seekable disk stream."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from vhdtool.container.chain import open_image
from vhdtool.container.stream import DiskStream

__all__ = ["DiskStream", "open_disk", "open_image"]


@contextlib.contextmanager
def open_disk(path: str | os.PathLike) -> Iterator[DiskStream]:
    """Open ``path`` read-only as its virtual disk; the file is never written."""
    disk = open_image(path)
    try:
        yield disk
    finally:
        disk.close()
