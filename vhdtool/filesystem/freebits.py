"""The units a bitmap marks free (a clear bit), as runs: NTFS's $Bitmap clusters, an ext group's blocks.

Bit n is bit n % 8 of byte n // 8 (least significant first), as both filesystems number them.
"""

from __future__ import annotations

import re

_NOT_FULL = re.compile(rb"[^\xff]+")  # bitmap bytes with at least one free unit


class FreeBits:
    """The units of ``unit`` bytes whose bit ``bitmap`` leaves clear; units past its end are never free."""

    def __init__(self, bitmap: bytes, unit: int):
        self.bitmap = bitmap
        self.unit = unit

    def free(self, n: int) -> bool:
        byte = n // 8
        # Units past the bitmap's end do not exist: never free.
        return byte < len(self.bitmap) and not self.bitmap[byte] >> (n % 8) & 1

    def runs(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """Byte ranges inside [lo, hi) that lie wholly in free units.

        Whole bitmap bytes of zeros (eight free units) are found with a regular
        expression, so a large free area costs one pass in C; only the bytes that mix
        free and used units are looked at bit by bit."""
        c = self.unit
        first, last = -(-lo // c), hi // c
        if first >= last:
            return []
        out: list[list[int]] = []

        def add(a: int, b: int) -> None:
            if out and out[-1][1] == a:
                out[-1][1] = b
            else:
                out.append([a, b])

        n = first
        while n < last and n % 8:  # the bits before the first whole byte
            if self.free(n):
                add(n, n + 1)
            n += 1
        whole_end = min(last // 8, len(self.bitmap))
        if n < last and n // 8 < whole_end:
            base = n // 8
            for m in _NOT_FULL.finditer(self.bitmap, base, whole_end):
                if m.group().count(0) == len(m.group()):
                    add(m.start() * 8, m.end() * 8)
                    continue
                for k in range(m.start() * 8, m.end() * 8):
                    if self.free(k):
                        add(k, k + 1)
            n = whole_end * 8
        while n < last:  # the bits after the last whole byte (and past the bitmap: never free)
            if self.free(n):
                add(n, n + 1)
            n += 1
        return [(a * c, b * c) for a, b in out]
