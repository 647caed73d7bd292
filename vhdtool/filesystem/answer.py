"""The changed sectors a sandboxed filesystem writer answers with: encoded in the child, checked in the parent.

The payload is a run of (offset, length) heads, each followed by its bytes. The parent trusts
none of it: every extent must lie inside the volume it gave the child, in whole sectors, and the
payload must be used exactly. Beside it, in the answer's head, the source ranges of copied local
files (``decode_sources``): each inside the volume and inside its source.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from vhdtool.container.overlay import Extent
from vhdtool.container.source import Source, SourceRange
from vhdtool.errors import CorruptFilesystem

EXTENT_HEAD = struct.Struct("<QQ")


def encode_extents(extents: list[Extent]) -> bytes:
    return b"".join(EXTENT_HEAD.pack(e.offset, len(e.data)) + e.data for e in extents)


def decode_extents(blob: bytes, inside: Callable[[int, int], bool], sector: int, label: str,
                   library: str) -> list[Extent]:
    """The child's extents, checked: ``inside(offset, length)`` for each, whole sectors, the payload used exactly."""
    out, pos = [], 0
    while pos < len(blob):
        if pos + EXTENT_HEAD.size > len(blob):
            raise CorruptFilesystem(label, f"the {library} child sent a malformed answer")
        offset, length = EXTENT_HEAD.unpack_from(blob, pos)
        pos += EXTENT_HEAD.size
        if not inside(offset, length) or offset % sector or length % sector or pos + length > len(blob):
            raise CorruptFilesystem(label, f"the {library} child wrote outside the volume it was given")
        out.append(Extent(offset, blob[pos : pos + length]))
        pos += length
    return out


def decode_sources(ranges, sources: list[Source], inside: Callable[[int, int], bool], sector: int, label: str,
                   library: str) -> list[Extent]:
    """The child's source ranges ``[disk offset, length, source index, offset in the source]``, checked: inside
    the volume (``inside(offset, length)``) and the source, starting on a sector."""
    out = []
    if not isinstance(ranges, list):
        raise CorruptFilesystem(label, f"the {library} child sent a malformed answer")
    for item in ranges:
        if not (isinstance(item, list) and len(item) == 4 and all(type(x) is int and x >= 0 for x in item)):
            raise CorruptFilesystem(label, f"the {library} child sent a malformed answer")
        offset, length, index, at = item
        if index >= len(sources) or at + length > sources[index].size or length == 0:
            raise CorruptFilesystem(label, f"the {library} child named bytes its source does not have")
        if not inside(offset, length) or offset % sector:
            raise CorruptFilesystem(label, f"the {library} child wrote outside the volume it was given")
        out.append(Extent(offset, SourceRange(sources[index], at, length)))
    return out


def decode_runs(value, label: str, library: str) -> list[tuple[int, int]]:
    """The child's ``[disk offset, length]`` runs as (start, end), checked for form only: the caller uses them
    only where they meet what it checked otherwise."""
    if not isinstance(value, list) or not all(isinstance(r, list) and len(r) == 2 and all(type(x) is int and x >= 0
                                                                                        for x in r) for r in value):
        raise CorruptFilesystem(label, f"the {library} child sent a malformed answer")
    return [(lo, lo + n) for lo, n in value]
