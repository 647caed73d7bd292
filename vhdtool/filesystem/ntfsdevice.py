"""A libntfs-3g ``struct ntfs_device`` (device.h) whose reads and writes go to one partition of an overlay.

libntfs-3g calls these operations (open, close, seek, read, write, pread, pwrite,
sync, stat, ioctl) through ctypes callbacks; byte ``pos`` of the volume is byte
``start + pos`` of the overlay. Every callback returns a failure value instead of
raising into C.
"""

from __future__ import annotations

import ctypes
import os
import stat
import struct
from collections.abc import Callable

from vhdtool.container.overlay import Overlay
from vhdtool.container.source import SourceRange

ND_OPEN = 1 << 0
BLKGETSIZE64 = 0x80081272

s64 = ctypes.c_int64
OPEN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
CLOSE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)
SEEK = ctypes.CFUNCTYPE(s64, ctypes.c_void_p, s64, ctypes.c_int)
READ = ctypes.CFUNCTYPE(s64, ctypes.c_void_p, ctypes.c_void_p, s64)
WRITE = ctypes.CFUNCTYPE(s64, ctypes.c_void_p, ctypes.c_void_p, s64)
PREAD = ctypes.CFUNCTYPE(s64, ctypes.c_void_p, ctypes.c_void_p, s64, s64)
PWRITE = ctypes.CFUNCTYPE(s64, ctypes.c_void_p, ctypes.c_void_p, s64, s64)
SYNC = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)
STAT = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
IOCTL = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p)


class DeviceOperations(ctypes.Structure):  # struct ntfs_device_operations
    _fields_ = [("open", OPEN), ("close", CLOSE), ("seek", SEEK), ("read", READ), ("write", WRITE),
                ("pread", PREAD), ("pwrite", PWRITE), ("sync", SYNC), ("stat", STAT), ("ioctl", IOCTL)]


class Device(ctypes.Structure):  # struct ntfs_device
    _fields_ = [("d_ops", ctypes.c_void_p), ("d_state", ctypes.c_ulong), ("d_name", ctypes.c_char_p),
                ("d_private", ctypes.c_void_p), ("d_heads", ctypes.c_int), ("d_sectors_per_track", ctypes.c_int)]


class OverlayDevice:
    """The callbacks of one ntfs_device: byte ``pos`` of the volume is ``start + pos`` of the overlay."""

    def __init__(self, overlay: Overlay, start: int, size: int,
                 free: Callable[[int, int], list[tuple[int, int]]] | None = None):
        self.overlay = overlay
        self.start = start
        self.size = size
        self.pos = 0
        # free(lo, hi): the byte ranges of the volume inside [lo, hi) that the old volume does not use.
        self.free = free
        # (address, length, SourceRange): a read-only mapping of a source that libntfs-3g is writing from.
        self.window: tuple[int, int, SourceRange] | None = None
        self.ops = DeviceOperations(
            OPEN(self._open), CLOSE(self._close), SEEK(self._seek), READ(self._read), WRITE(self._write),
            PREAD(self._pread), PWRITE(self._pwrite), SYNC(lambda _dev: 0), STAT(self._stat), IOCTL(self._ioctl),
        )

    def _open(self, dev, _flags):
        Device.from_address(dev).d_state |= ND_OPEN
        return 0

    def _close(self, dev):
        Device.from_address(dev).d_state &= ~ND_OPEN
        return 0

    def _seek(self, _dev, offset, whence):
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.size}.get(whence)
        if base is None or base + offset < 0:
            return -1
        self.pos = base + offset
        return self.pos

    def _pread(self, _dev, buf, count, offset):
        try:
            if count < 0 or offset < 0:
                return -1
            n = max(0, min(count, self.size - offset))
            data = self.overlay.read_at(self.start + offset, n) if n else b""
            ctypes.memmove(buf, data, len(data))
            return len(data)
        except Exception:  # noqa: BLE001 - never raise into C
            return -1

    def _pwrite(self, _dev, buf, count, offset):
        try:
            if count < 0 or offset < 0 or offset + count > self.size:
                return -1
            window = self.window
            if window is not None and buf and window[0] <= buf and buf + count <= window[0] + window[1]:
                self._write_mapped(window[2][buf - window[0] : buf - window[0] + count], offset)
            else:
                self.overlay.write_at(self.start + offset, ctypes.string_at(buf, count))
            return count
        except Exception:  # noqa: BLE001
            return -1

    def _write_mapped(self, data: SourceRange, offset: int) -> None:
        """A write from a source's mapping: where the old volume does not use the clusters, the overlay
        records the source range (nothing is copied); where it does (libntfs-3g reused clusters this
        session freed), the bytes are copied, so that the container writer logs them as any change."""
        pos = 0
        runs = self.free(offset, offset + len(data)) if self.free is not None else []
        for lo, hi in runs + [(offset + len(data), offset + len(data))]:
            if lo - offset > pos:
                self.overlay.write_at(self.start + offset + pos, bytes(data[pos : lo - offset]))
            if hi > lo:
                self.overlay.write_source(self.start + lo, data[lo - offset : hi - offset])
            pos = hi - offset

    def _read(self, dev, buf, count):
        n = self._pread(dev, buf, count, self.pos)
        if n > 0:
            self.pos += n
        return n

    def _write(self, dev, buf, count):
        n = self._pwrite(dev, buf, count, self.pos)
        if n > 0:
            self.pos += n
        return n

    def _stat(self, _dev, buf):
        # struct stat on LP64 Linux: st_mode at 24, st_size at 48.
        ctypes.memset(buf, 0, 144)
        struct.pack_into("<I", (ctypes.c_char * 144).from_address(buf), 24, stat.S_IFREG | 0o600)
        struct.pack_into("<q", (ctypes.c_char * 144).from_address(buf), 48, self.size)
        return 0

    def _ioctl(self, _dev, request, argp):
        if request == BLKGETSIZE64 and argp:
            ctypes.c_uint64.from_address(argp).value = self.size
            return 0
        return -1
