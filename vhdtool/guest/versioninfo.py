"""Windows version numbers: comparing them, and a PE image's file version from its VS_VERSIONINFO resource.

The block is found by its key, the UTF-16LE string "VS_VERSION_INFO", followed
(after padding to a 32-bit boundary) by the fixed info whose signature is
0xFEEF04BD. Reading it this way needs no PE resource walk, and a file that
does not hold such a block simply has no version.
"""

from __future__ import annotations

import re
import struct

KEY = "VS_VERSION_INFO\0".encode("utf-16-le")
FIXED_SIGNATURE = 0xFEEF04BD


def file_version(data: bytes) -> str | None:
    start = 0
    while True:
        at = data.find(KEY, start)
        if at < 0:
            return None
        fixed = (at + len(KEY) + 3) & ~3
        if fixed + 16 <= len(data):
            sig, _struc, ms, ls = struct.unpack_from("<IIII", data, fixed)
            if sig == FIXED_SIGNATURE:
                return f"{ms >> 16}.{ms & 0xFFFF}.{ls >> 16}.{ls & 0xFFFF}"
        start = at + 2


def version_tuple(version: str | None) -> tuple[int, ...]:
    """"6.3.9600.18080" as (6, 3, 9600, 18080), for comparing versions; () for none."""
    return tuple(int(x) for x in re.findall(r"\d+", version or ""))
