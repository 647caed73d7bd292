"""The clusters an NTFS volume's on-disk $Bitmap marks free: what nothing of the old volume reads.

The container writers may put new data there before their log (the overlay's
"unreachable" ranges), and the libntfs-3g device records a copied file's bytes
as source ranges only there (vhdtool.filesystem.ntfsdevice).
"""

from __future__ import annotations

from vhdtool.container.overlay import Overlay
from vhdtool.filesystem.freebits import FreeBits


def free_clusters(overlay: Overlay, start: int, size: int, label: str) -> FreeBits:
    """The clusters the volume's on-disk (old) $Bitmap marks free: nothing of the old volume reads them."""
    from dissect.util.stream import RangeStream

    from vhdtool.filesystem.ntfs import NtfsFilesystem

    fs = NtfsFilesystem(RangeStream(overlay.base, start, size, align=4096), label, "the volume")
    return FreeBits(fs.read("/$Bitmap", size // 8 + 4096), fs.cluster_size())
