"""The temp copy a VHD commit writes beside the image: its name, creating it, giving it the image's
owner, extended attributes and mode, and removing stale ones.

Its name is ``.<image name>.vhdtool-<16 hex>.tmp`` in the image's folder: never
the image's name, named by no parent locator, and enough on its own to tell it
for what it is (see vhdtool.container.vhd.writer, steps 2 and 3).
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import stat

from vhdtool.container.filecopy import unchanged_failure
from vhdtool.errors import ImageReadOnly, WriteFailed

TEMP_SUFFIX = re.compile(r"\.vhdtool-[0-9a-f]{16}\.tmp")


def temp_prefix(name: str) -> str:
    """What the names of the temps of the image named ``name`` start with."""
    # A long image name would make the temp's name too long for the filesystem: keep a
    # part of it and a digest of all of it, so that temps of two images never share a prefix.
    if len(name) > 200:
        name = f"{name[:150]}~{hashlib.sha256(name.encode('utf-8', 'surrogateescape')).hexdigest()[:16]}"
    return f".{name}"


def _is_our_temp(entry: str, prefix: str) -> bool:
    return entry.startswith(prefix) and TEMP_SUFFIX.fullmatch(entry[len(prefix) :]) is not None


def remove_stale_temps(folder: str, prefix: str, image: os.stat_result, locked_at: int) -> int:
    """Remove temps of ours for this image that a killed commit left; returns how many.

    Called only while this process holds the exclusive lock on the file the image's
    path names. A commit creates its temp only while it holds that lock on the
    file the path then names, and removes it (or renames it to be the image)
    before it lets the lock go; the path changes only by such a rename. So a temp
    for this image that exists now belongs to a process that died holding the
    lock. To be sure, only regular files last changed before this lock was taken
    are removed, never the image itself.
    """
    removed = 0
    try:
        entries = os.listdir(folder)
    except OSError:
        return 0
    for entry in entries:
        if not _is_our_temp(entry, prefix):
            continue
        path = os.path.join(folder, entry)
        try:
            st = os.lstat(path)
            if (not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) == (image.st_dev, image.st_ino)
                    or st.st_mtime_ns > locked_at):
                continue
            os.unlink(path)
            removed += 1
        except OSError:
            continue  # not ours to worry about: the commit does not depend on it
    return removed


def create_temp(folder: str, prefix: str, image_path: str) -> tuple[str, int]:
    """A new, empty temp file in ``folder``, readable and writable by this process only."""
    for _ in range(8):
        path = os.path.join(folder, f"{prefix}.vhdtool-{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            continue
        except PermissionError:
            raise ImageReadOnly(
                image_path, "its folder is not writable (a VHD is changed through a copy beside it)"
            ) from None
        except OSError as e:
            if e.errno == errno.EROFS:
                raise ImageReadOnly(image_path, "the image file is on a read-only filesystem") from None
            raise unchanged_failure(image_path, f"cannot create a temporary copy in its folder ({e.strerror})") from None
        return path, fd
    raise unchanged_failure(image_path, "cannot find a free name for the temporary copy")


def give_owner_and_mode(fd: int, src: int, like: os.stat_result, image_path: str) -> None:
    """The image's owner (when root; otherwise the copy is this user's), extended attributes (its ACL,
    labels, other tools' marks: read from ``src``, the image's descriptor) and permission bits."""
    try:
        if os.geteuid() == 0:
            os.fchown(fd, like.st_uid, like.st_gid)
        _copy_xattrs(src, fd, image_path)  # raises its own errors
        os.fchmod(fd, stat.S_IMODE(like.st_mode))  # after chown, which clears set-id bits, and the ACL
    except OSError as e:
        raise unchanged_failure(image_path, f"cannot give the changed copy the image's owner and mode ({e.strerror})") from None


def _copy_xattrs(src: int, dst: int, image_path: str) -> None:
    """``dst`` gets exactly ``src``'s extended attributes (one a folder's default ACL gave it goes)."""
    try:
        want = {name: os.getxattr(src, name) for name in os.listxattr(src)}
        have = os.listxattr(dst)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return  # a filesystem without extended attributes: nothing to keep
        raise unchanged_failure(image_path, f"cannot read the image's extended attributes ({e.strerror})") from None
    name = ""
    try:
        for name in have:
            if name not in want:
                os.removexattr(dst, name)
        for name, value in want.items():
            os.setxattr(dst, name, value)
    except OSError as e:
        raise WriteFailed(
            image_path, f"cannot give the changed copy the image's extended attribute {name} ({e.strerror})",
            "the image is unchanged; run as a user that may set it, or write the change to a copy with --output NEW",
        ) from None
