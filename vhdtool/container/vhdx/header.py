"""VHDX header section and metadata region: headers (MS-VHDX 2.2.2), region tables (2.2.3), metadata (2.6).

Each parser takes the bytes of one structure and either returns its checked value
or says why it is not valid; the reader decides what to do with two copies.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from uuid import UUID

from vhdtool.container.vhdx.structs import (
    BAT_REGION_GUID,
    FILE_PARAMETERS_GUID,
    FILE_PARAMETERS_HAS_PARENT,
    FILE_PARAMETERS_LEAVE_BLOCKS_ALLOCATED,
    HEADER,
    HEADER_SECTION_SIZE,
    HEADER_SIGNATURE,
    HEADER_SIZE,
    LOGICAL_SECTOR_SIZE_GUID,
    MAX_TABLE_ENTRIES,
    MAX_VIRTUAL_SIZE,
    METADATA_IS_REQUIRED,
    METADATA_REGION_GUID,
    METADATA_SIGNATURE,
    METADATA_TABLE_ENTRY,
    METADATA_TABLE_HEADER,
    METADATA_TABLE_SIZE,
    PARENT_LOCATOR_ENTRY,
    PARENT_LOCATOR_GUID,
    PARENT_LOCATOR_HEADER,
    PHYSICAL_SECTOR_SIZE_GUID,
    REGION_TABLE_ENTRY,
    REGION_TABLE_HEADER,
    REGION_TABLE_SIGNATURE,
    REGION_TABLE_SIZE,
    VHDX_PARENT_LOCATOR_GUID,
    VIRTUAL_DISK_ID_GUID,
    VIRTUAL_DISK_SIZE_GUID,
    checksum_zeroed,
)
from vhdtool.errors import CorruptImage, UnsupportedImage
from vhdtool.units import MiB

ZERO_GUID = UUID(int=0)
KNOWN_METADATA = {
    FILE_PARAMETERS_GUID,
    VIRTUAL_DISK_SIZE_GUID,
    VIRTUAL_DISK_ID_GUID,
    LOGICAL_SECTOR_SIZE_GUID,
    PHYSICAL_SECTOR_SIZE_GUID,
    PARENT_LOCATOR_GUID,
}


@dataclass(frozen=True)
class VhdxHeader:
    slot: int  # 1 or 2
    sequence_number: int
    file_write_guid: UUID
    data_write_guid: UUID
    log_guid: UUID
    log_length: int
    log_offset: int


@dataclass(frozen=True)
class Region:
    guid: UUID
    file_offset: int
    length: int
    required: bool


@dataclass(frozen=True)
class Metadata:
    """The known metadata items (2.6.2), checked against the limits the spec sets."""

    block_size: int
    leave_blocks_allocated: bool
    has_parent: bool
    size: int
    virtual_disk_id: UUID
    logical_sector_size: int
    physical_sector_size: int
    parent_locator: dict[str, str] = field(default_factory=dict)


def parse_header(buf: bytes, slot: int) -> tuple[VhdxHeader | None, str]:
    """One header (2.2.2), or None with the reason it is not valid."""
    if len(buf) != HEADER_SIZE:
        return None, "truncated"
    if buf[:4] != HEADER_SIGNATURE:
        return None, "bad signature"
    h = HEADER.unpack(buf)
    # The checksum covers the whole 4 KiB, reserved bytes included.
    if checksum_zeroed(buf) != h.checksum:
        return None, "bad checksum"
    # Version 1 is the only one defined; LogVersion 0 likewise.
    if h.version != 1:
        return None, f"unsupported version {h.version}"
    if h.log_version != 0:
        return None, f"unsupported log version {h.log_version}"
    # LogLength and LogOffset are multiples of 1 MiB; the log lies after the header section.
    if h.log_length % MiB or h.log_offset % MiB or (h.log_length and h.log_offset < HEADER_SECTION_SIZE):
        return None, "log location not aligned to 1 MiB"
    return (
        VhdxHeader(
            slot=slot,
            sequence_number=h.sequence_number,
            file_write_guid=UUID(bytes_le=h.file_write_guid),
            data_write_guid=UUID(bytes_le=h.data_write_guid),
            log_guid=UUID(bytes_le=h.log_guid),
            log_length=h.log_length,
            log_offset=h.log_offset,
        ),
        "",
    )


def choose_header(headers: list[VhdxHeader], path: str) -> VhdxHeader:
    """The current header: the valid one with the higher sequence number.

    Equal sequence numbers are legal (Disk2VHD writes both headers alike); the
    first copy is taken then. Not when the two disagree about the log: one may
    name a pending log the other does not, nothing says which is current, and
    taking the first would lose the log (qemu-img refuses any such pair).
    """
    best = max(headers, key=lambda h: (h.sequence_number, -h.slot))
    for h in headers:
        if h.sequence_number == best.sequence_number and _log_fields(h) != _log_fields(best):
            raise CorruptImage(path, f"both VHDX headers have sequence number {best.sequence_number} but name "
                                     "different logs, so neither is known to be current")
    return best


def _log_fields(h: VhdxHeader) -> tuple[UUID, int, int]:
    return h.log_guid, h.log_offset, h.log_length


def parse_region_table(buf: bytes) -> tuple[list[Region] | None, str]:
    """One region table (2.2.3), or None with the reason it is not valid."""
    if len(buf) != REGION_TABLE_SIZE:
        return None, "truncated"
    if buf[:4] != REGION_TABLE_SIGNATURE:
        return None, "bad signature"
    hdr = REGION_TABLE_HEADER.unpack(buf)
    if checksum_zeroed(buf) != hdr.checksum:
        return None, "bad checksum"
    if hdr.entry_count > MAX_TABLE_ENTRIES:
        return None, f"entry count {hdr.entry_count} exceeds {MAX_TABLE_ENTRIES}"
    regions = []
    for i in range(hdr.entry_count):
        e = REGION_TABLE_ENTRY.unpack(buf, REGION_TABLE_HEADER.size + REGION_TABLE_ENTRY.size * i)
        regions.append(Region(UUID(bytes_le=e.guid), e.file_offset, e.length, bool(e.required & 1)))
    return regions, ""


def known_regions(regions: list[Region], path: str) -> tuple[Region, Region]:
    """(BAT, metadata) regions, after checking every rule of 2.2.3.2 on the whole table."""
    seen: dict[UUID, Region] = {}
    spans = []
    for r in regions:
        if r.guid in seen:
            raise CorruptImage(path, f"region {r.guid} is listed twice")
        if r.guid not in (BAT_REGION_GUID, METADATA_REGION_GUID):
            if r.required:
                raise UnsupportedImage(path, f"unknown required region {r.guid}", "a newer VHDX feature is in use")
            continue
        # 2.2.3.2: offsets and lengths are 1 MiB multiples, past the header section.
        if r.file_offset % MiB or r.length % MiB or r.length == 0 or r.file_offset < HEADER_SECTION_SIZE:
            raise CorruptImage(path, f"region {r.guid} has an invalid offset or length")
        seen[r.guid] = r
        spans.append((r.file_offset, r.file_offset + r.length))
    spans.sort()
    for (_a0, a1), (b0, _b1) in zip(spans, spans[1:]):
        if b0 < a1:
            raise CorruptImage(path, "regions overlap")
    for guid, name in ((BAT_REGION_GUID, "BAT"), (METADATA_REGION_GUID, "metadata")):
        if guid not in seen:
            raise CorruptImage(path, f"no {name} region")
    return seen[BAT_REGION_GUID], seen[METADATA_REGION_GUID]


def read_metadata(read_exact: Callable[[int, int, str], bytes], region: Region, path: str) -> Metadata:
    """The metadata table and its known items (2.6.1, 2.6.2), read through ``read_exact(offset, length, what)``."""
    table = read_exact(region.file_offset, METADATA_TABLE_SIZE, "metadata table")
    if table[:8] != METADATA_SIGNATURE:
        raise CorruptImage(path, "metadata table has a bad signature")
    hdr = METADATA_TABLE_HEADER.unpack(table)
    if hdr.entry_count > MAX_TABLE_ENTRIES:
        raise CorruptImage(path, f"metadata entry count {hdr.entry_count} exceeds {MAX_TABLE_ENTRIES}")
    items: dict[UUID, bytes] = {}
    for i in range(hdr.entry_count):
        e = METADATA_TABLE_ENTRY.unpack(table, METADATA_TABLE_HEADER.size + METADATA_TABLE_ENTRY.size * i)
        item_id = UUID(bytes_le=e.item_id)
        if item_id in items:
            raise CorruptImage(path, f"metadata item {item_id} is listed twice")
        if item_id not in KNOWN_METADATA:
            if e.flags & METADATA_IS_REQUIRED:
                raise UnsupportedImage(path, f"unknown required metadata item {item_id}", "a newer VHDX feature is in use")
            continue
        # 2.6.1.2: items lie inside the region, after the 64 KiB table.
        if e.length == 0 or e.offset < METADATA_TABLE_SIZE or e.offset + e.length > region.length:
            raise CorruptImage(path, f"metadata item {item_id} lies outside the metadata region")
        items[item_id] = read_exact(region.file_offset + e.offset, e.length, "metadata item")

    def item(guid: UUID, name: str, size: int) -> bytes:
        if guid not in items:
            raise CorruptImage(path, f"required metadata item '{name}' is missing")
        data = items[guid]
        if len(data) < size:
            raise CorruptImage(path, f"metadata item '{name}' is too short")
        return data

    block_size, flags = struct.unpack_from("<II", item(FILE_PARAMETERS_GUID, "file parameters", 8))
    (size,) = struct.unpack_from("<Q", item(VIRTUAL_DISK_SIZE_GUID, "virtual disk size", 8))
    disk_id = UUID(bytes_le=item(VIRTUAL_DISK_ID_GUID, "virtual disk id", 16)[:16])
    (lss,) = struct.unpack_from("<I", item(LOGICAL_SECTOR_SIZE_GUID, "logical sector size", 4))
    (pss,) = struct.unpack_from("<I", item(PHYSICAL_SECTOR_SIZE_GUID, "physical sector size", 4))

    # 2.6.2.1: block size is a power of two from 1 MiB to 256 MiB.
    if block_size < MiB or block_size > 256 * MiB or block_size & (block_size - 1):
        raise CorruptImage(path, f"block size {block_size} is not allowed (1 MiB to 256 MiB, a power of two)")
    # 2.6.2.4/2.6.2.5: sector sizes are 512 or 4096.
    if lss not in (512, 4096):
        raise CorruptImage(path, f"logical sector size {lss} is not allowed (512 or 4096)")
    if pss not in (512, 4096):
        raise CorruptImage(path, f"physical sector size {pss} is not allowed (512 or 4096)")
    # 2.6.2.2: a multiple of the logical sector size, at most 64 TiB.
    if size == 0 or size % lss or size > MAX_VIRTUAL_SIZE:
        raise CorruptImage(path, f"virtual disk size {size} is not allowed")
    has_parent = bool(flags & FILE_PARAMETERS_HAS_PARENT)
    locator = parse_parent_locator(item(PARENT_LOCATOR_GUID, "parent locator", 20), path) if has_parent else {}
    return Metadata(
        block_size=block_size,
        leave_blocks_allocated=bool(flags & FILE_PARAMETERS_LEAVE_BLOCKS_ALLOCATED),
        has_parent=has_parent,
        size=size,
        virtual_disk_id=disk_id,
        logical_sector_size=lss,
        physical_sector_size=pss,
        parent_locator=locator,
    )


def parse_parent_locator(data: bytes, path: str) -> dict[str, str]:
    """Key/value pairs of the parent locator (2.6.2.6), UTF-16LE strings."""
    hdr = PARENT_LOCATOR_HEADER.unpack(data)
    if UUID(bytes_le=hdr.locator_type) != VHDX_PARENT_LOCATOR_GUID:
        raise UnsupportedImage(path, "unknown parent locator type")
    first = PARENT_LOCATOR_HEADER.size
    if first + PARENT_LOCATOR_ENTRY.size * hdr.key_value_count > len(data):
        raise CorruptImage(path, "parent locator entries run past the metadata item")
    out = {}
    for i in range(hdr.key_value_count):
        e = PARENT_LOCATOR_ENTRY.unpack(data, first + PARENT_LOCATOR_ENTRY.size * i)
        k = data[e.key_offset : e.key_offset + e.key_length]
        v = data[e.value_offset : e.value_offset + e.value_length]
        if len(k) != e.key_length or len(v) != e.value_length or not e.key_length:
            raise CorruptImage(path, "parent locator entry lies outside the metadata item")
        try:
            out[k.decode("utf-16-le")] = v.decode("utf-16-le")
        except UnicodeDecodeError:
            raise CorruptImage(path, "parent locator holds invalid UTF-16") from None
    return out
