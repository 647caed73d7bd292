"""Copying an image file: a reflink clone where the filesystem offers one, else only its data extents.

Used where a whole image is copied: the VHD writer's copy that replaces the
original when complete, and --output. The holes of a sparse image stay holes, so
a 127 GiB dynamic image with a few hundred MiB of data costs that much I/O.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable
from dataclasses import dataclass

from vhdtool.errors import WriteFailed
from vhdtool.units import MiB

COPY_CHUNK = 64 * MiB  # one copy_file_range call at most
PLAIN_CHUNK = 1 * MiB  # read/write fallback, all-zero chunks left as holes
FICLONE = 0x40049409  # _IOW(0x94, 9, int)


UNCHANGED = "the image is unchanged; check the disk holding it (free space, I/O errors) and run the command again"


def unchanged_failure(path: str, problem: str) -> WriteFailed:
    """A failure before anything replaced or changed the image: the original is as it was."""
    return WriteFailed(path, problem, UNCHANGED)


_NOT_SUPPORTED = {errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EPERM}


@dataclass
class Copied:
    how: str  # "reflink", "copy_file_range" or "read/write"
    bytes: int = 0  # bytes this process copied (0 for a reflink)
    calls: int = 0


def copy_file(
    src: int, dst: int, size: int, image_path: str, reflink: bool = True, why: str = "the copy needs the space",
    progress: Callable[[int], None] | None = None,
) -> Copied:
    """The whole of ``src`` into the empty ``dst``: shared extents if possible, else its data extents.

    ``progress(position)`` is told how far through the file the copy is, holes included.
    """

    def failed(e: OSError, what: str) -> WriteFailed:
        return unchanged_failure(image_path, f"copying it failed ({what}: {e.strerror})")

    if reflink:
        try:
            fcntl.ioctl(dst, FICLONE, src)
            return Copied("reflink", 0, 1)
        except OSError as e:
            if e.errno not in _NOT_SUPPORTED:
                raise failed(e, "reflink") from None
    copied = Copied("copy_file_range")
    _check_space(src, dst, image_path, why)
    try:
        os.ftruncate(dst, size)  # the holes of the source stay holes
    except OSError as e:
        raise failed(e, "extend") from None
    use_cfr = hasattr(os, "copy_file_range")
    pos = 0
    while pos < size:
        try:
            data = os.lseek(src, pos, os.SEEK_DATA)
            hole = min(os.lseek(src, data, os.SEEK_HOLE), size)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break  # only a hole from here on
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise unchanged_failure(image_path, f"reading it failed ({e.strerror})") from None
            data, hole = pos, size  # no SEEK_DATA here: all of it is data
        while data < hole:
            n = min(hole - data, COPY_CHUNK)
            done = 0
            if use_cfr:
                try:
                    done = os.copy_file_range(src, dst, n, data, data)
                except OSError as e:
                    if e.errno not in _NOT_SUPPORTED:
                        raise failed(e, "copy_file_range") from None
                    use_cfr = False
                    copied.how = "read/write"
            if not use_cfr:
                done = _copy_plain(src, dst, data, min(n, PLAIN_CHUNK), failed)
            if done <= 0:
                raise unchanged_failure(image_path, f"copying it failed (the image ended early at offset {data})")
            copied.bytes += done
            copied.calls += 1
            data += done
            if progress is not None:
                progress(data)
        pos = hole
    return copied


def _check_space(src: int, dst: int, image_path: str, why: str) -> None:
    """Refuse before copying when the folder cannot hold a second copy of the image's data."""
    try:
        need = os.fstat(src).st_blocks * 512
        fs = os.fstatvfs(dst)
    except OSError:
        return  # no figures: the copy itself will say if space runs out
    free = (fs.f_bfree if os.geteuid() == 0 else fs.f_bavail) * fs.f_frsize
    if need > free:
        raise WriteFailed(
            image_path,
            f"the target folder has {free // MiB} MiB free; {why} ({need // MiB} MiB of data)",
            "the image is unchanged; free space there, or write the change to a copy elsewhere with --output NEW",
        )


def _copy_plain(src: int, dst: int, offset: int, n: int, failed) -> int:
    try:
        chunk = os.pread(src, n, offset)
    except OSError as e:
        raise failed(e, "read") from None
    if chunk and chunk.count(0) != len(chunk):  # an all-zero chunk stays a hole
        view = memoryview(chunk)
        pos = offset
        while view:
            try:
                w = os.pwrite(dst, view, pos)
            except OSError as e:
                raise failed(e, "write") from None
            if w <= 0:
                raise failed(OSError(errno.EIO, "short write"), "write")
            view, pos = view[w:], pos + w
    return len(chunk)
