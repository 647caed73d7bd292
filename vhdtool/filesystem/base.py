"""The interface every filesystem reader offers, and the error boundary around them."""

from __future__ import annotations

import contextlib
from typing import BinaryIO

from vhdtool.errors import CorruptFilesystem, translating
from vhdtool.units import MiB

MAX_SMALL_FILE = 16 * MiB


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

    def readlink(self, path: str) -> str | None:
        """The target of the symlink at ``path``, not followed; None when it is not a symlink."""
        raise NotImplementedError

    def resolve(self, path: str) -> str | None:
        """``path`` with its symlinks resolved inside the volume; None when it does not exist."""
        raise NotImplementedError

    def open(self, path: str) -> BinaryIO:
        raise NotImplementedError

    def size(self, path: str) -> int:
        raise NotImplementedError

    def read(self, path: str, limit: int = MAX_SMALL_FILE) -> bytes:
        """The first ``limit`` bytes of a file (a hostile file may claim any size)."""
        raise NotImplementedError


def translate_errors(image_path: str | None, what: str) -> contextlib.AbstractContextManager[None]:
    """Any failure of a filesystem library inside the block becomes a one-line CorruptFilesystem."""
    return translating(CorruptFilesystem, image_path, what)
