"""The operations an edit asks of an ext2/3/4 volume, as data: what vhdtool.filesystem.ext2fs runs in its child."""

from __future__ import annotations

from dataclasses import dataclass

from vhdtool.container.source import Source


@dataclass(frozen=True)
class WriteFile:
    """Put ``data`` at ``path`` (absolute, '/'-separated), creating or replacing the file, with this mode and owner.
    Missing folders above it are made (root's, 0755). ``data`` is bytes, or a Source (a local file) whose bytes
    stay in their file (vhdtool.filesystem.ext2stream)."""

    path: str
    data: bytes | Source
    mode: int = 0o644
    uid: int = 0
    gid: int = 0

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class MakeDir:
    """Create the folder ``path`` and any missing parents (root's, 0755); an existing folder is left as it is."""

    path: str


@dataclass(frozen=True)
class Symlink:
    """Make ``path`` a symbolic link to ``target`` (root's, 0777, as systemctl makes them), replacing a link there."""

    path: str
    target: str


@dataclass(frozen=True)
class Unlink:
    """Remove the file or symbolic link ``path`` (never a folder); a missing path is no change."""

    path: str


@dataclass(frozen=True)
class RemoveDir:
    """Remove the empty folder ``path`` (as ``systemctl disable`` removes a .wants folder it emptied); a missing
    path is no change, a folder that still holds anything is a refusal."""

    path: str
