"""Where everything lies in a VHD file about to be written: footer, dynamic header, BAT, locators, blocks, each bounded.

The writer plans from this, not from the reader's view: the reader accepts a file
whose footer survives only as the copy at offset 0, and trusts libvhdi with
fixed and dynamic disks, while a file that is written must have its footer at
the end, checksums that match, and no two structures sharing a byte. Every
offset and count here comes from the file and is treated as hostile: a write
planned from it must land in one structure and nowhere else.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from vhdtool.container.vhd.reader import VhdDisk, end_footer
from vhdtool.container.vhd.structs import (
    BAT_ENTRY,
    DISK_DIFFERENCING,
    DISK_FIXED,
    FOOTER_SIZE,
    HEADER_COOKIE,
    HEADER_SIZE,
    SECTOR,
    UNALLOCATED,
    DynamicHeader,
    Footer,
    bitmap_size,
    block_table_problem,
    footer_checksum,
    header_checksum,
    parse_dynamic_header,
    parse_footer,
)
from vhdtool.errors import CorruptImage, ImageInUse, UnsupportedImage
from vhdtool.units import MiB

MAX_BAT_BYTES = 64 * MiB  # 16 Mi blocks; a real VHD (at most 2040 GiB) needs far fewer


@dataclass
class VhdLayout:
    """The parts of a VHD file the writer needs, each bounded against the file."""

    file_size: int
    footer: bytes  # 512 bytes, as it is at the end of the file
    footer_start: int
    size: int
    disk_type: int
    block_size: int = 0
    bitmap_size: int = 0
    table_offset: int = 0
    entries: int = 0
    bat: bytes = b""  # the whole BAT

    def block_sector(self, index: int) -> int:
        (sector,) = BAT_ENTRY.unpack_from(self.bat, BAT_ENTRY.size * index)
        return sector


def corrupt(path: str, problem: str) -> CorruptImage:
    return CorruptImage(
        path, problem, "the image is damaged; vhdtool does not write to it (repair it on a Hyper-V host)"
    )


def _changed(path: str) -> ImageInUse:
    return ImageInUse(path, "the image changed since it was opened", "run the command again")


def read_layout(disk: VhdDisk) -> VhdLayout:
    """The layout of the file ``disk`` was opened from, as it is now; refused when anything in it is out of bounds."""
    footer_start, raw, footer = _read_end_footer(disk)
    layout = VhdLayout(disk.image.file_size, raw, footer_start, footer.current_size, footer.disk_type)
    if footer.disk_type == DISK_FIXED:
        if footer_start < footer.current_size:
            raise corrupt(disk.path, "truncated: the fixed VHD is shorter than its size")
        return layout
    header = _read_dynamic_header(disk, footer, footer_start)
    _read_block_table(disk, layout, header)
    _check_placement(disk.path, layout, footer, header)
    return layout


def _read_end_footer(disk: VhdDisk) -> tuple[int, bytes, Footer]:
    path = disk.path
    # The footer must be at the end: the reader accepts a VHD with only the copy at
    # offset 0, but a file that lost its end is not one to add blocks to.
    found = end_footer(disk.image)
    if found is None:
        raise corrupt(path, "the VHD footer at the end of the file is missing")
    footer_start, raw = found
    footer = parse_footer(raw)
    if footer_checksum(raw) != footer.checksum:
        raise corrupt(path, "VHD footer checksum mismatch")
    if footer.saved_state:
        raise UnsupportedImage(
            path, "the VM this disk belongs to is in a saved state",
            "discard the saved state, or shut the VM down first",
        )
    if footer.current_size != disk.size or footer.disk_type != disk.disk_type:
        raise _changed(path)
    if footer.current_size == 0 or footer.current_size % SECTOR:
        raise corrupt(path, f"VHD current size {footer.current_size} is not a whole number of sectors")
    return footer_start, raw, footer


def _read_dynamic_header(disk: VhdDisk, footer: Footer, footer_start: int) -> DynamicHeader:
    path, at = disk.path, footer.data_offset
    if at < FOOTER_SIZE or at % SECTOR or at + HEADER_SIZE > footer_start:
        raise corrupt(path, f"VHD dynamic header offset {at} lies outside the file")
    raw = disk.image.read_exact(at, HEADER_SIZE, "VHD dynamic disk header")
    if raw[:8] != HEADER_COOKIE:
        raise corrupt(path, "VHD dynamic disk header not found")
    header = parse_dynamic_header(raw)
    if header_checksum(raw) != header.checksum:
        raise corrupt(path, "VHD dynamic disk header checksum mismatch")
    if header.block_size != disk.block_size:
        raise _changed(path)
    problem = block_table_problem(header, footer.current_size)
    if problem:
        raise corrupt(path, problem)
    return header


def _read_block_table(disk: VhdDisk, layout: VhdLayout, header: DynamicHeader) -> None:
    path, entries, table_offset = disk.path, header.max_table_entries, header.table_offset
    if BAT_ENTRY.size * entries > MAX_BAT_BYTES:
        raise UnsupportedImage(path, f"VHD block table of {entries} entries is larger than any real VHD's")
    if table_offset < FOOTER_SIZE or table_offset + BAT_ENTRY.size * entries > layout.footer_start:
        raise corrupt(path, "VHD block table lies outside the file")
    layout.block_size = header.block_size
    layout.bitmap_size = bitmap_size(header.block_size)
    if layout.bitmap_size == 0:
        # The spec pads a block's few bits of bitmap to a sector; qemu (and our reader) give it
        # none. Where readers disagree on where the data lies, nothing is written.
        raise UnsupportedImage(path, f"VHD block size {header.block_size} is below 4 KiB, for which readers "
                               "disagree where a block's data lies", "convert it to a VHD of 2 MiB blocks first")
    layout.table_offset = table_offset
    layout.entries = entries
    layout.bat = disk.image.read_exact(table_offset, BAT_ENTRY.size * entries, "VHD block table")


def _check_placement(path: str, layout: VhdLayout, footer: Footer, header: DynamicHeader) -> None:
    """Every structure lies before the footer, no block overlaps another structure or block, and
    the block table overlaps no other structure.

    A write into one must never land in another.
    """
    table_end = layout.table_offset + BAT_ENTRY.size * layout.entries
    reserved = [(0, FOOTER_SIZE, "the footer copy"),
                (footer.data_offset, footer.data_offset + HEADER_SIZE, "the dynamic header"),
                (layout.table_offset, table_end, "the block table")]
    if layout.disk_type == DISK_DIFFERENCING:
        for i, locator in enumerate(header.locators):
            if locator.platform_code == b"\0\0\0\0" or locator.data_length == 0:
                continue
            offset = locator.data_offset
            end = offset + -(-locator.data_length // SECTOR) * SECTOR
            if offset < FOOTER_SIZE or end > layout.footer_start:
                raise corrupt(path, f"VHD parent locator {i} lies outside the file")
            reserved.append((offset, end, f"parent locator {i}"))
    span = layout.bitmap_size + layout.block_size
    starts = sorted(
        sector * SECTOR for (sector,) in BAT_ENTRY.iter_unpack(layout.bat) if sector != UNALLOCATED
    )
    for start in starts:
        if start < FOOTER_SIZE or start + span > layout.footer_start:
            raise corrupt(path, f"a VHD block at offset {start} lies outside the file")
    for a, b in zip(starts, starts[1:]):
        if b - a < span:
            raise corrupt(path, f"VHD blocks at offsets {a} and {b} overlap")
    # A new block's BAT entry is written: it must land in the BAT alone (structures that are
    # only read may share bytes with each other). Each lies after the footer copy (checked above).
    for lo, hi, what in reserved[1:]:
        if what != "the block table" and lo < table_end and layout.table_offset < hi:
            raise corrupt(path, f"the block table and {what} overlap")
    for lo, hi, what in reserved:
        # The last block starting before ``hi`` is the only one that could overlap [lo, hi).
        i = bisect.bisect_left(starts, hi) - 1
        if i >= 0 and starts[i] + span > lo:
            raise corrupt(path, f"a VHD block at offset {starts[i]} overlaps {what}")
