"""The VHDX block allocation table (MS-VHDX 2.5): its geometry and its entries.

Payload entries and sector bitmap entries are interleaved (2.5): after every
``chunk_ratio`` payload entries comes the entry of the sector bitmap block that
covers them. The table is read one 4 KiB page at a time on first use, so what an
open costs does not grow with the disk.
"""

from __future__ import annotations

from dataclasses import dataclass

from vhdtool.container.imagefile import ImageFile, PagedTable
from vhdtool.container.vhdx.structs import BAT_ENTRY, SECTORS_PER_BITMAP_BLOCK
from vhdtool.units import MiB

STATE_MASK = 0x7  # 2.5.1: State is bits 0-2
FILE_OFFSET_SHIFT = 20  # FileOffsetMB is bits 20-63


@dataclass(frozen=True)
class BatGeometry:
    block_size: int
    chunk_ratio: int  # payload blocks per chunk (2.4)
    data_blocks: int  # payload blocks the virtual disk needs
    entries: int  # entries the BAT region must hold

    @classmethod
    def of(cls, size: int, block_size: int, logical_sector_size: int, has_parent: bool) -> BatGeometry:
        # 2.4: a chunk is 2^23 logical sectors.
        chunk_ratio = (SECTORS_PER_BITMAP_BLOCK * logical_sector_size) // block_size
        data_blocks = -(-size // block_size)
        if has_parent:
            # A differencing disk has a sector bitmap entry for every chunk, the last one too.
            entries = -(-data_blocks // chunk_ratio) * (chunk_ratio + 1)
        else:
            entries = data_blocks + (data_blocks - 1) // chunk_ratio
        return cls(block_size, chunk_ratio, data_blocks, entries)

    def payload_index(self, block: int) -> int:
        return block + block // self.chunk_ratio

    def bitmap_index(self, chunk: int) -> int:
        return chunk * (self.chunk_ratio + 1) + self.chunk_ratio


def decode_entry(raw: int) -> tuple[int, int]:
    """(state, file offset in bytes) of one 64-bit BAT entry."""
    return raw & STATE_MASK, (raw >> FILE_OFFSET_SHIFT) * MiB


def encode_entry(state: int, file_offset: int) -> int:
    """The 64-bit BAT entry for ``state`` at ``file_offset`` (a multiple of 1 MiB)."""
    if file_offset % MiB or file_offset < 0:
        raise ValueError(f"BAT entries point at whole MiB, not at {file_offset}")
    return (file_offset // MiB) << FILE_OFFSET_SHIFT | state


class Bat:
    def __init__(self, image: ImageFile, offset: int, geometry: BatGeometry):
        self.geometry = geometry
        self._table = PagedTable(image, offset, geometry.entries, BAT_ENTRY, "BAT")

    def __getitem__(self, index: int) -> tuple[int, int]:
        return decode_entry(self._table[index])
