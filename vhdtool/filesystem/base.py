"""The interface every filesystem reader offers, and the error boundary around them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import BinaryIO

from vhdtool.errors import CorruptFilesystem, VhdtoolError, first_line

MAX_SMALL_FILE = 16 * 1024 * 1024


class Filesystem:
    """Paths are '/'-separated and absolute; lookups on NTFS are case-insensitive."""

    kind = ""
    label = ""  # e.g. "partition 2", used in messages

    def exists(self, path: str) -> bool:
        raise NotImplementedError

    def is_dir(self, path: str) -> bool:
        raise NotImplementedError

    def listdir(self, path: str) -> list[str]:
        raise NotImplementedError

    def open(self, path: str) -> BinaryIO:
        raise NotImplementedError

    def size(self, path: str) -> int:
        raise NotImplementedError

    def read(self, path: str, limit: int = MAX_SMALL_FILE) -> bytes:
        """The first ``limit`` bytes of a file (a hostile file may claim any size)."""
        fh = self.open(path)
        return fh.read(min(limit, self.size(path)))


@contextlib.contextmanager
def translate_errors(image_path: str | None, what: str) -> Iterator[None]:
    """Turn any failure of a third-party parser into a one-line CorruptFilesystem."""
    try:
        yield
    except VhdtoolError:
        raise
    except (MemoryError, RecursionError) as e:
        raise CorruptFilesystem(image_path, f"{what}: structures too large or cyclic ({type(e).__name__})") from None
    except Exception as e:  # noqa: BLE001 - dissect parsers raise anything on damaged data
        raise CorruptFilesystem(image_path, f"{what}: {first_line(e)}") from None
