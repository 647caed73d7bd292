"""VHDX on-disk structures and constants (MS-VHDX v1.0, 2.1-2.6), as ``struct`` layouts.

Each layout unpacks into a named tuple and packs back from one, so the reader and
a writer share one definition. Our own definitions, not dissect.hypervisor's: its
package init costs tens of milliseconds at start-up, and its ``header`` struct is
4176 bytes long where the real header is one 4 KiB sector.
"""

from __future__ import annotations

import struct
from typing import NamedTuple
from uuid import UUID

from dissect.util.hash import crc32c as _crc32c

from vhdtool.units import KiB, MiB, TiB


# 2.1: fixed layout of the first 1 MiB.
FILE_IDENTIFIER_SIGNATURE = b"vhdxfile"
CREATOR_SIZE = 512
HEADER_OFFSETS = (64 * KiB, 128 * KiB)
HEADER_SIZE = 4 * KiB
REGION_TABLE_OFFSETS = (192 * KiB, 256 * KiB)
REGION_TABLE_SIZE = 64 * KiB
HEADER_SECTION_SIZE = 1 * MiB

HEADER_SIGNATURE = b"head"
REGION_TABLE_SIGNATURE = b"regi"
METADATA_SIGNATURE = b"metadata"
LOG_ENTRY_SIGNATURE = b"loge"
LOG_ZERO_SIGNATURE = b"zero"
LOG_DATA_DESC_SIGNATURE = b"desc"
LOG_DATA_SECTOR_SIGNATURE = b"data"
LOG_SECTOR_SIZE = 4 * KiB

MAX_TABLE_ENTRIES = 2047  # region table (2.2.3.1) and metadata table (2.6.1.1)
METADATA_TABLE_SIZE = 64 * KiB
MAX_VIRTUAL_SIZE = 64 * TiB  # 2.6.2.2

# 2.2.3.2: known regions.
BAT_REGION_GUID = UUID("2dc27766-f623-4200-9d64-115e9bfd4a08")
METADATA_REGION_GUID = UUID("8b7ca206-4790-4b9a-b8fe-575f050f886e")
# 2.6.2: known metadata items.
FILE_PARAMETERS_GUID = UUID("caa16737-fa36-4d43-b3b6-33f0aa44e76b")
VIRTUAL_DISK_SIZE_GUID = UUID("2fa54224-cd1b-4876-b211-5dbed83bf4b8")
VIRTUAL_DISK_ID_GUID = UUID("beca12ab-b2e6-4523-93ef-c309e000c746")
LOGICAL_SECTOR_SIZE_GUID = UUID("8141bf1d-a96f-4709-ba47-f233a8faab5f")
PHYSICAL_SECTOR_SIZE_GUID = UUID("cda348c7-445d-4471-9cc9-e9885251c556")
PARENT_LOCATOR_GUID = UUID("a8d35f2d-b30b-454d-abf7-d3d84834ab0c")
VHDX_PARENT_LOCATOR_GUID = UUID("b04aefb7-d19e-4a81-b789-25b8e9445913")  # 2.6.2.6.1 LocatorType

# Payload BAT entry states (2.5.1.1); sector bitmap states (2.5.1.2).
PAYLOAD_BLOCK_NOT_PRESENT = 0
PAYLOAD_BLOCK_UNDEFINED = 1
PAYLOAD_BLOCK_ZERO = 2
PAYLOAD_BLOCK_UNMAPPED = 3
PAYLOAD_BLOCK_FULLY_PRESENT = 6
PAYLOAD_BLOCK_PARTIALLY_PRESENT = 7
SB_BLOCK_NOT_PRESENT = 0
SB_BLOCK_PRESENT = 6

SECTORS_PER_BITMAP_BLOCK = 1 << 23  # 2.4: one 1 MiB bitmap block covers 2^23 sectors

# 2.6.1.2 metadata table entry flags; 2.6.2.1 file parameters flags.
METADATA_IS_USER = 1
METADATA_IS_VIRTUAL_DISK = 2
METADATA_IS_REQUIRED = 4
FILE_PARAMETERS_LEAVE_BLOCKS_ALLOCATED = 1
FILE_PARAMETERS_HAS_PARENT = 2


def crc32c(data: bytes) -> int:
    return _crc32c.crc32c(data) & 0xFFFFFFFF


def checksum_zeroed(buf: bytes) -> int:
    """CRC-32C of a structure whose checksum field (bytes 4-7) counts as zero (2.2.2, 2.2.3, 2.3.1.1)."""
    return crc32c(bytes(buf[:4]) + b"\0\0\0\0" + bytes(buf[8:]))


class Header(NamedTuple):  # 2.2.2; the rest of its 4 KiB is reserved and zero
    signature: bytes
    checksum: int
    sequence_number: int
    file_write_guid: bytes
    data_write_guid: bytes
    log_guid: bytes
    log_version: int
    version: int
    log_length: int
    log_offset: int


class RegionTableHeader(NamedTuple):  # 2.2.3.1
    signature: bytes
    checksum: int
    entry_count: int


class RegionTableEntry(NamedTuple):  # 2.2.3.2; bit 0 of ``required``
    guid: bytes
    file_offset: int
    length: int
    required: int


class MetadataTableHeader(NamedTuple):  # 2.6.1.1
    signature: bytes
    entry_count: int


class MetadataTableEntry(NamedTuple):  # 2.6.1.2; ``flags`` holds IsUser, IsVirtualDisk, IsRequired
    item_id: bytes
    offset: int
    length: int
    flags: int


class ParentLocatorHeader(NamedTuple):  # 2.6.2.6.1
    locator_type: bytes
    key_value_count: int


class ParentLocatorEntry(NamedTuple):  # 2.6.2.6.2
    key_offset: int
    value_offset: int
    key_length: int
    value_length: int


class LogEntryHeader(NamedTuple):  # 2.3.1.1
    signature: bytes
    checksum: int
    entry_length: int
    tail: int
    sequence_number: int
    descriptor_count: int
    reserved: int
    log_guid: bytes
    flushed_file_offset: int
    last_file_offset: int


class LogDescriptor(NamedTuple):  # 2.3.1.2 (zero) and 2.3.1.3 (data)
    signature: bytes
    trailing_bytes_or_reserved: int
    leading_bytes_or_zero_length: int
    file_offset: int
    sequence_number: int


class Layout:
    """A little-endian struct layout bound to the named tuple it unpacks into."""

    def __init__(self, fmt: str, kind: type):
        self.struct = struct.Struct("<" + fmt)
        self.kind = kind
        self.size = self.struct.size

    def unpack(self, buf: bytes, offset: int = 0):
        return self.kind._make(self.struct.unpack_from(buf, offset))

    def pack(self, value) -> bytes:
        return self.struct.pack(*value)


HEADER = Layout("4sIQ16s16s16sHHIQ", Header)
REGION_TABLE_HEADER = Layout("4sII4x", RegionTableHeader)
REGION_TABLE_ENTRY = Layout("16sQII", RegionTableEntry)
METADATA_TABLE_HEADER = Layout("8s2xH20x", MetadataTableHeader)
METADATA_TABLE_ENTRY = Layout("16sIII4x", MetadataTableEntry)
PARENT_LOCATOR_HEADER = Layout("16s2xH", ParentLocatorHeader)
PARENT_LOCATOR_ENTRY = Layout("IIHH", ParentLocatorEntry)
LOG_ENTRY_HEADER = Layout("4sIIIQII16sQQ", LogEntryHeader)
LOG_DESCRIPTOR = Layout("4sIQQQ", LogDescriptor)
BAT_ENTRY = struct.Struct("<Q")  # 2.5: one 64-bit entry per payload or sector bitmap block

assert HEADER.size == 80 and REGION_TABLE_HEADER.size == 16 and REGION_TABLE_ENTRY.size == 32
assert METADATA_TABLE_HEADER.size == 32 and METADATA_TABLE_ENTRY.size == 32
assert PARENT_LOCATOR_HEADER.size == 20 and PARENT_LOCATOR_ENTRY.size == 12
assert LOG_ENTRY_HEADER.size == 64 and LOG_DESCRIPTOR.size == 32 and BAT_ENTRY.size == 8
