"""VHDX on-disk structures (MS-VHDX 2.2-2.6), on top of dissect.hypervisor's definitions.

dissect.hypervisor's ``header`` struct declares a 4096-byte reserved field after the
fields, which makes it 4176 bytes long; the real header is one 4 KiB sector, so it
is redefined here. The log structures (MS-VHDX 2.3) are not in dissect at all.
"""

from __future__ import annotations

from dissect.cstruct import cstruct
from dissect.hypervisor.disk.c_vhdx import (  # noqa: F401  (re-exported)
    BAT_REGION_GUID,
    FILE_PARAMETERS_GUID,
    LOGICAL_SECTOR_SIZE_GUID,
    METADATA_REGION_GUID,
    PARENT_LOCATOR_GUID,
    PHYSICAL_SECTOR_SIZE_GUID,
    VHDX_PARENT_LOCATOR_GUID,
    VIRTUAL_DISK_ID_GUID,
    VIRTUAL_DISK_SIZE_GUID,
    vhdx_def,
)

_extra_def = """
struct vhdx_header {
    char    signature[4];
    uint32  checksum;
    uint64  sequence_number;
    char    file_write_guid[16];
    char    data_write_guid[16];
    char    log_guid[16];
    uint16  log_version;
    uint16  version;
    uint32  log_length;
    uint64  log_offset;
};

struct log_entry_header {
    char    signature[4];
    uint32  checksum;
    uint32  entry_length;
    uint32  tail;
    uint64  sequence_number;
    uint32  descriptor_count;
    uint32  reserved;
    char    log_guid[16];
    uint64  flushed_file_offset;
    uint64  last_file_offset;
};

struct log_descriptor {
    char    signature[4];
    uint32  trailing_bytes_or_reserved;
    uint64  leading_bytes_or_zero_length;
    uint64  file_offset;
    uint64  sequence_number;
};
"""

c_vhdx = cstruct().load(vhdx_def + _extra_def)

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

# MS-VHDX 2.1: fixed layout of the first 1 MiB.
FILE_IDENTIFIER_SIGNATURE = b"vhdxfile"
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
