"""Opening a disk chain: the format probe, parent resolution, the depth limit, the linkage check.

One place for both formats. A disk says whether it needs a parent, where its
locator says the parent is (``parent_paths``), and whether a given parent is the
one it was made from (``attach_parent``: VHDX parent_linkage against the parent's
DataWriteGuid, MS-VHDX 2.6.2.6.3; VHD parent Unique Id against the parent's
footer). This module finds the file, opens it the same way, and closes everything
it opened if any link fails.
"""

from __future__ import annotations

import ntpath
import os

from vhdtool.container.imagefile import ImageFile
from vhdtool.container.stream import DiskStream
from vhdtool.errors import CorruptImage, MissingParent, NotADiskImage, UnsupportedImage

MAX_PARENT_DEPTH = 16  # Hyper-V itself refuses chains far shorter than a hostile file could make
VHDX_SIGNATURE = b"vhdxfile"


def probe(path: str) -> str:
    """"vhdx" or "vhd", by the file's content, not its name."""
    from vhdtool.container.vhd import looks_like_vhd

    image = ImageFile(path)
    try:
        if image.raw_pread(0, len(VHDX_SIGNATURE)) == VHDX_SIGNATURE:
            return "vhdx"
        if looks_like_vhd(image):
            return "vhd"
        if image.file_size == 0:
            raise NotADiskImage(path, "is empty")
        raise NotADiskImage(path, "not a VHDX or VHD image")
    finally:
        image.close()


def open_one(path: str) -> DiskStream:
    """One image file of either format, without its parent."""
    if probe(path) == "vhdx":
        from vhdtool.container.vhdx import VhdxDisk

        return VhdxDisk(path)
    from vhdtool.container.vhd import VhdDisk

    return VhdDisk(path)


def open_image(path: str | os.PathLike) -> DiskStream:
    """The disk at ``path`` with its whole parent chain, read-only."""
    return _open_chain(os.fspath(path), [])


def _open_chain(path: str, children: list[str]) -> DiskStream:
    disk = open_one(path)
    try:
        if disk.needs_parent:
            if len(children) >= MAX_PARENT_DEPTH:
                raise UnsupportedImage(disk.path, f"differencing chain deeper than {MAX_PARENT_DEPTH}")
            found = find_parent(disk)
            here = os.path.realpath(disk.path)
            if os.path.realpath(found) in [*children, here]:
                raise CorruptImage(disk.path, f"the differencing chain loops: its parent {found} is one of its own children")
            parent = _open_chain(found, [*children, here])
            try:
                disk.attach_parent(parent)
            except BaseException:
                parent.close()
                raise
    except BaseException:
        disk.close()
        raise
    return disk


def find_parent(disk: DiskStream) -> str:
    """The parent's file: each path the locator gives (relative ones against the child's folder),
    then the same file name beside the child, since a Windows path means nothing here."""
    here = os.path.dirname(os.path.abspath(disk.path))
    paths = disk.parent_paths()
    candidates = []
    for value, relative in paths:
        if relative:
            candidates.append(os.path.normpath(os.path.join(here, value.replace("\\", "/"))))
        candidates.append(os.path.join(here, ntpath.basename(value)))
    found = next((c for c in candidates if os.path.isfile(c)), None)
    if found is None:
        named = paths[0][0] if paths else "?"
        raise MissingParent(disk.path, f"parent disk {named} not found")
    return found
