"""The clusters an NTFS volume's on-disk $Bitmap marks free: what nothing of the old volume reads.

The container writers may put new data there before their log (the overlay's
"unreachable" ranges), and the libntfs-3g device records a copied file's bytes
as source ranges only there (vhdtool.filesystem.ntfsdevice).
"""

from __future__ import annotations

import re

from vhdtool.container.overlay import Overlay

_NOT_FULL = re.compile(rb"[^\xff]+")  # bitmap bytes with at least one free cluster


class FreeClusters:
    """The clusters the volume's on-disk (old) $Bitmap marks free: nothing of the old volume reads them."""

    def __init__(self, bitmap: bytes, cluster: int):
        self.bitmap = bitmap
        self.cluster = cluster

    def free(self, n: int) -> bool:
        byte = n // 8
        # Clusters past the bitmap's end do not exist: never free.
        return byte < len(self.bitmap) and not self.bitmap[byte] >> (n % 8) & 1

    def runs(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """Byte ranges inside [lo, hi) of the volume that lie wholly in free clusters.

        Whole bitmap bytes of zeros (eight free clusters) are found with a regular
        expression, so a large free area costs one pass in C; only the bytes that mix
        free and used clusters are looked at bit by bit."""
        c = self.cluster
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



def free_clusters(overlay: Overlay, start: int, size: int, label: str) -> FreeClusters:
    from dissect.util.stream import RangeStream

    from vhdtool.filesystem.ntfs import NtfsFilesystem

    fs = NtfsFilesystem(RangeStream(overlay.base, start, size, align=4096), label, "the volume")
    return FreeClusters(fs.read("/$Bitmap", size // 8 + 4096), fs.cluster_size())
