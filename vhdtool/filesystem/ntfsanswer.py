"""The libntfs-3g child's answer, and the parent's checks of it.

The answer is the changed sectors (offset, length, bytes each; every one inside
the partition and whole sectors) and, in the head, the source ranges
``[disk offset, length, source index, offset in the source]`` of copied files,
each inside the partition and inside its source.
"""

from __future__ import annotations

import struct

from vhdtool.container.overlay import Extent
from vhdtool.container.source import Source, SourceRange
from vhdtool.errors import CorruptFilesystem

EXTENT_HEAD = struct.Struct("<QQ")


def encode(extents: list[Extent]) -> bytes:
    return b"".join(EXTENT_HEAD.pack(e.offset, len(e.data)) + e.data for e in extents)


def decode(blob: bytes, start: int, end: int, sector: int, label: str) -> list[Extent]:
    """The child's extents, checked: inside the partition, whole sectors, the payload used exactly."""
    out, pos = [], 0
    while pos < len(blob):
        if pos + EXTENT_HEAD.size > len(blob):
            raise CorruptFilesystem(label, "the libntfs-3g child sent a malformed answer")
        offset, length = EXTENT_HEAD.unpack_from(blob, pos)
        pos += EXTENT_HEAD.size
        if offset < start or offset + length > end or offset % sector or length % sector or pos + length > len(blob):
            raise CorruptFilesystem(label, "the libntfs-3g child wrote outside the volume it was given")
        out.append(Extent(offset, blob[pos : pos + length]))
        pos += length
    return out


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
