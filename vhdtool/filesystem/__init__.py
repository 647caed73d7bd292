"""Filesystem layer: reading files on a volume, whatever the filesystem; writing NTFS and ext2/3/4.

Reads: NTFS through dissect.ntfs, ext2/3/4 through dissect.extfs, XFS through dissect.xfs.
Writes: NTFS through libntfs-3g, ext2/3/4 through libext2fs, into an overlay
(vhdtool.filesystem.ntfs3g, vhdtool.filesystem.ext2fs).
Each is wrapped in the same small interface (``exists``, ``is_dir``, ``listdir``,
``open``, ``read``) and every error of the library below becomes a
``CorruptFilesystem`` naming the image.
"""

from __future__ import annotations

from vhdtool.filesystem.base import Filesystem, translate_errors
from vhdtool.filesystem.linuxfs import open_linux_filesystem
from vhdtool.filesystem.ntfs import NtfsFilesystem

__all__ = ["Filesystem", "NtfsFilesystem", "open_linux_filesystem", "translate_errors"]
