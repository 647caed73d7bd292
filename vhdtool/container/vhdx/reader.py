"""VHDX reader (MS-VHDX v1.0: 2.2 header section, 2.3 log, 2.5 BAT, 2.6 metadata).

Every structure is checked before it is trusted: CRC-32C on headers, region tables
and log entries, and every offset, length and count read from the file is bounded
by the file and by the spec before it is used. The parent of a differencing disk
is found and opened by ``vhdtool.container.chain``, then attached here.
"""

from __future__ import annotations

import os

from vhdtool.container.bitmap import bitmap_span, present_runs
from vhdtool.container.imagefile import ImageFile
from vhdtool.container.stream import DiskStream
from vhdtool.container.vhdx.bat import Bat, BatGeometry
from vhdtool.container.vhdx.header import (
    ZERO_GUID,
    Metadata,
    choose_header,
    known_regions,
    parse_header,
    parse_region_table,
    read_metadata,
)
from vhdtool.container.vhdx.log import replay_into_overlay
from vhdtool.container.vhdx.structs import (
    BAT_ENTRY,
    CREATOR_SIZE,
    FILE_IDENTIFIER_SIGNATURE,
    HEADER_OFFSETS,
    HEADER_SECTION_SIZE,
    HEADER_SIZE,
    PAYLOAD_BLOCK_FULLY_PRESENT,
    PAYLOAD_BLOCK_NOT_PRESENT,
    PAYLOAD_BLOCK_PARTIALLY_PRESENT,
    PAYLOAD_BLOCK_UNDEFINED,
    PAYLOAD_BLOCK_UNMAPPED,
    PAYLOAD_BLOCK_ZERO,
    REGION_TABLE_OFFSETS,
    REGION_TABLE_SIZE,
    SB_BLOCK_PRESENT,
    SECTORS_PER_BITMAP_BLOCK,
)
from vhdtool.errors import CorruptImage, NotADiskImage, UnsupportedImage

# Parent locator keys (2.6.2.6.3) in the order they are tried, and whether each is
# a path relative to the child (the others are Windows paths: only their file name
# means anything here).
PARENT_PATH_KEYS = (("relative_path", True), ("absolute_win32_path", False), ("volume_path", False))


class VhdxDisk(DiskStream):
    format = "vhdx"

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        self.path = os.fspath(path)
        self.warnings: list[str] = []
        self.image = ImageFile(self.path)
        try:
            self._open()
        except BaseException:
            self.image.close()
            raise

    # -- opening ----------------------------------------------------------------
    def _corrupt(self, problem: str) -> CorruptImage:
        return CorruptImage(self.path, problem)

    def _open(self) -> None:
        img = self.image
        if img.raw_pread(0, len(FILE_IDENTIFIER_SIGNATURE)) != FILE_IDENTIFIER_SIGNATURE:
            raise NotADiskImage(self.path, "not a VHDX file (no 'vhdxfile' signature)")
        creator = img.raw_pread(len(FILE_IDENTIFIER_SIGNATURE), CREATOR_SIZE)
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
        self.header = choose_header(headers, self.path)

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
        self.bat_region, self.metadata_region = known_regions(regions, self.path)

        self.metadata: Metadata = read_metadata(self.image.read_exact, self.metadata_region, self.path)
        m = self.metadata
        self.block_size = m.block_size
        self.size = m.size
        self.logical_sector_size = m.logical_sector_size
        self.physical_sector_size = m.physical_sector_size
        self.virtual_disk_id = m.virtual_disk_id
        self.has_parent = m.has_parent
        self.parent_locator = m.parent_locator

        self.geometry = BatGeometry.of(m.size, m.block_size, m.logical_sector_size, m.has_parent)
        # 2.5: the BAT region holds at least one entry per possible block.
        if self.geometry.entries * BAT_ENTRY.size > self.bat_region.length:
            raise self._corrupt(
                f"BAT region ({self.bat_region.length} bytes) is too small for {self.geometry.entries} entries"
            )
        if self.bat_region.file_offset >= self.image.size:
            raise self._corrupt("truncated: the BAT lies beyond the end of the file")
        self.bat = Bat(self.image, self.bat_region.file_offset, self.geometry)

    # -- the parent (opened by vhdtool.container.chain) ----------------------------
    @property
    def needs_parent(self) -> bool:
        return self.has_parent

    def parent_paths(self) -> list[tuple[str, bool]]:
        """(path as the locator gives it, relative to this file?) in the order to try them."""
        return [(self.parent_locator[k], rel) for k, rel in PARENT_PATH_KEYS if self.parent_locator.get(k)]

    def attach_parent(self, parent: DiskStream) -> None:
        """Check that ``parent`` is the disk this one was made from (2.6.2.6.3 parent_linkage) and use it."""
        if not isinstance(parent, VhdxDisk):
            raise UnsupportedImage(self.path, f"parent {parent.path} is not a VHDX",
                                   "a VHDX differencing disk names its parent by a VHDX header's DataWriteGuid")
        linkage = self.parent_locator.get("parent_linkage")
        if not linkage:
            raise CorruptImage(self.path, "its parent locator has no parent_linkage, so its parent cannot be checked",
                               "the chain is broken; recreate the differencing disk on a Hyper-V host")
        want = {linkage.strip("{}").lower(), self.parent_locator.get("parent_linkage2", "").strip("{}").lower()}
        if str(parent.header.data_write_guid) not in want:
            raise CorruptImage(
                self.path,
                f"parent {parent.path} has changed since this differencing disk was made (DataWriteGuid mismatch)",
                "the chain is broken; use the parent it was made from",
            )
        if parent.size != self.size:
            self.warnings.append(f"parent {parent.path} has a different virtual size")
        self.parent = parent

    # -- reading ------------------------------------------------------------------
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
        index = self.geometry.payload_index(block)
        state, file_offset = self.bat[index]
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
        chunk = block // self.geometry.chunk_ratio
        sb_state, sb_offset = self.bat[self.geometry.bitmap_index(chunk)]
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

