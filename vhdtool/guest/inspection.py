"""Inspect an image: container, partitions, guest OS and its integration services.

``inspect(path)`` returns a frozen ``Inspection``; ``Inspection.to_dict()`` is the
JSON document ``vhdtool inspect --json`` prints (schema 1).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

from vhdtool.container import DiskStream, open_disk
from vhdtool.errors import EncryptedVolume, NoGuestFound, VhdtoolError
from vhdtool.filesystem import NtfsFilesystem, open_linux_filesystem, translate_errors
from vhdtool.guest.linux import LinuxFacts, is_linux_root, linux_facts
from vhdtool.guest.windows import IntegrationServices, WindowsFacts, WindowsGuest, find_config_dir
from vhdtool.volume import Partition, list_partitions, open_partition, sniff_filesystem

SCHEMA = 1
LINUX_FILESYSTEMS = ("ext4", "ext3", "ext2", "xfs")


@dataclass(frozen=True)
class ImageInfo:
    path: str
    format: str
    virtual_size: int
    block_size: int | None
    logical_sector_size: int
    physical_sector_size: int
    differencing: bool
    parent: str | None
    log_replayed: bool
    chain: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["chain"] = list(self.chain)
        return d


@dataclass(frozen=True)
class GuestInfo:
    os: str | None
    windows: WindowsFacts | None = None
    integration_services: IntegrationServices | None = None
    linux: LinuxFacts | None = None

    def to_dict(self) -> dict:
        return {
            "os": self.os,
            "windows": self.windows.to_dict() if self.windows else None,
            "integration_services": self.integration_services.to_dict() if self.integration_services else None,
            "linux": self.linux.to_dict() if self.linux else None,
        }


@dataclass(frozen=True)
class Inspection:
    image: ImageInfo
    partitions: tuple[Partition, ...]
    guest: GuestInfo
    warnings: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "image": self.image.to_dict(),
            "partitions": [p.to_dict() for p in self.partitions],
            "guest": self.guest.to_dict(),
            "warnings": list(self.warnings),
        }


def _image_info(disk: DiskStream) -> tuple[ImageInfo, list[str]]:
    chain = [d.path for d in disk.chain()]
    warnings = [w for d in disk.chain() for w in getattr(d, "warnings", [])]
    info = ImageInfo(
        path=disk.path,
        format=disk.format,
        virtual_size=disk.size,
        block_size=disk.block_size,
        logical_sector_size=disk.logical_sector_size,
        physical_sector_size=disk.physical_sector_size,
        differencing=disk.parent is not None,
        parent=disk.parent.path if disk.parent is not None else None,
        log_replayed=any(d.log_replayed for d in disk.chain()),
        chain=tuple(chain),
    )
    return info, warnings


def _linux_candidates(disk: DiskStream, partitions: list[Partition], path: str, warnings: list[str]):
    """(partition index, kind, stream, label) of every Linux filesystem, LVM volumes included."""
    for p in partitions:
        if p.filesystem in LINUX_FILESYSTEMS:
            yield p.index, p.filesystem, open_partition(disk, p), f"partition {p.index}"
        elif p.filesystem == "lvm2":
            try:
                with translate_errors(path, f"LVM on partition {p.index}"):
                    from dissect.volume.lvm import LVM2

                    lvm = LVM2(open_partition(disk, p))
                    volumes = [(lv.name, lv.open()) for lv in lvm.vg.lv if lv.is_visible]
            except VhdtoolError as e:
                warnings.append(e.problem)
                continue
            for name, stream in volumes:
                stream.seek(0)
                kind = sniff_filesystem(stream.read(8192))
                if kind in LINUX_FILESYSTEMS:
                    yield p.index, kind, stream, f"LVM volume {lvm.vg.name}/{name}"


def inspect_disk(disk: DiskStream) -> Inspection:
    path = disk.path
    image, warnings = _image_info(disk)
    partitions = list_partitions(disk, disk.logical_sector_size, path)
    disk_signature = None
    if partitions and partitions[0].table == "mbr":
        disk.seek(440)
        (disk_signature,) = struct.unpack("<I", disk.read(4))
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
        for index, kind, stream, label in _linux_candidates(disk, partitions, path, warnings):
            fs = open_linux_filesystem(stream, kind, path, label)
            if is_linux_root(fs):
                guest = GuestInfo(os="linux", linux=linux_facts(fs, index))
                break

    if guest is None:
        if encrypted:
            raise EncryptedVolume(path, "the guest's volume is BitLocker-encrypted and cannot be read")
        raise NoGuestFound(path, "no operating system found (no Windows system root, no Linux root filesystem)")
    return Inspection(image=image, partitions=tuple(partitions), guest=guest, warnings=tuple(warnings))


@dataclass(frozen=True)
class IoStats:
    """What inspecting cost in reads of the image files (the chain included)."""

    bytes_read: int
    reads: int


def inspect(path: str | os.PathLike) -> Inspection:
    """Inspect the image at ``path`` read-only; raises a VhdtoolError on bad input."""
    return inspect_measured(path)[0]


def inspect_measured(path: str | os.PathLike) -> tuple[Inspection, IoStats]:
    with open_disk(path) as disk:
        result = inspect_disk(disk)
        stats = IoStats(bytes_read=disk.bytes_read, reads=disk.reads)
    return result, stats
