"""The hive reader: keys and values of one regf hive file, with its dirty state, in time linear in its size.

A hive is dirty when its base block's primary and secondary sequence numbers
differ: a write was in flight and the .LOG1/.LOG2 files hold changes the primary
file does not. Values read from a dirty primary may be stale; writes must never
touch one before its logs are replayed (logreplay.py).

Keys are found by walking the key tree ourselves (keys.py, on bounded cell
access in cells.py) rather than through dissect.regf's ``open``, which rescans
every repeated list entry and recurses through index roots without limit, so
that a hostile hive costs at most a budget proportional to its size; names and
values are decoded in records.py as dissect.regf decodes them, in linear time.
Whatever breaks the format's rules or the budget is
``CorruptHive``, "<NAME> hive is damaged at <path> (<why>)".
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import BinaryIO

from dissect.util.ts import wintimestamp

from vhdtool.errors import CorruptHive, translating
from vhdtool.registry.cells import Damage, HiveCells
from vhdtool.registry.keys import KeyTree
from vhdtool.registry.hivefile import BASE_BLOCK, base_block_checksum
from vhdtool.registry.records import DATA_INLINE, KeyNode, decode_value

HIVE_SIGNATURE = b"regf"


@dataclass(frozen=True)
class Key:
    """A key found by ``Hive.key``: its name as stored, its path as asked, its cell."""

    name: str
    path: str
    cell: int
    last_written: int

    @property
    def timestamp(self) -> datetime:
        return wintimestamp(self.last_written)


@dataclass(frozen=True)
class StoredValue:
    """A value as its record stores it: folded name, whether it is the default value, size field, type, raw data."""

    folded: str
    default: bool
    size: int  # the data size field without its inline flag
    type: int
    data: bytes


class Hive:
    """One hive file; paths use backslashes and are case-insensitive."""

    def __init__(self, stream: BinaryIO, name: str, image_path: str | os.PathLike | None = None):
        self.name = name
        self.image_path = image_path
        stream.seek(0)
        base = stream.read(BASE_BLOCK)
        if len(base) < BASE_BLOCK or base[:4] != HIVE_SIGNATURE:
            raise CorruptHive(image_path, f"{name} hive has no 'regf' signature")
        seq1, seq2 = struct.unpack_from("<II", base, 4)
        (stored,) = struct.unpack_from("<I", base, 508)
        (minor,) = struct.unpack_from("<I", base, 24)
        (root,) = struct.unpack_from("<I", base, 36)
        self.sequence = (seq1, seq2)
        self.dirty = seq1 != seq2
        self.checksum_ok = base_block_checksum(base) == stored
        # The file's own size bounds every cell; the base block's length field is not trusted.
        size = stream.seek(0, os.SEEK_END)
        self._cells = HiveCells(stream, max(0, size - BASE_BLOCK))
        self._tree = KeyTree(self._cells, big_data=minor > 4)
        with self._reading("the root key"):
            self._root = self._tree.node(root)

    # -- work done, for tests and benchmarks -------------------------------------------
    @property
    def cells_visited(self) -> int:
        """Cells read from the file so far (each at most once, whatever the lookups)."""
        return self._cells.cells_visited

    @property
    def entries_followed(self) -> int:
        return self._cells.entries_followed

    @property
    def work(self) -> int:
        """Units spent of ``budget``: cells read, list entries followed, 4 KiB pages read beyond a cell's head."""
        return self._cells.work

    @property
    def budget(self) -> int:
        return self._cells.budget

    # -- lookups ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _reading(self, where: str) -> Iterator[None]:
        """The one place this layer turns failures into CorruptHive."""
        what = f"{self.name} hive is damaged at {where}"
        with translating(CorruptHive, self.image_path, what):
            try:
                yield
            except Damage as e:
                raise CorruptHive(self.image_path, f"{what} ({e})") from None

    def _open(self, path: str) -> tuple[KeyNode, set[int]] | None:
        """The key at ``path`` and the cells of it and its ancestors, or None."""
        path = path.strip("\\")
        node = self._root
        lineage = {node.offset}
        for part in path.split("\\") if path else []:
            node = self._tree.child(node, part)
            if node is None:
                return None
            _not_an_ancestor(node, lineage)
            lineage.add(node.offset)
        return node, lineage

    def key(self, path: str) -> Key | None:
        """The key at ``path`` or None."""
        with self._reading(path):
            found = self._open(path)
            if found is None:
                return None
            node, _ = found
            return Key(node.name, path, node.offset, node.last_written)

    def value(self, path: str, name: str, default=None):
        """Value ``name`` of key ``path``, or ``default`` when either is missing."""
        with self._reading(f"{path}\\{name}"):
            found = self._open(path)
            if found is None:
                return default
            vk = self._tree.value_key(found[0], name)
            if vk is None:
                return default
            return decode_value(vk.type, self._tree.value_data(vk))

    def values(self, path: str) -> dict:
        with self._reading(path):
            found = self._open(path)
            if found is None:
                return {}
            tree = self._tree
            return {vk.name: decode_value(vk.type, tree.value_data(vk)) for vk in tree.value_keys(found[0])}

    def subkey_names(self, path: str) -> list[str]:
        with self._reading(path):
            found = self._open(path)
            if found is None:
                return []
            node, lineage = found
            names = []
            for sub in self._tree.children(node):
                _not_an_ancestor(sub, lineage)
                names.append(sub.name)
            return names

    def stored_values(self, path: str, every: bool = False) -> list[StoredValue]:
        """The values of key ``path`` as their records store them, the first of each name only (the one
        lookups find; ``every``: all records, a repeated name too), in list order; none when the key is missing.

        For the write path, which compares raw data and must tell the default value
        (a name of length 0) from a value named "(Default)"."""
        with self._reading(path):
            found = self._open(path)
            if found is None:
                return []
            tree = self._tree
            stored, seen = [], set()
            for vk in tree.value_keys(found[0]):
                (name_length,) = struct.unpack_from("<H", self._cells.cell(vk.offset).read(4), 2)
                name = (name_length == 0, vk.folded)
                if every or name not in seen:
                    seen.add(name)
                    stored.append(StoredValue(vk.folded, name_length == 0, vk.data_length & ~DATA_INLINE,
                                              vk.type, tree.value_data(vk)))
            return stored


def _not_an_ancestor(node: KeyNode, lineage: set[int]) -> None:
    """A key listed under itself or its own subkey makes the tree infinitely deep: damage."""
    if node.offset in lineage:
        raise Damage(f"key cell {node.offset:#x} ({node.name!r}) is listed as a subkey of itself or of its own subkey")
