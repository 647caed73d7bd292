"""The blocks an ext2/3/4 volume's old state leaves free, read by the parent itself (ext4 disk layout, "Block Groups").

The libext2fs child lists the runs of a copied file's data that it put in blocks its copy of the
old bitmap calls free; a VHDX writer may put such data in place before its log. The parent trusts
none of that list: it keeps only the blocks this reading of the old volume (the disk before the
edit) also calls free.

Each group's free blocks are its block bitmap's clear bits. A group flagged BLOCK_UNINIT (honoured
only with gdt_csum or metadata_csum, as the kernel does) has no bitmap on disk: its blocks are free
but for metadata, which here is counted widely: the first blocks of the group (where a superblock
and group descriptor backup may be: 1 + descriptor blocks + reserved descriptor blocks, whether the
group has a backup or not) and every group's bitmaps and inode table (flex_bg puts them in other
groups). A meta_bg volume, or anything out of bounds, is read as "nothing free": the data then goes
through the VHDX log, which is always safe.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Callable

from vhdtool.container.overlay import Overlay
from vhdtool.filesystem.extsuper import SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE
from vhdtool.filesystem.freebits import FreeBits
from vhdtool.volume.mapping import VolumeMap

COMPAT_SPARSE_SUPER2 = 0x200
INCOMPAT_META_BG, INCOMPAT_64BIT = 0x10, 0x80
RO_COMPAT_GDT_CSUM, RO_COMPAT_METADATA_CSUM = 0x10, 0x400
BG_BLOCK_UNINIT = 0x2
MAX_GROUPS = 1 << 24


class OldFreeBlocks:
    """``read(offset, length)``: bytes of the volume as it was before the edit; ``sb``: its 1024-byte superblock."""

    def __init__(self, read: Callable[[int, int], bytes], sb: bytes):
        self.read = read
        self.block_size = 1024 << min(struct.unpack_from("<I", sb, 24)[0], 6)
        compat, incompat, ro_compat = struct.unpack_from("<III", sb, 0x5C)
        wide = bool(incompat & INCOMPAT_64BIT)
        self.count = struct.unpack_from("<I", sb, 4)[0] + ((struct.unpack_from("<I", sb, 0x150)[0] << 32) if wide else 0)
        self.first = struct.unpack_from("<I", sb, 20)[0]
        self.per_group = struct.unpack_from("<I", sb, 32)[0]
        self.desc_size = struct.unpack_from("<H", sb, 0xFE)[0] if wide else 32
        self.uninit_honoured = bool(ro_compat & (RO_COMPAT_GDT_CSUM | RO_COMPAT_METADATA_CSUM))
        inodes, inode_size = struct.unpack_from("<I", sb, 40)[0], struct.unpack_from("<H", sb, 88)[0] or 128
        self.table_blocks = -(-inodes * inode_size // self.block_size)
        self.groups = -(-(self.count - self.first) // self.per_group) if 0 < self.per_group <= self.block_size * 8 \
            else 0
        desc_blocks = -(-self.groups * self.desc_size // self.block_size)
        self.head = 1 + desc_blocks + struct.unpack_from("<H", sb, 0xCE)[0]  # blocks at a group's start kept out
        self.usable = (not incompat & INCOMPAT_META_BG and not compat & COMPAT_SPARSE_SUPER2 and
                       0 < self.groups <= MAX_GROUPS and self.desc_size in (32, 64, 128, 256, 512, 1024) and
                       self.first in (0, 1) and self.head < self.per_group)
        self._descs: list[tuple[int, int, int, int]] | None = None  # (block bitmap, inode bitmap, inode table, flags)
        self._metadata: list[tuple[int, int]] = []  # sorted [start, end) of every group's bitmaps and inode table

    def _load(self) -> None:
        raw = self.read((self.first + 1) * self.block_size, self.groups * self.desc_size)
        if len(raw) < self.groups * self.desc_size:
            self.usable = False
            return
        wide = self.desc_size >= 64
        descs = []
        for g in range(self.groups):
            at = g * self.desc_size
            block_bitmap, inode_bitmap, table = struct.unpack_from("<III", raw, at)
            if wide:
                hi = struct.unpack_from("<III", raw, at + 0x20)
                block_bitmap, inode_bitmap, table = (block_bitmap | hi[0] << 32, inode_bitmap | hi[1] << 32,
                                                     table | hi[2] << 32)
            descs.append((block_bitmap, inode_bitmap, table, struct.unpack_from("<H", raw, at + 0x12)[0]))
        self._descs = descs
        self._metadata = sorted([r for b, i, t, _f in descs for r in ((b, b + 1), (i, i + 1), (t, t + self.table_blocks))])

    def _meets_metadata(self, lo: int, hi: int) -> bool:
        """Whether [lo, hi) overlaps any group's bitmaps or inode table (none is longer than an inode table)."""
        j = bisect.bisect_left(self._metadata, (lo - self.table_blocks - 1, 0))
        i = bisect.bisect_left(self._metadata, (hi, 0))
        return any(b > lo for _a, b in self._metadata[j:i])

    def free_runs(self, block: int, count: int) -> list[tuple[int, int]]:
        """(first, count) of the blocks in [block, block + count) that the old volume does not use."""
        if not self.usable or block < self.first or count <= 0 or block + count > self.count:
            return []
        if self._descs is None:
            self._load()
            if not self.usable:
                return []
        out: list[list[int]] = []
        end = block + count
        while block < end:
            g = (block - self.first) // self.per_group
            start = self.first + g * self.per_group
            stop = min(end, start + self.per_group)
            for lo, hi in self._group_free(g, start, block, stop):
                if out and out[-1][0] + out[-1][1] == lo:
                    out[-1][1] += hi - lo
                else:
                    out.append([lo, hi - lo])
            block = stop
        return [(a, n) for a, n in out]

    def _group_free(self, g: int, start: int, lo: int, hi: int) -> list[tuple[int, int]]:
        block_bitmap, _inode_bitmap, _table, flags = self._descs[g]
        if self.uninit_honoured and flags & BG_BLOCK_UNINIT:
            lo = max(lo, start + self.head)
            if lo >= hi or self._meets_metadata(lo, hi):
                return []  # widely counted: a run touching any metadata is not taken as free
            return [(lo, hi)]
        if not self.first <= block_bitmap < self.count:
            return []
        bits = FreeBits(self.read(block_bitmap * self.block_size, self.block_size), 1)  # bit i: block start + i
        return [(start + a, start + b) for a, b in bits.runs(lo - start, hi - start)]


def old_free_ranges(overlay: Overlay, vmap: VolumeMap, block_size: int, claimed: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Disk ranges of the child's claimed free block runs that the parent's own reading of the old volume
    (the base disk) also calls free."""
    if not claimed:
        return []

    def read(offset: int, length: int) -> bytes:
        length = max(0, min(length, vmap.size - offset))
        return b"".join(overlay.base.read_at(disk, n) for disk, _at, n in vmap.pieces(offset, length))

    old = OldFreeBlocks(read, read(SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE))
    out = []
    for first, end in claimed:
        for block, count in old.free_runs(first, end - first):
            out += [(disk, disk + n) for disk, _at, n in vmap.pieces(block * block_size, count * block_size)]
    return out
