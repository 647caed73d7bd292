"""VHDX reader (MS-VHDX v1.0: 2.2 header section, 2.3 log, 2.5 BAT, 2.6 metadata).

Every structure is checked before it is trusted: CRC-32C on headers, region tables
and log entries, and every offset, length and count read from the file is bounded
by the file and by the spec before it is used.
"""

from __future__ import annotations

import ntpath
import os
import struct
from dataclasses import dataclass
from uuid import UUID

from vhdtool.container.c_vhdx import (
    BAT_REGION_GUID,
    FILE_IDENTIFIER_SIGNATURE,
    FILE_PARAMETERS_GUID,
    HEADER_OFFSETS,
    HEADER_SECTION_SIZE,
    HEADER_SIGNATURE,
    HEADER_SIZE,
    LOGICAL_SECTOR_SIZE_GUID,
    MAX_TABLE_ENTRIES,
    METADATA_REGION_GUID,
    METADATA_SIGNATURE,
    METADATA_TABLE_SIZE,
    PARENT_LOCATOR_GUID,
    PAYLOAD_BLOCK_FULLY_PRESENT,
    PAYLOAD_BLOCK_NOT_PRESENT,
    PAYLOAD_BLOCK_PARTIALLY_PRESENT,
    PAYLOAD_BLOCK_UNDEFINED,
    PAYLOAD_BLOCK_UNMAPPED,
    PAYLOAD_BLOCK_ZERO,
    PHYSICAL_SECTOR_SIZE_GUID,
    REGION_TABLE_OFFSETS,
    REGION_TABLE_SIGNATURE,
    REGION_TABLE_SIZE,
    SB_BLOCK_PRESENT,
    SECTORS_PER_BITMAP_BLOCK,
    VHDX_PARENT_LOCATOR_GUID,
    VIRTUAL_DISK_ID_GUID,
    VIRTUAL_DISK_SIZE_GUID,
    MiB,
    TiB,
    c_vhdx,
)
from vhdtool.container.bitmap import bitmap_span, present_runs
from vhdtool.container.imagefile import ImageFile, PagedTable
from vhdtool.container.stream import DiskStream
from vhdtool.container.vhdx_log import crc32c, replay_into_overlay
from vhdtool.errors import CorruptImage, MissingParent, NotADiskImage, UnsupportedImage

ZERO_GUID = UUID(int=0)
MAX_VIRTUAL_SIZE = 64 * TiB  # 2.6.2.2
MAX_PARENT_DEPTH = 16
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


def parse_header(buf: bytes, slot: int) -> tuple[VhdxHeader | None, str]:
    """One header (2.2.2), or None with the reason it is not valid."""
    if len(buf) != HEADER_SIZE:
        return None, "truncated"
    if buf[:4] != HEADER_SIGNATURE:
        return None, "bad signature"
    h = c_vhdx.vhdx_header(buf)
    zeroed = buf[:4] + b"\0\0\0\0" + buf[8:]
    if crc32c(zeroed) != h.checksum:
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


def choose_header(headers: list[VhdxHeader]) -> VhdxHeader:
    """The current header: the valid one with the higher sequence number.

    Equal sequence numbers are legal (Disk2VHD writes both headers alike); the
    first copy is taken then.
    """
    return max(headers, key=lambda h: (h.sequence_number, -h.slot))


def parse_region_table(buf: bytes) -> tuple[list[Region] | None, str]:
    """One region table (2.2.3), or None with the reason it is not valid."""
    if len(buf) != REGION_TABLE_SIZE:
        return None, "truncated"
    if buf[:4] != REGION_TABLE_SIGNATURE:
        return None, "bad signature"
    hdr = c_vhdx.region_table_header(buf[:16])
    if crc32c(buf[:4] + b"\0\0\0\0" + buf[8:]) != hdr.checksum:
        return None, "bad checksum"
    if hdr.entry_count > MAX_TABLE_ENTRIES:
        return None, f"entry count {hdr.entry_count} exceeds {MAX_TABLE_ENTRIES}"
    regions = []
    for i in range(hdr.entry_count):
        e = c_vhdx.region_table_entry(buf[16 + 32 * i : 48 + 32 * i])
        regions.append(Region(UUID(bytes_le=e.guid), e.file_offset, e.length, bool(e.required & 1)))
    return regions, ""


class VhdxDisk(DiskStream):
    format = "vhdx"

    def __init__(self, path: str | os.PathLike, _depth: int = 0, _child: str | None = None):
        super().__init__()
        self.path = os.fspath(path)
        self.warnings: list[str] = []
        self.image = ImageFile(self.path)
        try:
            self._open(_depth)
        except BaseException:
            self.image.close()
            raise

    # -- opening ----------------------------------------------------------------
    def _corrupt(self, problem: str) -> CorruptImage:
        return CorruptImage(self.path, problem)

    def _open(self, depth: int) -> None:
        img = self.image
        ident = img.raw_pread(0, 8)
        if ident != FILE_IDENTIFIER_SIGNATURE:
            raise NotADiskImage(self.path, "not a VHDX file (no 'vhdxfile' signature)")
        creator = img.raw_pread(8, 512)
        self.creator = creator.decode("utf-16-le", "replace").split("\0", 1)[0]

        headers, reasons = [], []
        for slot, off in enumerate(HEADER_OFFSETS, 1):
            h, why = parse_header(img.raw_pread(off, HEADER_SIZE), slot)
            if h:
                headers.append(h)
            else:
                reasons.append(f"header {slot}: {why}")
        if not headers:
            if img.file_size < HEADER_OFFSETS[1] + HEADER_SIZE:
                raise self._corrupt(f"truncated inside the header section ({img.file_size} bytes)")
            raise self._corrupt("both VHDX headers are corrupt (" + ", ".join(reasons) + ")")
        if reasons:
            self.warnings.append("using the other VHDX header copy: " + ", ".join(reasons))
        self.header = choose_header(headers)

        # 2.3.3: a non-zero LogGuid means the log must be replayed before anything else is read.
        if self.header.log_guid != ZERO_GUID:
            h = self.header
            if h.log_offset + h.log_length > img.file_size:
                raise self._corrupt("truncated: the log region lies beyond the end of the file")
            replay_into_overlay(img, h.log_offset, h.log_length, h.log_guid)
            self.log_replayed = True
            self.warnings.append("a pending VHDX log was replayed in memory; the file was not changed")

        regions = None
        reasons = []
        for n, off in enumerate(REGION_TABLE_OFFSETS, 1):
            regions, why = parse_region_table(img.pread(off, REGION_TABLE_SIZE))
            if regions is not None:
                if n == 2:
                    self.warnings.append(f"region table 1 is corrupt ({reasons[0]}); using region table 2")
                break
            reasons.append(why)
        if regions is None:
            raise self._corrupt("both region tables are corrupt (" + ", ".join(reasons) + ")")
        self._check_regions(regions)

        self._read_metadata()
        self._setup_bat()
        if self.has_parent:
            self._open_parent(depth)

    def _check_regions(self, regions: list[Region]) -> None:
        seen: dict[UUID, Region] = {}
        spans = []
        for r in regions:
            if r.guid in seen:
                raise self._corrupt(f"region {r.guid} is listed twice")
            if r.guid not in (BAT_REGION_GUID, METADATA_REGION_GUID):
                if r.required:
                    raise UnsupportedImage(self.path, f"unknown required region {r.guid}", "a newer VHDX feature is in use")
                continue
            # 2.2.3.2: offsets and lengths are 1 MiB multiples, past the header section.
            if r.file_offset % MiB or r.length % MiB or r.length == 0 or r.file_offset < HEADER_SECTION_SIZE:
                raise self._corrupt(f"region {r.guid} has an invalid offset or length")
            seen[r.guid] = r
            spans.append((r.file_offset, r.file_offset + r.length))
        spans.sort()
        for (a0, a1), (b0, _b1) in zip(spans, spans[1:]):
            if b0 < a1:
                raise self._corrupt("regions overlap")
        for guid, name in ((BAT_REGION_GUID, "BAT"), (METADATA_REGION_GUID, "metadata")):
            if guid not in seen:
                raise self._corrupt(f"no {name} region")
        self.bat_region = seen[BAT_REGION_GUID]
        self.metadata_region = seen[METADATA_REGION_GUID]

    def _read_metadata(self) -> None:
        region = self.metadata_region
        table = self.image.read_exact(region.file_offset, METADATA_TABLE_SIZE, "metadata table")
        if table[:8] != METADATA_SIGNATURE:
            raise self._corrupt("metadata table has a bad signature")
        hdr = c_vhdx.metadata_table_header(table[:32])
        if hdr.entry_count > MAX_TABLE_ENTRIES:
            raise self._corrupt(f"metadata entry count {hdr.entry_count} exceeds {MAX_TABLE_ENTRIES}")
        items: dict[UUID, bytes] = {}
        for i in range(hdr.entry_count):
            e = c_vhdx.metadata_table_entry(table[32 + 32 * i : 64 + 32 * i])
            item_id = UUID(bytes_le=e.item_id)
            if item_id in items:
                raise self._corrupt(f"metadata item {item_id} is listed twice")
            if item_id not in KNOWN_METADATA:
                if e.is_required:
                    raise UnsupportedImage(
                        self.path, f"unknown required metadata item {item_id}", "a newer VHDX feature is in use"
                    )
                continue
            # 2.6.1.2: items lie inside the region, after the 64 KiB table.
            if e.length == 0 or e.offset < METADATA_TABLE_SIZE or e.offset + e.length > region.length:
                raise self._corrupt(f"metadata item {item_id} lies outside the metadata region")
            items[item_id] = self.image.read_exact(region.file_offset + e.offset, e.length, "metadata item")

        def item(guid: UUID, name: str, size: int | None) -> bytes:
            if guid not in items:
                raise self._corrupt(f"required metadata item '{name}' is missing")
            data = items[guid]
            if size is not None and len(data) < size:
                raise self._corrupt(f"metadata item '{name}' is too short")
            return data

        block_size, flags = struct.unpack_from("<II", item(FILE_PARAMETERS_GUID, "file parameters", 8))
        (size,) = struct.unpack_from("<Q", item(VIRTUAL_DISK_SIZE_GUID, "virtual disk size", 8))
        self.virtual_disk_id = UUID(bytes_le=item(VIRTUAL_DISK_ID_GUID, "virtual disk id", 16)[:16])
        (lss,) = struct.unpack_from("<I", item(LOGICAL_SECTOR_SIZE_GUID, "logical sector size", 4))
        (pss,) = struct.unpack_from("<I", item(PHYSICAL_SECTOR_SIZE_GUID, "physical sector size", 4))

        # 2.6.2.1: block size is a power of two from 1 MiB to 256 MiB.
        if block_size < MiB or block_size > 256 * MiB or block_size & (block_size - 1):
            raise self._corrupt(f"block size {block_size} is not allowed (1 MiB to 256 MiB, a power of two)")
        # 2.6.2.4/2.6.2.5: sector sizes are 512 or 4096.
        if lss not in (512, 4096):
            raise self._corrupt(f"logical sector size {lss} is not allowed (512 or 4096)")
        if pss not in (512, 4096):
            raise self._corrupt(f"physical sector size {pss} is not allowed (512 or 4096)")
        # 2.6.2.2: a multiple of the logical sector size, at most 64 TiB.
        if size == 0 or size % lss or size > MAX_VIRTUAL_SIZE:
            raise self._corrupt(f"virtual disk size {size} is not allowed")
        self.block_size = block_size
        self.leave_blocks_allocated = bool(flags & 1)
        self.has_parent = bool(flags & 2)
        self.size = size
        self.logical_sector_size = lss
        self.physical_sector_size = pss
        self.parent_locator: dict[str, str] = {}
        if self.has_parent:
            self.parent_locator = self._parse_parent_locator(item(PARENT_LOCATOR_GUID, "parent locator", 20))

    def _parse_parent_locator(self, data: bytes) -> dict[str, str]:
        """Key/value pairs of the parent locator (2.6.2.6), UTF-16LE strings."""
        hdr = c_vhdx.parent_locator_header(data[:20])
        if UUID(bytes_le=hdr.locator_type) != VHDX_PARENT_LOCATOR_GUID:
            raise UnsupportedImage(self.path, "unknown parent locator type")
        if 20 + 12 * hdr.key_value_count > len(data):
            raise self._corrupt("parent locator entries run past the metadata item")
        out = {}
        for i in range(hdr.key_value_count):
            e = c_vhdx.parent_locator_entry(data[20 + 12 * i : 32 + 12 * i])
            k = data[e.key_offset : e.key_offset + e.key_length]
            v = data[e.value_offset : e.value_offset + e.value_length]
            if len(k) != e.key_length or len(v) != e.value_length or not e.key_length:
                raise self._corrupt("parent locator entry lies outside the metadata item")
            try:
                out[k.decode("utf-16-le")] = v.decode("utf-16-le")
            except UnicodeDecodeError:
                raise self._corrupt("parent locator holds invalid UTF-16") from None
        return out

    def _setup_bat(self) -> None:
        # 2.4: a chunk is 2^23 logical sectors; the chunk ratio is payload blocks per chunk.
        self.chunk_ratio = (SECTORS_PER_BITMAP_BLOCK * self.logical_sector_size) // self.block_size
        self.data_blocks = -(-self.size // self.block_size)
        if self.has_parent:
            bitmap_blocks = -(-self.data_blocks // self.chunk_ratio)
            total = bitmap_blocks * (self.chunk_ratio + 1)
        else:
            total = self.data_blocks + (self.data_blocks - 1) // self.chunk_ratio
        # 2.5: the BAT region holds at least one entry per possible block.
        if total * 8 > self.bat_region.length:
            raise self._corrupt(
                f"BAT region ({self.bat_region.length} bytes) is too small for {total} entries"
            )
        if self.bat_region.file_offset >= self.image.size:
            raise self._corrupt("truncated: the BAT lies beyond the end of the file")
        self.bat_entries = total
        self._bat = PagedTable(self.image, self.bat_region.file_offset, total, "<Q", "BAT")

    def _bat_entry(self, index: int) -> tuple[int, int]:
        """(state, file offset in bytes) of BAT entry ``index``."""
        raw = self._bat[index]
        return raw & 7, (raw >> 20) * MiB

    def _open_parent(self, depth: int) -> None:
        if depth >= MAX_PARENT_DEPTH:
            raise UnsupportedImage(self.path, f"differencing chain deeper than {MAX_PARENT_DEPTH}")
        loc = self.parent_locator
        here = os.path.dirname(os.path.abspath(self.path))
        candidates = []
        for key in ("relative_path", "absolute_win32_path", "volume_path"):
            value = loc.get(key)
            if not value:
                continue
            rel = value.replace("\\", "/")
            if key == "relative_path":
                candidates.append(os.path.normpath(os.path.join(here, rel)))
            # A Windows path means nothing here; the parent usually sits beside the child.
            candidates.append(os.path.join(here, ntpath.basename(value)))
        named = loc.get("relative_path") or loc.get("absolute_win32_path") or loc.get("volume_path") or "?"
        found = next((c for c in candidates if os.path.isfile(c)), None)
        if found is None:
            raise MissingParent(self.path, f"parent disk {named} not found")
        parent = open_image(found, _depth=depth + 1)
        linkage = loc.get("parent_linkage")
        if linkage and isinstance(parent, VhdxDisk):
            want = {linkage.strip("{}").lower(), loc.get("parent_linkage2", "").strip("{}").lower()}
            if str(parent.header.data_write_guid) not in want:
                parent.close()
                raise CorruptImage(
                    self.path,
                    f"parent {found} has changed since this differencing disk was made (DataWriteGuid mismatch)",
                    "the chain is broken; use the parent it was made from",
                )
        if parent.size != self.size:
            self.warnings.append(f"parent {found} has a different virtual size")
        self.parent = parent

    # -- reading ------------------------------------------------------------------
    def _payload_index(self, block: int) -> int:
        return block + block // self.chunk_ratio

    def read_at(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        out = []
        pos = offset
        bs = self.block_size
        while pos < end:
            block, within = divmod(pos, bs)
            n = min(bs - within, end - pos)
            out.append(self._read_block(block, within, n))
            pos += n
        return b"".join(out)

    def _read_block(self, block: int, within: int, n: int) -> bytes:
        index = self._payload_index(block)
        state, file_offset = self._bat_entry(index)
        if state == PAYLOAD_BLOCK_FULLY_PRESENT:
            return self._payload(index, file_offset, within, n)
        if state == PAYLOAD_BLOCK_PARTIALLY_PRESENT:
            if not self.has_parent:
                raise self._corrupt(f"BAT entry {index} is partially present in a disk without a parent")
            return self._read_partial(block, index, file_offset, within, n)
        if state == PAYLOAD_BLOCK_NOT_PRESENT and self.parent is not None:
            return self.parent.read_at(block * self.block_size + within, n).ljust(n, b"\0")
        if state in (PAYLOAD_BLOCK_NOT_PRESENT, PAYLOAD_BLOCK_UNDEFINED, PAYLOAD_BLOCK_ZERO, PAYLOAD_BLOCK_UNMAPPED):
            return bytes(n)
        raise self._corrupt(f"BAT entry {index} has reserved state {state}")

    def _payload(self, index: int, file_offset: int, within: int, n: int) -> bytes:
        # 2.5.1: payload blocks lie after the header section.
        if file_offset < HEADER_SECTION_SIZE:
            raise self._corrupt(f"BAT entry {index} points into the header section")
        if file_offset + within + n > self.image.size:
            raise self._corrupt(
                f"BAT entry {index} points beyond the end of the file (offset {file_offset}, file size {self.image.size})"
            )
        return self.image.read_exact(file_offset + within, n, f"payload block of BAT entry {index}")

    def _read_partial(self, block: int, index: int, file_offset: int, within: int, n: int) -> bytes:
        chunk = block // self.chunk_ratio
        sb_state, sb_offset = self._bat_entry(chunk * (self.chunk_ratio + 1) + self.chunk_ratio)
        if sb_state != SB_BLOCK_PRESENT:
            raise self._corrupt(f"BAT entry {index} is partially present but its sector bitmap is not")
        lss = self.logical_sector_size
        # Offsets within the chunk; bit (s % 8) of byte (s // 8) is chunk sector s (2.4).
        chunk_base = chunk * SECTORS_PER_BITMAP_BLOCK * lss
        start = block * self.block_size + within - chunk_base
        first_byte, length = bitmap_span(start, start + n, lss)
        bitmap = self.image.read_exact(sb_offset + first_byte, length, "sector bitmap")
        out = bytearray()
        for lo, hi, present in present_runs(bitmap, first_byte, start, start + n, lss, msb_first=False):
            if present:
                out += self._payload(index, file_offset, chunk_base + lo - block * self.block_size, hi - lo)
            else:
                out += self.parent.read_at(chunk_base + lo, hi - lo).ljust(hi - lo, b"\0")
        return bytes(out)

    def _close_backing(self) -> None:
        self.image.close()


def open_image(path: str, _depth: int = 0) -> DiskStream:
    """Open a VHDX or VHD by its content, not its name."""
    from vhdtool.container.vhd import VhdDisk, looks_like_vhd

    probe = ImageFile(path)
    try:
        head = probe.raw_pread(0, 8)
        size = probe.file_size
        if head == FILE_IDENTIFIER_SIGNATURE:
            kind = "vhdx"
        elif looks_like_vhd(probe):
            kind = "vhd"
        elif size == 0:
            raise NotADiskImage(path, "is empty")
        else:
            raise NotADiskImage(path, "not a VHDX or VHD image")
    finally:
        probe.close()
    if kind == "vhdx":
        return VhdxDisk(path, _depth=_depth)
    return VhdDisk(path, _depth=_depth)
