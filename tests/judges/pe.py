"""The file version in a PE image's VS_VERSION_INFO resource, found by its key and parsed by hand."""

from __future__ import annotations

import struct


def file_version(data: bytes) -> str:
    """dwFileVersionMS/LS of the VS_FIXEDFILEINFO after the VS_VERSION_INFO key."""
    key = "VS_VERSION_INFO\0".encode("utf-16-le")
    at = data.index(key)
    node = at - 6
    length, value_length, vtype = struct.unpack_from("<HHH", data, node)
    assert (value_length, vtype) == (52, 0)
    fixed = node + ((6 + len(key) + 3) & ~3)
    sig, _, ms, ls = struct.unpack_from("<IIII", data, fixed)
    assert sig == 0xFEEF04BD
    return f"{ms >> 16}.{ms & 0xFFFF}.{ls >> 16}.{ls & 0xFFFF}"
