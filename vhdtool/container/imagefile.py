"""Read-only access to an image file: positioned reads, a byte counter, and an overlay.

The overlay holds what a pending VHDX log would write (MS-VHDX 2.3.3): on a
read-only open the log is replayed into memory, never into the file, so the file's
bytes and mtime stay as they were. Every read of the image goes through ``pread``
here, which is also where the bytes read from disk are counted.
"""

from __future__ import annotations

import os
import stat
import struct

from vhdtool.errors import CorruptImage, ImageNotFound, NotADiskImage


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISCHR, "a character device")):
        if test(mode):
            return name
    return "a special file"


class ImageFile:
    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below.
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise ImageNotFound(self.path, "no such file") from None
        except IsADirectoryError:
            raise NotADiskImage(self.path, "is a directory") from None
        except PermissionError:
            raise ImageNotFound(self.path, "permission denied", "check the file's permissions") from None
        except OSError as e:
            raise ImageNotFound(self.path, f"cannot open ({e.strerror})") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise NotADiskImage(self.path, f"is {_kind(st.st_mode)}, not a file")
        os.set_blocking(fd, True)
        self._fd = fd
        self.file_size = st.st_size
        # Size the image is treated as having: a replayed log may extend it (2.3.3).
        self.size = st.st_size
        self.bytes_read = 0
        self.reads = 0
        # (file_offset, data or None for zeros, length), applied in order.
        self._overlay: list[tuple[int, bytes | None, int]] = []

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def closed(self) -> bool:
        return self._fd is None

    def fileno(self) -> int:
        """The open descriptor (a sandboxed child that reads the image keeps it open)."""
        if self._fd is None:
            raise ValueError(f"{self.path} is closed")
        return self._fd

    def stat(self) -> os.stat_result:
        """The open file as it is now, whatever its path names since."""
        return os.fstat(self.fileno())

    def raw_pread(self, offset: int, length: int) -> bytes:
        """Bytes of the file itself, ignoring the overlay; short at end of file."""
        if offset < 0 or length < 0:
            raise CorruptImage(self.path, f"invalid read at offset {offset}")
        if length == 0 or offset >= self.file_size:
            return b""
        try:
            data = os.pread(self._fd, length, offset)
        except OSError as e:
            raise CorruptImage(self.path, f"read failed at offset {offset} ({e.strerror})") from None
        self.bytes_read += len(data)
        self.reads += 1
        return data

    def pread(self, offset: int, length: int) -> bytes:
        """Bytes as the image reads after log replay; short only past ``size``."""
        data = self.raw_pread(offset, length)
        end = min(offset + length, self.size)
        if len(data) < end - offset:
            # Past the physical end but inside what the log says the file spans.
            data += bytes(end - offset - len(data))
        if self._overlay:
            data = self._apply_overlay(offset, data)
        return data

    def read_exact(self, offset: int, length: int, what: str) -> bytes:
        data = self.pread(offset, length)
        if len(data) != length:
            raise CorruptImage(
                self.path,
                f"truncated: {what} at offset {offset} needs {length} bytes, the file ends at {self.size}",
            )
        return data

    def add_overlay(self, offset: int, data: bytes | None, length: int) -> None:
        self._overlay.append((offset, data, length))
        self.size = max(self.size, offset + length)

    def extend_to(self, size: int) -> None:
        self.size = max(self.size, size)

    def _apply_overlay(self, offset: int, data: bytes) -> bytes:
        end = offset + len(data)
        buf = None
        for o_off, o_data, o_len in self._overlay:
            lo = max(offset, o_off)
            hi = min(end, o_off + o_len)
            if lo >= hi:
                continue
            if buf is None:
                buf = bytearray(data)
            if o_data is None:
                buf[lo - offset : hi - offset] = bytes(hi - lo)
            else:
                buf[lo - offset : hi - offset] = o_data[lo - o_off : hi - o_off]
        return bytes(buf) if buf is not None else data


class PagedTable:
    """A table of fixed-size entries in the image (a BAT), read one 4 KiB page at a time on first use.

    Reading page by page keeps what an open costs independent of the disk's size.
    """

    PAGE = 4096

    def __init__(self, image: ImageFile, offset: int, count: int, entry: struct.Struct, what: str):
        self.image = image
        self.offset = offset
        self.count = count
        self.what = what
        self._entry = entry
        self._per_page = self.PAGE // self._entry.size
        self._pages: dict[int, bytes] = {}

    def __getitem__(self, index: int) -> int:
        page = index // self._per_page
        data = self._pages.get(page)
        if data is None:
            start = page * self._per_page
            n = min(self._per_page, self.count - start)
            size = self._entry.size
            data = self.image.read_exact(self.offset + start * size, n * size, self.what)
            self._pages[page] = data
        return self._entry.unpack_from(data, (index % self._per_page) * self._entry.size)[0]
