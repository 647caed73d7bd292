"""Cell access to a regf hive, bounded by its size and by a work budget (regf spec, "Hive bins", "Cells").

A cell index is an offset from the first hive bin (file offset 4096). A cell
starts with a 32-bit size, negative while the cell is allocated; its payload
follows. Every index and size read from the hive is hostile: an index must fall
inside the file, a size must cover at least its own header and end inside the
file, and a reader never asks for more of a payload than the structure needs,
so a cell claiming 2 GiB costs what its record costs.

Every cell read and every list entry followed is one unit of work, and so is
every 4 KiB read beyond a cell's first few hundred bytes (long lists, value
data). Units add up over a ``HiveCells``' life (callers parse each cell once
and keep it), and ``Damage`` stops the reader once the budget is spent. A
well-formed hive costs at most about one unit per 12 bytes even when read in
full (a value is a 4-byte list entry, a vk cell of at least 24 bytes and maybe
a data cell; a key an 8-byte list entry and an nk cell of at least 80; the real
Windows 10 SYSTEM hive costs one per 35), so a hive that needs more repeats
structures to make its reader loop.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

HBIN_START = 4096
CELL_HEADER = 4
MIN_CELL = 8
PREFETCH = 256  # payload bytes read with the size field: a key or value record in one read
PAGE = 4096

# Units per byte of hive: a well-formed hive needs at most one per 12 bytes; this
# leaves room, and a small floor so that tiny hives still read.
BYTES_PER_UNIT = 8
MIN_BUDGET = 65_536
# However large the file: what one Hive may spend before the hive is called hostile.
# inspect spends about 2,000 units on a real Windows 10 SYSTEM hive and one per
# servicing package on SOFTWARE; reading every key and value of that 11 MiB SYSTEM
# hive costs 300,000. At 5-10 us a unit (cells read from NTFS inside a VHDX) the
# cap keeps the worst hive, even of 2 GiB, to seconds.
MAX_BUDGET = 1_000_000


class Damage(Exception):
    """A rule of the format the hive breaks; ``Hive`` names the path and raises CorruptHive."""


def work_budget(bins_size: int) -> int:
    return min(MAX_BUDGET, max(MIN_BUDGET, bins_size // BYTES_PER_UNIT))


class Cell:
    """One cell's payload, read lazily up to what the caller asks for."""

    __slots__ = ("offset", "capacity", "_data", "_cells")

    def __init__(self, cells: HiveCells, offset: int, capacity: int, head: bytes):
        self._cells = cells
        self.offset = offset
        self.capacity = capacity  # payload bytes the size field grants
        self._data = head

    def read(self, n: int) -> bytes:
        """The first ``n`` bytes of the payload; more than the cell holds is damage."""
        if n > self.capacity:
            raise Damage(f"cell {self.offset:#x} holds {self.capacity} bytes, its record needs {n}")
        have = len(self._data)
        if n > have:
            self._data += self._cells.read_at(HBIN_START + self.offset + CELL_HEADER + have, n - have)
        return self._data[:n]


class HiveCells:
    """The hive bins of one hive file, with the work done on them counted."""

    def __init__(self, stream: BinaryIO, bins_size: int, budget: int | None = None):
        self.stream = stream
        self.bins_size = bins_size
        self.budget = work_budget(bins_size) if budget is None else budget
        self.cells_visited = 0
        self.entries_followed = 0
        self.pages_read = 0

    @property
    def work(self) -> int:
        return self.cells_visited + self.entries_followed + self.pages_read

    def _spend(self) -> None:
        if self.work > self.budget:
            raise Damage(
                f"work budget spent: more than {self.budget} cells and list entries read "
                f"in hive bins of {self.bins_size} bytes"
            )

    def follow(self, entries: int) -> None:
        """Charge ``entries`` list entries about to be followed."""
        self.entries_followed += entries
        self._spend()

    def read_at(self, position: int, n: int) -> bytes:
        self.pages_read += n // PAGE
        self._spend()
        self.stream.seek(position)
        data = self.stream.read(n)
        if len(data) != n:
            raise Damage(f"hive file ends at {position + len(data)} inside a cell")
        return data

    def cell(self, offset: int) -> Cell:
        """The cell at index ``offset``, its size checked against the file."""
        self.cells_visited += 1
        self._spend()
        if offset + MIN_CELL > self.bins_size:
            raise Damage(f"cell index {offset:#x} is outside the hive bins ({self.bins_size} bytes)")
        if offset & 3:  # cells are 8-byte aligned; hivex refuses anything not 4-byte aligned, as here
            raise Damage(f"cell index {offset:#x} is not aligned")
        self.stream.seek(HBIN_START + offset)
        head = self.stream.read(CELL_HEADER + PREFETCH)
        if len(head) < CELL_HEADER:
            raise Damage(f"hive file ends inside cell {offset:#x}")
        (size,) = struct.unpack_from("<i", head)
        size = abs(size)  # free cells are read too (dirty hives may point at them), but bounded the same way
        if size < MIN_CELL or offset + size > self.bins_size:
            raise Damage(
                f"cell {offset:#x} claims {size} bytes, the hive bins hold {self.bins_size - offset} from there"
            )
        capacity = size - CELL_HEADER
        return Cell(self, offset, capacity, head[CELL_HEADER : CELL_HEADER + capacity])
