"""The walk: disk, then volumes, then filesystems, then the guest OS on one of them.

``inspect(path)`` opens the image read-only and returns a frozen ``Inspection``
(``vhdtool.guest.inspection``). The first NTFS volume holding a Windows system
root is the Windows guest; failing that, the first Linux root filesystem, LVM
logical volumes included; failing that, there is no guest (a data disk), which
is a report, not an error: the commands that need a guest refuse it themselves
(``require_guest``). ``survey_disk`` is the walk; ``inspect_disk`` adds the one
refusal an inspection cannot report past: no guest found, but a BitLocker volume
it may be on.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import BinaryIO, TypeVar

from vhdtool.container import DiskStream, open_disk
from vhdtool.errors import UnsupportedLayout, VhdtoolError
from vhdtool.filesystem import NtfsFilesystem, open_linux_filesystem
from vhdtool.filesystem.base import Filesystem
from vhdtool.guest.inspection import GuestInfo, ImageInfo, Inspection, IoStats, require_guest
from vhdtool.guest.windows import WindowsGuest, find_config_dir
from vhdtool.volume import Partition, list_partitions, mbr_disk_signature, open_partition, sniff_filesystem
from vhdtool.volume.lvm import logical_volumes

LINUX_FILESYSTEMS = ("ext4", "ext3", "ext2", "xfs")
T = TypeVar("T")


def image_info(disk: DiskStream) -> tuple[ImageInfo, list[str]]:
    """The container's facts, and the warnings each disk of the chain had."""
    chain = list(disk.chain())
    info = ImageInfo(
        path=disk.path,
        format=disk.format,
        virtual_size=disk.size,
        block_size=disk.block_size,
        logical_sector_size=disk.logical_sector_size,
        physical_sector_size=disk.physical_sector_size,
        differencing=disk.parent is not None,
        parent=disk.parent.path if disk.parent is not None else None,
        log_replayed=any(d.log_replayed for d in chain),
        chain=tuple(d.path for d in chain),
    )
    return info, [w for d in chain for w in getattr(d, "warnings", [])]


def linux_candidates(
    disk: DiskStream, partitions: list[Partition], path: str, warnings: list[str]
) -> Iterator[tuple[int, str, BinaryIO, str]]:
    """(partition index, kind, stream, label) of every Linux filesystem, LVM volumes included."""
    for p in partitions:
        if p.filesystem in LINUX_FILESYSTEMS:
            yield p.index, p.filesystem, open_partition(disk, p), f"partition {p.index}"
        elif p.filesystem == "lvm2":
            try:
                volumes = list(logical_volumes(open_partition(disk, p), path, f"partition {p.index}"))
            except VhdtoolError as e:
                warnings.append(e.problem)
                continue
            for lv in volumes:
                if lv.stream is None:
                    warnings.append(f"{lv.label} on partition {p.index} is {lv.layout} and cannot be read")
                    continue
                lv.stream.seek(0)
                kind = sniff_filesystem(lv.stream.read(8192))
                if kind in LINUX_FILESYSTEMS:
                    yield p.index, kind, lv.stream, lv.label


def survey_disk(disk: DiskStream) -> Inspection:
    """What the disk holds: its partitions, and the guest OS if there is one (``guest.os`` None if not)."""
    path = disk.path
    image, warnings = image_info(disk)
    partitions = list_partitions(disk, disk.logical_sector_size, path)
    disk_signature = mbr_disk_signature(disk, partitions)
    encrypted = [p for p in partitions if p.filesystem == "bitlocker"]
    if encrypted:
        warnings.append(
            "BitLocker-encrypted volume(s) on partition(s) " + ", ".join(str(p.index) for p in encrypted)
            + " cannot be read"
        )

    guest = None
    for p in partitions:
        if p.filesystem != "ntfs":
            continue
        fs = NtfsFilesystem(open_partition(disk, p), path, f"partition {p.index}")
        if not find_config_dir(fs):
            continue
        if guest is not None:
            warnings.append(f"another Windows installation on partition {p.index} was not inspected")
            continue
        win = WindowsGuest(fs, p, disk_signature, path, bool(encrypted))
        windows, ic = win.facts()
        warnings.extend(win.warnings)
        guest = GuestInfo(os="windows", windows=windows, integration_services=ic)

    if guest is None:
        from vhdtool.guest.linux import is_linux_root, linux_facts

        for index, kind, stream, label in linux_candidates(disk, partitions, path, warnings):
            fs = open_linux_filesystem(stream, kind, path, label)
            if is_linux_root(fs):
                guest = GuestInfo(os="linux", linux=linux_facts(fs, index))
                break

    return Inspection(image=image, partitions=tuple(partitions), guest=guest or GuestInfo(os=None),
                      warnings=tuple(warnings))


def inspect_disk(disk: DiskStream) -> Inspection:
    """``survey_disk``, refused when no guest was found and a BitLocker volume may hide it."""
    ins = survey_disk(disk)
    if any(p.filesystem == "bitlocker" for p in ins.partitions):
        require_guest(ins)  # raises EncryptedVolume when no guest was found
    return ins


def inspect(path: str | os.PathLike) -> Inspection:
    """Inspect the image at ``path`` read-only; raises a VhdtoolError on bad input."""
    return inspect_measured(path)[0]


def inspect_measured(path: str | os.PathLike) -> tuple[Inspection, IoStats]:
    with open_disk(path) as disk:
        result = inspect_disk(disk)
        stats = IoStats(bytes_read=disk.bytes_read, reads=disk.reads)
    return result, stats


def with_linux_root(path: str | os.PathLike, work: Callable[[Filesystem], T]) -> T:
    """``work(fs)`` on the image's first Linux root filesystem (the one ``inspect`` reports), read-only."""
    with open_disk(path) as disk:
        fs = find_linux_root(disk)
        if fs is not None:
            return work(fs)
    raise UnsupportedLayout(os.fspath(path), "the image has no Linux root filesystem", "see `vhdtool inspect`")


def find_linux_root(disk: DiskStream) -> Filesystem | None:
    """The disk's first Linux root filesystem (ext2/3/4 or XFS, LVM included), read-only; None for none."""
    from vhdtool.guest.linux import is_linux_root

    warnings: list[str] = []
    partitions = list_partitions(disk, disk.logical_sector_size, disk.path)
    for _index, kind, stream, label in linux_candidates(disk, partitions, disk.path, warnings):
        fs = open_linux_filesystem(stream, kind, disk.path, label)
        if is_linux_root(fs):
            return fs
    return None
