"""NTFS through dissect.ntfs, plus the volume-state checks a servicing tool needs.

State (NTFS 3.1): $Volume's $VOLUME_INFORMATION flags bit 0x0001 is the dirty bit;
$LogFile's restart area says whether the volume was shut down cleanly
(RESTART_VOLUME_IS_CLEAN, or no client in use). ``hiberfil.sys`` starting with
``hibr``/``HIBR`` (or ``rstr``/``RSTR`` while resuming) means the volume is part of a
hibernated system.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import BinaryIO

from dissect.ntfs import NTFS
from dissect.ntfs.c_ntfs import ATTRIBUTE_TYPE_CODE

from vhdtool.filesystem.base import MAX_SMALL_FILE, Filesystem, translate_errors

FILE_NUMBER_LOGFILE = 2
FILE_NUMBER_VOLUME = 3
FILE_NUMBER_UPCASE = 10
VOLUME_IS_DIRTY = 0x0001
RESTART_VOLUME_IS_CLEAN = 0x0002
LOGFILE_NO_CLIENT = 0xFFFF
HIBERNATED_SIGNATURES = {b"hibr", b"HIBR", b"rstr", b"RSTR"}


def _norm(path: str) -> str:
    return path.strip("/").replace("/", "\\")


class NtfsFilesystem(Filesystem):
    kind = "ntfs"

    def __init__(self, stream: BinaryIO, image_path: str | None = None, label: str = "", ntfs_names: bool = False):
        """``ntfs_names``: names are looked up as NTFS (libntfs-3g, Windows) finds them (``_child``), as an
        edit, which decides what libntfs-3g will do, must; else with dissect.ntfs's search, which is faster."""
        self.image_path = image_path
        self.label = label
        self.ntfs_names = ntfs_names
        self._upcase: tuple[int, ...] | None = None
        self._listed: dict[int, dict[tuple[int, ...], object]] = {}  # folder record -> its entries by _key
        with translate_errors(image_path, f"NTFS on {label}"):
            self.ntfs = NTFS(stream)
        # Folder path -> its MFT record. dissect.ntfs walks every lookup from the root, reading each
        # record and index on the way again; the volume does not change while this object reads it
        # (an edit's changes reach it only at the commit), so the folders above are kept.
        self._folders: dict[str, object] = {}

    def _get(self, path: str):
        norm = _norm(path)
        if not norm:
            return self._folder("")
        parent, _, name = norm.rpartition("\\")
        return self._child(self._folder(parent), name)

    def _child(self, node, name: str):
        """``name`` in the folder ``node``. dissect.ntfs's search compares str.upper(): it orders names beyond
        the BMP after U+E000-U+FFFF, where NTFS's index has them first, so it can miss a name; and it calls
        names equal that NTFS keeps apart (ß and SS). With ``ntfs_names``, a name is what equals it after the
        volume's $UpCase, unit by unit, as libntfs-3g and Windows compare; a miss reads the folder once."""
        if not self.ntfs_names:
            return self.ntfs.mft.get(name, root=node)
        if not node.is_dir():
            raise NotADirectoryError(f"{name}: not in a folder")
        key, index = self._key(name.encode("utf-16-le", "surrogatepass")), node.index("$I30")
        try:
            entry = index.search(name)
            if self._entry_key(entry) == key:
                return entry.dereference()
        except KeyError:
            pass
        listed = self._listed.get(node.segment)
        if listed is None:
            listed = self._listed[node.segment] = {}
            for entry in index.entries():
                listed.setdefault(self._entry_key(entry), entry)
        if key not in listed:
            raise FileNotFoundError(f"File not found: {name}")
        return listed[key].dereference()

    def _entry_key(self, entry) -> tuple[int, ...]:
        return self._key(entry.buf[66 : 66 + 2 * entry.buf[64]])  # $FILE_NAME: its length at 64, its name at 66

    def _key(self, utf16: bytes) -> tuple[int, ...]:
        if self._upcase is None:
            table = self.ntfs.mft.get(FILE_NUMBER_UPCASE).open().read(2 * 65536)
            self._upcase = struct.unpack(f"<{len(table) // 2}H", table[: len(table) // 2 * 2])
        up, n = self._upcase, len(self._upcase)
        return tuple(up[u] if u < n else u for u in struct.unpack(f"<{len(utf16) // 2}H", utf16[: len(utf16) // 2 * 2]))

    def _folder(self, norm: str):
        """The record at ``norm`` (a folder, or what a lookup below it then finds is none), looked up once."""
        node = self._folders.get(norm)
        if node is None:
            if norm:
                parent, _, name = norm.rpartition("\\")
                node = self._child(self._folder(parent), name)
            else:
                node = self.ntfs.mft.root
            self._folders[norm] = node
        return node

    def exists(self, path: str) -> bool:
        with translate_errors(self.image_path, f"NTFS on {self.label}: {path}"):
            try:
                self._get(path)
                return True
            except (FileNotFoundError, NotADirectoryError):
                return False

    def is_dir(self, path: str) -> bool:
        with translate_errors(self.image_path, f"NTFS on {self.label}: {path}"):
            try:
                return self._get(path).is_dir()
            except (FileNotFoundError, NotADirectoryError):
                return False

    def is_link(self, path: str) -> bool:
        """Whether ``path`` is a symbolic link or a junction (a mount point): Windows follows it, libntfs-3g not."""
        with translate_errors(self.image_path, f"NTFS on {self.label}: {path}"):
            try:
                record = self._get(path)
            except (FileNotFoundError, NotADirectoryError):
                return False
            return record.is_symlink() or record.is_mount_point()

    def listdir(self, path: str) -> list[str]:
        with translate_errors(self.image_path, f"NTFS on {self.label}: {path}"):
            return sorted(n for n in self._get(path).listdir(ignore_dos=True) if n not in (".", ".."))

    def open(self, path: str) -> BinaryIO:
        with translate_errors(self.image_path, f"NTFS on {self.label}: {path}"):
            return self._get(path).open()

    def size(self, path: str) -> int:
        with translate_errors(self.image_path, f"NTFS on {self.label}: {path}"):
            return self._get(path).size()

    def read(self, path: str, limit: int = MAX_SMALL_FILE) -> bytes:
        with translate_errors(self.image_path, f"NTFS on {self.label}: {path}"):
            record = self._get(path)
            return record.open().read(min(limit, record.size()))

    def chunks(self, path: str, chunk: int) -> Iterator[bytes]:
        """The content of the file ``path``, ``chunk`` bytes at a time."""
        with translate_errors(self.image_path, f"NTFS on {self.label}: {path}"):
            f = self._get(path).open()
            while True:
                data = f.read(chunk)
                if not data:
                    return
                yield data

    def free_clusters(self) -> int:
        """How many clusters the volume's $Bitmap marks free."""
        with translate_errors(self.image_path, f"NTFS on {self.label}: $Bitmap"):
            total = self.ntfs.boot_sector.NumberSectors * self.ntfs.sector_size // self.ntfs.cluster_size
            bitmap = self._get("/$Bitmap").open().read(-(-total // 8))
        used = int.from_bytes(bitmap, "little") & ((1 << total) - 1)
        return max(0, total - used.bit_count())

    def cluster_size(self) -> int:
        with translate_errors(self.image_path, f"NTFS on {self.label}: boot sector"):
            return self.ntfs.cluster_size

    # -- volume state ---------------------------------------------------------------
    def volume_dirty(self) -> bool:
        with translate_errors(self.image_path, f"NTFS on {self.label}: $Volume"):
            record = self.ntfs.mft.get(FILE_NUMBER_VOLUME)
            data = record.attributes[ATTRIBUTE_TYPE_CODE.VOLUME_INFORMATION].data()
            if len(data) < 12:
                return True
            (flags,) = struct.unpack_from("<H", data, 10)
            return bool(flags & VOLUME_IS_DIRTY)

    def logfile_clean(self) -> bool:
        """Whether $LogFile's restart area records a clean shutdown."""
        with translate_errors(self.image_path, f"NTFS on {self.label}: $LogFile"):
            record = self.ntfs.mft.get(FILE_NUMBER_LOGFILE)
            page = record.open().read(4096)
        magic = page[:4]
        if magic == b"\xff\xff\xff\xff" or page == bytes(len(page)):
            return True  # an empty (reset) log has nothing to replay
        if magic != b"RSTR" or len(page) < 48:
            return False  # "CHKD" or garbage: chkdsk has work to do
        (ra_off,) = struct.unpack_from("<H", page, 24)
        if ra_off + 16 > len(page):
            return False
        _lsn, _clients, _free, in_use, flags = struct.unpack_from("<QHHHH", page, ra_off)
        return in_use == LOGFILE_NO_CLIENT or bool(flags & RESTART_VOLUME_IS_CLEAN)

    def hibernation_signature(self) -> bytes | None:
        if not self.exists("/hiberfil.sys"):
            return None
        return self.read("/hiberfil.sys", 4)

    def hibernated(self) -> bool:
        return self.hibernation_signature() in HIBERNATED_SIGNATURES
