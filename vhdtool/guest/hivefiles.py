"""The files of one registry hive in a Windows config folder: the primary and its transaction logs, read whole.

Windows 8.1 / Server 2012 R2 and later keep two logs, NAME.LOG1 and NAME.LOG2;
NT 6.0 and older keep one, NAME.LOG (regf spec, "Transaction log files"). Both
the read path (guest/windows.py) and the write path (editor/session.py) bring a
dirty hive up to date from these files with registry/logreplay.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from vhdtool.errors import CorruptHive
from vhdtool.filesystem.base import Filesystem
from vhdtool.units import MiB

# Sizes come from NTFS and are hostile. No real hive comes near this (the largest
# SOFTWARE hives of long-serviced servers are a few hundred MiB, SYSTEM hives tens),
# and libhivex's sandboxed child could not edit one this large anyway: it must hold
# the hive and an answer up to twice its size in CHILD_MEMORY (native/sandbox.py).
MAX_HIVE_FILE = 512 * MiB


@dataclass(frozen=True)
class HiveFiles:
    """A hive's primary and its logs as stored; ``log_names`` say which file each log came from."""

    primary: bytes
    log1: bytes | None
    log2: bytes | None
    log_names: tuple[str | None, str | None]  # ("LOG1", "LOG2"), or ("LOG", None) for the single old log

    def log_name(self, replay_name: str) -> str:
        """The file behind the name replay gives a log ("LOG1" is the single .LOG when that is what there is)."""
        index = {"LOG1": 0, "LOG2": 1}.get(replay_name)
        named = self.log_names[index] if index is not None else None
        return named or replay_name


def log_files(fs: Filesystem, path: str) -> tuple[str, ...]:
    """The extensions of the logs beside the primary at ``path`` that exist (LOG, LOG1, LOG2)."""
    return tuple(ext for ext in ("LOG", "LOG1", "LOG2") if fs.exists(f"{path}.{ext}"))


def read_hive_files(fs: Filesystem, path: str, name: str,
                    image_path: str | os.PathLike | None = None) -> HiveFiles:
    """The primary at ``path`` and its LOG1/LOG2, or the single .LOG when neither exists.

    Raises CorruptHive, before any file is read, when one is larger than MAX_HIVE_FILE.
    """
    present = log_files(fs, path)
    if "LOG1" in present or "LOG2" in present:
        names: tuple[str | None, str | None] = ("LOG1" if "LOG1" in present else None,
                                                "LOG2" if "LOG2" in present else None)
    else:
        names = ("LOG" if "LOG" in present else None, None)
    files = {name: path, **{f"{name}.{ext}": f"{path}.{ext}" for ext in names if ext}}
    sizes = {shown: fs.size(file) for shown, file in files.items()}
    for shown, size in sizes.items():
        if size > MAX_HIVE_FILE:
            raise CorruptHive(image_path, f"{shown} is {size} bytes, more than vhdtool reads of a hive file "
                                          f"({MAX_HIVE_FILE} bytes)")
    data = {shown: fs.read(files[shown], size) for shown, size in sizes.items()}
    logs = [data[f"{name}.{ext}"] if ext else None for ext in names]
    return HiveFiles(data[name], logs[0], logs[1], names)
