"""ext2/3/4 (dissect.extfs) and XFS (dissect.xfs), with symlinks resolved inside the volume."""

from __future__ import annotations

import stat
import unicodedata
from dataclasses import dataclass
from typing import BinaryIO

from vhdtool.errors import UnsupportedLayout, first_line
from vhdtool.filesystem.base import MAX_SMALL_FILE, Filesystem, translate_errors

MAX_SYMLINKS = 40
MAX_LINK = 4096
COMPAT_HAS_JOURNAL = 0x4  # ext4 disk layout, "The Super Block"
CASEFOLD_FL = 0x40000000  # EXT4_CASEFOLD_FL: a folder whose names compare without case


@dataclass(frozen=True)
class Entry:
    """What a path names, its last symlink not followed: kind ("file", "dir", "link", "other") and inode fields."""

    kind: str
    mode: int  # permission bits
    uid: int
    gid: int
    size: int
    link: str | None  # a symlink's target text
    flags: int = 0  # the inode's i_flags (ext4 disk layout, "Inode flags")


class LinuxFilesystem(Filesystem):
    def __init__(self, fs, kind: str, image_path: str | None, label: str):
        self.fs = fs
        self.kind = kind
        self.image_path = image_path
        self.label = label

    def _lookup(self, path: str, follow: bool = True):
        """The inode at ``path``, resolving symlinks relative to this volume's root."""
        return self._walk(path, follow)[0]

    def _walk(self, path: str, follow: bool = True):
        """(inode, its path with every symlink resolved inside this volume) for ``path``."""
        parts = [p for p in path.split("/") if p]
        node = self.fs.get("/")
        links = 0
        done: list[str] = []
        while parts:
            name = parts.pop(0)
            if name == ".":
                continue
            if name == "..":
                done = done[:-1]
                node = self.fs.get("/" + "/".join(done))
                continue
            children = node.listdir()
            if name not in children:
                raise FileNotFoundError(path)
            child = children[name]
            if stat.S_ISLNK(child.filetype) and (parts or follow):
                links += 1
                if links > MAX_SYMLINKS:
                    raise FileNotFoundError(f"too many symlinks: {path}")
                target = child.link
                if target.startswith("/"):
                    done = []
                    node = self.fs.get("/")
                parts = [p for p in target.split("/") if p] + parts
                continue
            done.append(name)
            node = child
        return node, "/" + "/".join(done)

    def _try(self, path: str):
        try:
            return self._lookup(path)
        except (FileNotFoundError, NotADirectoryError, KeyError):
            return None

    def entry(self, path: str) -> Entry | None:
        """The entry ``path`` names without following a symlink at its end; None when there is none (ext only)."""
        with translate_errors(self.image_path, f"{self.kind} on {self.label}: {path}"):
            try:
                node = self._lookup(path, follow=False)
            except (FileNotFoundError, NotADirectoryError, KeyError):
                return None
            raw = node.inode
            kind = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "link"}.get(node.filetype, "other")
            link = None
            if kind == "link" and node.size <= MAX_LINK:
                link = node.link
            return Entry(kind, stat.S_IMODE(raw.i_mode), raw.i_uid | raw.i_uid_high << 16,
                         raw.i_gid | raw.i_gid_high << 16, node.size, link, raw.i_flags)

    def journal_start(self) -> int:
        """The ext3/4 internal journal's s_start: 0 when it holds nothing to replay (also with no journal,
        or one on another device, which this volume cannot show)."""
        if self.kind == "xfs" or not self.fs.sb.s_feature_compat & COMPAT_HAS_JOURNAL \
                or not self.fs.sb.s_journal_inum:
            return 0
        with translate_errors(self.image_path, f"{self.kind} on {self.label}: the journal"):
            return self.fs.journal.sb.s_start

    def exists(self, path: str) -> bool:
        with translate_errors(self.image_path, f"{self.kind} on {self.label}: {path}"):
            return self._try(path) is not None

    def is_dir(self, path: str) -> bool:
        with translate_errors(self.image_path, f"{self.kind} on {self.label}: {path}"):
            node = self._try(path)
            return node is not None and stat.S_ISDIR(node.filetype)

    def listdir(self, path: str) -> list[str]:
        with translate_errors(self.image_path, f"{self.kind} on {self.label}: {path}"):
            node = self._lookup(path)
            return sorted(n for n in node.listdir() if n not in (".", ".."))

    def case_twin(self, folder: str, name: str) -> str | None:
        """Another name in ``folder`` that is ``name`` to a case-insensitive (casefold) ext4 folder, which the
        guest's kernel takes for the same entry; None when there is none, or the folder is not one (or missing)."""
        with translate_errors(self.image_path, f"{self.kind} on {self.label}: {folder}"):
            node = self._try(folder)
            if node is None or not stat.S_ISDIR(node.filetype) or not node.inode.i_flags & CASEFOLD_FL:
                return None
            want = _folded(name)
            return next((n for n in node.listdir() if n != name and _folded(n) == want), None)

    def readlink(self, path: str) -> str | None:
        """The target stored in the symlink at ``path`` (its last component is not followed).

        None when ``path`` is not a symlink or does not exist. The target is returned as stored:
        an absolute one names a path inside this volume, a relative one is relative to the link's
        folder (``resolve`` follows either inside the volume).
        """
        with translate_errors(self.image_path, f"{self.kind} on {self.label}: {path}"):
            try:
                node = self._lookup(path, follow=False)
            except (FileNotFoundError, NotADirectoryError, KeyError):
                return None
            return node.link if stat.S_ISLNK(node.filetype) else None

    def resolve(self, path: str) -> str | None:
        """``path`` with every symlink resolved inside this volume (never the host's); None if it does not exist."""
        with translate_errors(self.image_path, f"{self.kind} on {self.label}: {path}"):
            try:
                return self._walk(path)[1]
            except (FileNotFoundError, NotADirectoryError, KeyError):
                return None

    def open(self, path: str) -> BinaryIO:
        with translate_errors(self.image_path, f"{self.kind} on {self.label}: {path}"):
            return self._lookup(path).open()

    def size(self, path: str) -> int:
        with translate_errors(self.image_path, f"{self.kind} on {self.label}: {path}"):
            return self._lookup(path).size

    def read(self, path: str, limit: int = MAX_SMALL_FILE) -> bytes:
        with translate_errors(self.image_path, f"{self.kind} on {self.label}: {path}"):
            node = self._lookup(path)
            return node.open().read(min(limit, node.size))


def _folded(name: str) -> str:
    """A name as a casefold folder compares it: Unicode NFD, case folded (the kernel's utf8 "nfdicf")."""
    return unicodedata.normalize("NFD", unicodedata.normalize("NFD", name).casefold())


def open_linux_filesystem(stream: BinaryIO, kind: str, image_path: str | None, label: str) -> LinuxFilesystem:
    with translate_errors(image_path, f"{kind} on {label}"):
        try:
            if kind == "xfs":
                from dissect.xfs import XFS

                fs = XFS(stream)
            else:
                from dissect.extfs import ExtFS

                fs = ExtFS(stream)
        except NotImplementedError as e:
            # A sound volume in a layout the reader does not know (ext4 bigalloc), not a damaged one.
            raise UnsupportedLayout(image_path, f"{kind} on {label} uses a layout vhdtool cannot read ({first_line(e)})",
                                    "change the guest from inside it") from None
    return LinuxFilesystem(fs, kind, image_path, label)
