"""The image files around an edit: differencing disks that depend on one, copies for --output, digests."""

from __future__ import annotations

import hashlib
import os
import shutil

from vhdtool.container.chain import find_parent, open_one
from vhdtool.container.filecopy import copy_file
from vhdtool.container.source import Source
from vhdtool.errors import VhdtoolError, WriteFailed

IMAGE_SUFFIXES = (".vhdx", ".avhdx", ".vhd", ".avhd")
MAX_SIBLINGS = 4096  # differencing disks looked at in the image's folder


def dependent_children(image: str) -> list[str]:
    """Differencing disks in ``image``'s folder whose parent locator resolves to ``image``.

    When ``image`` is a symlink, both the folder it lies in (where a child beside it names it)
    and the folder of the file it resolves to are looked at."""
    here = os.path.realpath(image)
    found = []
    for folder in dict.fromkeys((os.path.dirname(os.path.abspath(image)), os.path.dirname(here))):
        found += _children_in(folder, here)
    return found


def _children_in(folder: str, here: str) -> list[str]:
    found = []
    try:
        names = sorted(os.listdir(folder))[:MAX_SIBLINGS]
    except OSError:
        return []
    for name in names:
        path = os.path.join(folder, name)
        if not name.lower().endswith(IMAGE_SUFFIXES) or os.path.realpath(path) == here or not os.path.isfile(path):
            continue
        try:
            disk = open_one(path)
        except VhdtoolError:
            continue
        try:
            if disk.needs_parent and os.path.realpath(find_parent(disk)) == here:
                found.append(path)
        except VhdtoolError:
            pass
        finally:
            disk.close()
    return found


def digest(data: bytes | Source) -> str:
    """The SHA-256 of what is to be written; a large local file is read for it with a bar on a terminal."""
    if not isinstance(data, Source):
        return hashlib.sha256(data).hexdigest()
    from vhdtool.progress import NO_PROGRESS, bar

    with bar(f"reading {os.path.basename(data.label)}", data.size) as progress:
        return data.sha256(progress=None if progress is NO_PROGRESS else progress)


def copy_image(src: str, dst: str) -> None:
    """Copy the image ``src`` to ``dst`` (which exists, empty), sparse or as a reflink, with a
    progress bar on a terminal when it takes long (vhdtool.progress)."""
    from vhdtool.progress import NO_PROGRESS, bar

    shutil.copymode(src, dst)
    with open(src, "rb") as fi, open(dst, "r+b") as fo:
        size = os.fstat(fi.fileno()).st_size
        # The thread keeps the bar's time running through the flush, and through a long
        # copy_file_range call; nothing forks during the copy.
        with bar(f"copying {os.path.basename(src)}", size) as progress, progress.ticking():
            copy_file(fi.fileno(), fo.fileno(), size, src, why="--output needs a copy of the image's data",
                      progress=None if progress is NO_PROGRESS else progress)
            try:
                os.fsync(fo.fileno())
            except OSError as e:
                raise WriteFailed(dst, f"flushing the copy failed ({e.strerror})") from None
