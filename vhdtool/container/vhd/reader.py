"""Legacy VHD (Virtual Hard Disk Image Format Specification, 2006): the virtual disk as a stream.

The virtual size is the footer's Current Size (what Hyper-V presents), parsed
here, not a CHS-derived figure; the footer checksum is verified before libvhdi
sees the file. libvhdi opens the file and gives the parent locators and
identifiers; the data is read here.

The block layout (BAT of big-endian sector numbers; each block a 512-byte-aligned
sector bitmap, most significant bit first, then the data) is small enough to read
directly, and reading it here is what makes large reads fast: libvhdi reads a
dynamic disk a 512-byte sector at a time (a 1 GiB file compared through it took a
minute). Differencing VHDs had to be read here anyway: libvhdi 20260901 reads a
sector bitmap bit as ``byte >> (7 - bit)`` without masking, so every sector after
a present one in the same bitmap byte counts as present and reads the child's
(zero) data instead of the parent's.
"""

from __future__ import annotations

import os

from vhdtool.container.bitmap import bitmap_span, present_runs
from vhdtool.container.imagefile import ImageFile, PagedTable
from vhdtool.container.stream import DiskStream
from vhdtool.container.vhd.structs import (
    BAT_ENTRY,
    DISK_DIFFERENCING,
    DISK_DYNAMIC,
    DISK_FIXED,
    FOOTER_COOKIE,
    FOOTER_SIZE,
    HEADER_COOKIE,
    HEADER_SIZE,
    SECTOR,
    SHORT_FOOTER_SIZE,
    UNALLOCATED,
    Footer,
    bitmap_size,
    block_table_problem,
    footer_checksum,
    parse_dynamic_header,
    parse_footer,
)
from vhdtool.errors import CorruptImage, NotADiskImage, UnsupportedImage, first_line


def _footer_at(image: ImageFile, offset: int) -> bytes | None:
    if offset < 0:
        return None
    data = image.raw_pread(offset, FOOTER_SIZE)
    return data if data[:8] == FOOTER_COOKIE else None


def end_footer(image: ImageFile) -> tuple[int, bytes] | None:
    """(offset, 512 bytes) of the footer at the end of the file, a 511-byte one padded with a zero; None if none."""
    for length in (FOOTER_SIZE, SHORT_FOOTER_SIZE):
        at = image.file_size - length
        data = _footer_at(image, at)
        if data is not None:
            return at, data.ljust(FOOTER_SIZE, b"\0")
    return None


def looks_like_vhd(image: ImageFile) -> bool:
    return end_footer(image) is not None or image.raw_pread(0, 8) == FOOTER_COOKIE


class VhdDisk(DiskStream):
    format = "vhd"

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        import pyvhdi

        self.path = os.fspath(path)
        self.warnings: list[str] = []
        self.image = ImageFile(self.path)
        self._vhdi = None
        try:
            footer = self._read_footer()
            self.size = footer.current_size
            self.disk_type = footer.disk_type
            self.unique_id = footer.unique_id
            if self.disk_type not in (DISK_FIXED, DISK_DYNAMIC, DISK_DIFFERENCING):
                raise UnsupportedImage(self.path, f"unknown VHD disk type {self.disk_type}")
            if self.size == 0 or self.size % SECTOR:
                raise CorruptImage(self.path, f"VHD current size {self.size} is not a whole number of sectors")
            if self.disk_type == DISK_FIXED and self.image.file_size < self.size + SHORT_FOOTER_SIZE:
                raise CorruptImage(self.path, "truncated: the fixed VHD is shorter than its size")
            if self.disk_type != DISK_FIXED:
                self._read_dynamic_header(footer)
            self._vhdi = pyvhdi.file()
            try:
                # libvhdi reads through our ImageFile so that reads are counted.
                self._vhdi.open_file_object(_CountingFile(self.image))
            except (OSError, IOError) as e:
                raise CorruptImage(self.path, f"libvhdi cannot open it ({first_line(e)})") from None
        except BaseException:
            self._close_backing()
            raise

    def _read_footer(self) -> Footer:
        found = end_footer(self.image)
        if found is not None:
            footer = found[1]
        else:
            # A dynamic disk keeps a copy of the footer at offset 0.
            footer = _footer_at(self.image, 0)
            if footer is None:
                raise NotADiskImage(self.path, "not a VHD (no footer)")
            self.warnings.append("the VHD footer at the end of the file is missing; using its copy at offset 0")
            footer = footer.ljust(FOOTER_SIZE, b"\0")
        parsed = parse_footer(footer)
        if footer_checksum(footer) != parsed.checksum:
            raise CorruptImage(self.path, "VHD footer checksum mismatch")
        return parsed

    def _read_dynamic_header(self, footer: Footer) -> None:
        raw = self.image.raw_pread(footer.data_offset, HEADER_SIZE)
        if len(raw) != HEADER_SIZE or raw[:8] != HEADER_COOKIE:
            raise CorruptImage(self.path, "truncated or damaged VHD dynamic disk header")
        header = parse_dynamic_header(raw)
        problem = block_table_problem(header, self.size)
        if problem:
            raise CorruptImage(self.path, problem)
        entries = header.max_table_entries
        if header.table_offset + BAT_ENTRY.size * entries > self.image.file_size:
            raise CorruptImage(self.path, "truncated: the VHD block table lies beyond the end of the file")
        self.block_size = header.block_size
        self._table = PagedTable(self.image, header.table_offset, entries, BAT_ENTRY, "VHD block table")
        self._bitmap_size = bitmap_size(header.block_size)

    def _block_sector(self, block: int) -> int | None:
        """File sector where ``block`` starts (its bitmap), or None when not allocated."""
        sector = self._table[block]
        return None if sector == UNALLOCATED else sector

    # -- the parent (opened by vhdtool.container.chain) ----------------------------
    @property
    def needs_parent(self) -> bool:
        return self.disk_type == DISK_DIFFERENCING

    def parent_paths(self) -> list[tuple[str, bool]]:
        """The parent's name as libvhdi gives it from the parent locators, tried relative to this file first."""
        named = self._vhdi.get_parent_filename()
        return [(named, True)] if named else []

    @property
    def identifier(self) -> str:
        """This disk's identifier (the footer's Unique Id) as libvhdi gives it, which a child's header names."""
        return str(self._vhdi.get_identifier())

    def attach_parent(self, parent: DiskStream) -> None:
        """Check the parent is a VHD with the unique id this disk was made from (footer Unique Id), and use it."""
        if not isinstance(parent, VhdDisk):
            raise UnsupportedImage(self.path, f"parent {parent.path} is not a VHD")
        want = self._vhdi.get_parent_identifier()
        if want and str(want).lower() != parent.identifier.lower():
            raise CorruptImage(
                self.path, f"parent {parent.path} is not the disk this one was made from (identifier mismatch)"
            )
        self.parent = parent

    def read_at(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        if self.disk_type == DISK_FIXED:
            # The data is the file's first ``size`` bytes (checked against the file's size on open).
            return self.image.read_exact(offset, end - offset, "VHD data")
        return self._read_blocks(offset, end)

    def _read_blocks(self, offset: int, end: int) -> bytes:
        """A dynamic or differencing disk's bytes, one block's run at a time.

        A block the table does not allocate reads as zeros (dynamic) or from the parent
        (differencing). An allocated block of a dynamic disk is read from its data, after its
        sector bitmap, in one read: the bitmap is not consulted, since a clear bit means a sector
        never written, whose bytes on disk are zeros (the spec, "Block Bitmap"), as libvhdi and
        QEMU read them too. A differencing disk's bitmap says which sectors are its own."""
        differencing = self.disk_type == DISK_DIFFERENCING
        parts: list[bytes] = []  # joined once at the end (a read within one block is returned as read)
        bs = self.block_size
        pos = offset
        while pos < end:
            block, within = divmod(pos, bs)
            n = min(bs - within, end - pos)
            start = self._block_sector(block)
            if start is None:
                parts.append(self.parent.read_at(pos, n).ljust(n, b"\0") if differencing else bytes(n))
            elif differencing:
                parts.append(self._read_partial(block, start * SECTOR, within, n))
            else:
                parts.append(self.image.read_exact(start * SECTOR + self._bitmap_size + within, n, f"VHD block {block}"))
            pos += n
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _read_partial(self, block: int, start: int, within: int, n: int) -> bytes:
        first_byte, length = bitmap_span(within, within + n, SECTOR)
        bitmap = self.image.read_exact(start + first_byte, length, "VHD sector bitmap")
        data_start = start + self._bitmap_size
        base = block * self.block_size
        out = bytearray()
        for lo, hi, present in present_runs(bitmap, first_byte, within, within + n, SECTOR, msb_first=True):
            if present:
                out += self.image.read_exact(data_start + lo, hi - lo, f"VHD block {block}")
            else:
                out += self.parent.read_at(base + lo, hi - lo).ljust(hi - lo, b"\0")
        return bytes(out)

    def _close_backing(self) -> None:
        if self._vhdi is not None:
            try:
                self._vhdi.close()
            except (OSError, IOError):
                pass
            self._vhdi = None
        self.image.close()


class _CountingFile:
    """The minimal file object libvhdi's Python binding needs, reading through ImageFile."""

    def __init__(self, image: ImageFile):
        self._image = image
        self._pos = 0

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = max(0, self._image.file_size - self._pos)
        data = self._image.raw_pread(self._pos, size)
        self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            self._pos = offset
        elif whence == os.SEEK_CUR:
            self._pos += offset
        else:
            self._pos = self._image.file_size + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def get_size(self) -> int:
        return self._image.file_size

    def close(self) -> None:
        pass
