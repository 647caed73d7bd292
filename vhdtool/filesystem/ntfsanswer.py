"""The libntfs-3g child's source ranges, and the parent's checks of them.

Beside its changed sectors (vhdtool.filesystem.answer), the child's answer head
holds the source ranges ``[disk offset, length, source index, offset in the
source]`` of copied files; each must lie inside the partition and its source
(``answer.decode_sources``, shared with the libext2fs child).
"""

from __future__ import annotations

from vhdtool.container.overlay import Extent
from vhdtool.container.source import Source
from vhdtool.filesystem.answer import decode_sources as _decode


def decode_sources(ranges, sources: list[Source], start: int, end: int, sector: int, label: str) -> list[Extent]:
    """The child's source ranges, checked: inside the partition and the source, whole sectors but at the disk's end."""
    return _decode(ranges, sources, lambda at, n: start <= at and at + n <= end, sector, label, "libntfs-3g")
