"""VHD on-disk structures and constants (Virtual Hard Disk Image Format Specification, 2006), as ``struct`` layouts.

The footer ("Hard Disk Footer Format"), the dynamic disk header ("Dynamic Disk
Header Format") with its parent locator entries, the block allocation table
entry and the sector bitmap in front of each block. Every field is big-endian.
The reader and the writer parse them here and nowhere else; reading them from
the file (and bounding what they say against it) is theirs.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from vhdtool.units import MiB

SECTOR = 512
FOOTER_COOKIE = b"conectix"
FOOTER_SIZE = 512
SHORT_FOOTER_SIZE = 511  # Virtual PC once wrote 511-byte footers
HEADER_COOKIE = b"cxsparse"
HEADER_SIZE = 1024
DISK_FIXED, DISK_DYNAMIC, DISK_DIFFERENCING = 2, 3, 4
MAX_BLOCK_SIZE = 256 * MiB  # the spec's default is 2 MiB; nothing real comes near this
LOCATOR_ENTRIES = 8

# Block Allocation Table: one entry per block, the file sector where the block (its
# sector bitmap, then its data) starts, or UNALLOCATED.
BAT_ENTRY = struct.Struct(">I")
UNALLOCATED = 0xFFFFFFFF


class Footer(NamedTuple):  # "Hard Disk Footer Format"; 427 reserved bytes follow
    cookie: bytes
    features: int
    format_version: int
    data_offset: int  # the dynamic header's file offset; all ones on a fixed disk
    timestamp: int
    creator_application: bytes
    creator_version: int
    creator_host_os: bytes
    original_size: int
    current_size: int  # the virtual disk's size, as Hyper-V presents it
    disk_geometry: int
    disk_type: int
    checksum: int
    unique_id: bytes
    saved_state: int  # non-zero: the VM's memory was saved with this disk as it is


class ParentLocator(NamedTuple):  # "Parent Locator Entry"; platform_code all zeros: the entry is unused
    platform_code: bytes
    data_space: int  # sectors reserved for the locator
    data_length: int  # bytes of the locator
    reserved: int
    data_offset: int  # file offset of the locator


class DynamicHeader(NamedTuple):  # "Dynamic Disk Header Format"; 256 reserved bytes follow the locators
    cookie: bytes
    data_offset: int  # unused, all ones
    table_offset: int  # the BAT's file offset
    header_version: int
    max_table_entries: int
    block_size: int
    checksum: int
    parent_unique_id: bytes
    parent_timestamp: int
    parent_unicode_name: bytes
    locators: tuple[ParentLocator, ...]


FOOTER = struct.Struct(">8sIIQI4sI4sQQIII16sB427x")
DYNAMIC_HEADER = struct.Struct(">8sQQIIII16sI4x512s")
PARENT_LOCATOR = struct.Struct(">4sIIIQ")
FOOTER_CHECKSUM_AT = 64
FOOTER_UNIQUE_ID_AT = 68
HEADER_CHECKSUM_AT = 36
assert FOOTER.size == FOOTER_SIZE and DYNAMIC_HEADER.size == 576 and PARENT_LOCATOR.size == 24
assert DYNAMIC_HEADER.size + LOCATOR_ENTRIES * PARENT_LOCATOR.size + 256 == HEADER_SIZE


def _checksum(buf: bytes, at: int) -> int:
    """The spec's checksum: the one's complement of the sum of all bytes but the 4-byte checksum field at ``at``."""
    return ~(sum(buf[:at]) + sum(buf[at + 4 :])) & 0xFFFFFFFF


def footer_checksum(footer: bytes) -> int:
    return _checksum(footer, FOOTER_CHECKSUM_AT)


def header_checksum(header: bytes) -> int:
    return _checksum(header, HEADER_CHECKSUM_AT)


def with_new_unique_id(footer: bytes, unique_id: bytes) -> bytes:
    """``footer`` (512 bytes) with another Unique Id and the checksum that goes with it; every other byte kept."""
    out = bytearray(footer)
    out[FOOTER_UNIQUE_ID_AT : FOOTER_UNIQUE_ID_AT + 16] = unique_id
    out[FOOTER_CHECKSUM_AT : FOOTER_CHECKSUM_AT + 4] = footer_checksum(bytes(out)).to_bytes(4, "big")
    return bytes(out)


def parse_footer(buf: bytes) -> Footer:
    """The footer in ``buf`` (512 bytes; pad a 511-byte one with a zero)."""
    return Footer._make(FOOTER.unpack_from(buf))


def parse_dynamic_header(buf: bytes) -> DynamicHeader:
    """The dynamic disk header in ``buf`` (1024 bytes)."""
    fields = DYNAMIC_HEADER.unpack_from(buf)
    locators = tuple(
        ParentLocator._make(PARENT_LOCATOR.unpack_from(buf, DYNAMIC_HEADER.size + i * PARENT_LOCATOR.size))
        for i in range(LOCATOR_ENTRIES)
    )
    return DynamicHeader._make((*fields, locators))


def block_table_problem(header: DynamicHeader, disk_size: int) -> str | None:
    """Why the header's block size or table cannot describe a disk of ``disk_size`` bytes, or None.

    A block is a power of two of at least a sector, and the table has an entry for
    every block of the disk.
    """
    bs = header.block_size
    if bs < SECTOR or bs & (bs - 1) or bs > MAX_BLOCK_SIZE:
        return f"VHD block size {bs} is not allowed"
    if header.max_table_entries * bs < disk_size:
        return "VHD block table is too small for the disk size"
    return None


def bitmap_size(block_size: int) -> int:
    """Bytes of the sector bitmap in front of each block: one bit per sector, padded to whole sectors."""
    return -(-(block_size // SECTOR // 8) // SECTOR) * SECTOR
