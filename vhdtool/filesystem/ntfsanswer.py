"""The libntfs-3g child's source ranges, and the parent's checks of them.

Beside its changed sectors (vhdtool.filesystem.answer), the child's answer head
holds the source ranges ``[disk offset, length, source index, offset in the
source]`` of copied files; each must lie inside the partition and its source.
"""

from __future__ import annotations

from vhdtool.container.overlay import Extent
from vhdtool.container.source import Source, SourceRange
from vhdtool.errors import CorruptFilesystem


def decode_sources(ranges, sources: list[Source], start: int, end: int, sector: int, label: str) -> list[Extent]:
    """The child's source ranges, checked: inside the partition and the source, whole sectors but at the disk's end."""
    out = []
    if not isinstance(ranges, list):
        raise CorruptFilesystem(label, "the libntfs-3g child sent a malformed answer")
    for item in ranges:
        if not (isinstance(item, list) and len(item) == 4 and all(type(x) is int and x >= 0 for x in item)):
            raise CorruptFilesystem(label, "the libntfs-3g child sent a malformed answer")
        offset, length, index, at = item
        if index >= len(sources) or at + length > sources[index].size or length == 0:
            raise CorruptFilesystem(label, "the libntfs-3g child named bytes its source does not have")
        if offset < start or offset + length > end or offset % sector:
            raise CorruptFilesystem(label, "the libntfs-3g child wrote outside the volume it was given")
        out.append(Extent(offset, SourceRange(sources[index], at, length)))
    return out
