"""Sector bitmaps of differencing disks: which sectors a child holds and which its parent does.

VHDX (MS-VHDX 2.4) numbers bits from the least significant bit of each byte; VHD
(VHD spec, "Block Bitmap") from the most significant. Both readers split a read
into runs of sectors whose bit is the same, and read each run from one place.
"""

from __future__ import annotations

from collections.abc import Iterator


def present_runs(
    bitmap: bytes, first_byte: int, start: int, end: int, sector_size: int, msb_first: bool
) -> Iterator[tuple[int, int, bool]]:
    """(lo, hi, present) for the byte range [start, end) of the area the bitmap covers.

    Bit k describes bytes [k * sector_size, (k + 1) * sector_size); ``bitmap`` holds
    the bitmap's bytes from byte ``first_byte`` on.
    """

    def bit(s: int) -> int:
        byte = bitmap[s // 8 - first_byte]
        return byte >> (7 - s % 8) & 1 if msb_first else byte >> (s % 8) & 1

    pos = start
    while pos < end:
        s = pos // sector_size
        present = bit(s)
        run_end = min(end, (s + 1) * sector_size)
        while run_end < end and bit(run_end // sector_size) == present:
            run_end = min(end, run_end + sector_size)
        yield pos, run_end, bool(present)
        pos = run_end


def bitmap_span(start: int, end: int, sector_size: int) -> tuple[int, int]:
    """(first byte, length) of the bitmap bytes that describe the byte range [start, end)."""
    first = start // sector_size // 8
    last = (end - 1) // sector_size // 8
    return first, last - first + 1
