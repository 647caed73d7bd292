"""The image file opened for writing: an exclusive lock for the whole operation, every write and flush checked.

The lock is an open-file-description record lock over the whole file (Linux
F_OFD_SETLK): it conflicts with the byte-range locks QEMU takes on images it has
open, and it is not dropped when another descriptor of the same file closes (a
classic POSIX lock would be, and vhdtool reads the file through other
descriptors). A BSD flock is taken as well, for tools that use that instead.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct

from vhdtool.container.source import SourceRange, copy_range
from vhdtool.errors import ImageInUse, ImageNotFound, ImageReadOnly, NotADiskImage, WriteFailed

FALLOC_FL_KEEP_SIZE = 1  # linux/falloc.h: allocate without changing the file's size
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
# struct flock on LP64 Linux: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid.
FLOCK = struct.Struct("hh4xqqi4x")


class WritableFile:
    def __init__(self, path: str):
        self.path = path
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise ImageNotFound(path, "no such file") from None
        except PermissionError:
            raise ImageReadOnly(path, "the image file is not writable") from None
        except OSError as e:
            if e.errno == errno.EROFS:
                raise ImageReadOnly(path, "the image file is on a read-only filesystem") from None
            raise WriteFailed(path, f"cannot open it for writing ({e.strerror})") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise NotADiskImage(path, "is not a regular file")
        os.set_blocking(fd, True)
        self._fd = fd
        try:
            self._lock()
        except BaseException:
            os.close(fd)
            raise
        self.size = os.fstat(fd).st_size
        self.bytes_written = 0
        self.writes = 0
        self.flushes = 0

    def _lock(self) -> None:
        try:
            fcntl.fcntl(self._fd, F_OFD_SETLK, FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise ImageInUse(self.path, "another process has the image open (a running VM, qemu, another vhdtool)") from None
            raise WriteFailed(self.path, f"cannot lock it ({e.strerror})") from None

    def pwrite(self, offset: int, data: bytes | SourceRange) -> None:
        """All of ``data`` at ``offset``, or WriteFailed; a SourceRange is copied from its file, never held."""
        if isinstance(data, SourceRange):
            try:
                copy_range(self._fd, offset, data)
            except OSError as e:
                data.source.check_unchanged()  # cut short or rewritten meanwhile: SourceChanged, naming it
                raise WriteFailed(self.path, f"copying {len(data)} bytes of {data.source.label} to offset {offset} "
                                             f"failed ({e.strerror})") from None
            self._wrote(offset, len(data))
            return
        view = memoryview(data)
        pos = offset
        try:
            while view:
                n = os.pwrite(self._fd, view, pos)
                if n <= 0:
                    raise OSError(errno.EIO, "short write")
                view = view[n:]
                pos += n
        except OSError as e:
            raise WriteFailed(self.path, f"write of {len(data)} bytes at offset {offset} failed ({e.strerror})") from None
        self._wrote(offset, len(data))

    def _wrote(self, offset: int, length: int) -> None:
        self.bytes_written += length
        self.writes += 1
        self.size = max(self.size, offset + length)

    def reserve(self, ranges: list[tuple[int, int]]) -> None:
        """Allocate the file's blocks under each (offset, length) before anything is written there.

        A full host filesystem is then found before the commit writes anything (WriteFailed; the file's
        content is unchanged: fallocate only gives blocks to holes and to the space past the end, which the
        file's size, put back, hides again). Filesystems without fallocate skip this: their writes still
        fail cleanly, one step later."""
        from vhdtool.native.library import load_libc

        libc = load_libc(self.path)
        fallocate = libc.fallocate
        fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        before = os.fstat(self._fd).st_size
        for offset, length in sorted(ranges):
            if length <= 0:
                continue
            if fallocate(self._fd, FALLOC_FL_KEEP_SIZE, offset, length) != 0:
                err = ctypes.get_errno()
                if err in (errno.EOPNOTSUPP, errno.ENOSYS):
                    return
                try:
                    os.ftruncate(self._fd, before)  # drops what KEEP_SIZE allocated past the end
                except OSError:
                    pass
                raise WriteFailed(self.path, f"the disk holding it cannot give {length} bytes at offset {offset} "
                                             f"({os.strerror(err)})",
                                  "the image is unchanged; free space on the disk holding it, or write the change "
                                  "to a copy elsewhere with --output NEW")

    def pread(self, offset: int, length: int) -> bytes:
        try:
            return os.pread(self._fd, length, offset)
        except OSError as e:
            raise WriteFailed(self.path, f"read at offset {offset} failed ({e.strerror})") from None

    def truncate(self, size: int) -> None:
        try:
            os.ftruncate(self._fd, size)
        except OSError as e:
            raise WriteFailed(self.path, f"cannot extend it to {size} bytes ({e.strerror})") from None
        self.size = size

    def flush(self) -> None:
        """Everything written so far is on stable storage, or WriteFailed (an fsync error is never ignored)."""
        try:
            os.fsync(self._fd)
        except OSError as e:
            raise WriteFailed(self.path, f"flush failed ({e.strerror}); the image may need the log replayed") from None
        self.flushes += 1

    @property
    def closed(self) -> bool:
        return self._fd is None

    def stat(self) -> os.stat_result:
        """The locked file as it is now, whatever its path names since."""
        if self._fd is None:
            raise ValueError(f"{self.path} is closed")
        return os.fstat(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
