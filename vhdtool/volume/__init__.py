"""Volume layer: MBR and GPT partitions of a disk stream (dissect.volume), and what each holds.

A partition is handed upward as a ``RangeStream`` over the disk; the filesystem on
it is named from its signature, never from the partition type alone.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO
from uuid import UUID

from dissect.util.stream import RangeStream
from dissect.volume.disk import Disk
from dissect.volume.exceptions import DiskError

from vhdtool.errors import CorruptImage, NoPartitionTable, UnsupportedLayout, translating

# Windows dynamic disks (LDM): MBR type 0x42, GPT LDM metadata/data partitions.
LDM_MBR_TYPE = 0x42
LDM_GPT_TYPES = {UUID("5808c8aa-7e8f-42e0-85d2-e1e90434cfb3"), UUID("af9b60a0-1431-4f62-bc68-3311714a69ad")}
MBR_EXTENDED_TYPES = {0x05, 0x0F, 0x85}
MBR_DISK_SIGNATURE_OFFSET = 440
GPT_TYPE_NAMES = {
    UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b"): "efi",
    UUID("e3c9e316-0b5c-4db8-817d-f92df00215ae"): "msr",
    UUID("ebd0a0a2-b9e5-4433-87c0-68b6b72699c7"): "basic-data",
    UUID("de94bba4-06d1-4d40-a16a-bfd50179d6ac"): "windows-recovery",
    UUID("0fc63daf-8483-4772-8e79-3d69d8477de4"): "linux",
    UUID("e6d6d379-f507-44c2-a23c-238f2a3df928"): "linux-lvm",
    UUID("0657fd6d-a4ab-43c4-84e5-0933c84b4f4f"): "linux-swap",
    UUID("21686148-6449-6e6f-744e-656564454649"): "bios-boot",
}


@dataclass(frozen=True)
class Partition:
    index: int
    table: str  # "mbr" | "gpt"
    offset: int
    size: int
    type: str  # "0x07" for MBR, a GPT type GUID's name or the GUID itself
    guid: str | None  # GPT unique partition GUID
    filesystem: str | None  # "ntfs", "fat", "ext4", "ext3", "ext2", "xfs", "btrfs", "lvm2", "bitlocker", "swap", None
    bootable: bool = False

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "table": self.table,
            "offset": self.offset,
            "size": self.size,
            "type": self.type,
            "guid": self.guid,
            "filesystem": self.filesystem,
        }


# Btrfs: the superblock at 64 KiB, its magic 64 bytes in (btrfs on-disk format, "Superblock"). Named
# so that writes can refuse it clearly; vhdtool does not read it.
BTRFS_MAGIC_AT = 0x10040
BTRFS_MAGIC = b"_BHRfS_M"


def sniff_filesystem(head: bytes) -> str | None:
    """Name the filesystem from the first 8 KiB of a volume."""
    if head[3:11] == b"NTFS    ":
        return "ntfs"
    if head[3:11] == b"-FVE-FS-":
        return "bitlocker"
    if head[:4] == b"XFSB":
        return "xfs"
    if any(head[s : s + 8] == b"LABELONE" for s in range(0, 2048, 512)):
        return "lvm2"
    if len(head) >= 1024 + 100 and head[1080:1082] == b"\x53\xef":
        compat, incompat = struct.unpack_from("<II", head, 1024 + 92)
        if incompat & 0x40:  # EXTENTS
            return "ext4"
        return "ext3" if compat & 0x4 else "ext2"  # HAS_JOURNAL
    if head[510:512] == b"\x55\xaa" and (head[54:59] in (b"FAT12", b"FAT16") or head[82:87] == b"FAT32"):
        return "fat"
    if len(head) >= 4096 and head[4086:4096] in (b"SWAPSPACE2", b"SWAP-SPACE"):
        return "swap"
    return None


def list_partitions(disk: BinaryIO, sector_size: int = 512, path: str | None = None) -> list[Partition]:
    """Partitions of ``disk`` (MBR or GPT). Raises if there is no table or it is LDM."""
    with translating(CorruptImage, path, "partition table is damaged"):
        try:
            disk.seek(0)
            parsed = Disk(disk, sector_size=sector_size)
        except DiskError:
            raise NoPartitionTable(path, "no partition table (neither MBR nor GPT)") from None
    scheme = type(parsed.scheme).__name__.lower()
    if scheme not in ("mbr", "gpt"):
        raise NoPartitionTable(path, f"unsupported partition table {scheme}", "only MBR and GPT are read")
    size = getattr(disk, "size", None)
    out = []
    for p in parsed.partitions:
        if scheme == "mbr":
            ptype = int(p.type)
            if ptype == LDM_MBR_TYPE:
                raise UnsupportedLayout(path, "Windows dynamic disk (LDM)", "convert it to a basic disk in the guest")
            type_name = f"0x{ptype:02x}"
            guid = None
            if ptype in MBR_EXTENDED_TYPES or ptype == 0:
                continue
        else:
            t = p.type if isinstance(p.type, UUID) else UUID(str(p.type))
            if t in LDM_GPT_TYPES:
                raise UnsupportedLayout(path, "Windows dynamic disk (LDM)", "convert it to a basic disk in the guest")
            type_name = GPT_TYPE_NAMES.get(t, str(t))
            guid = str(p.guid) if p.guid is not None else None
        psize = p.size
        if scheme == "gpt" and p.raw is not None:
            # UEFI 5.3.3: EndingLBA is inclusive. dissect.volume 3.x leaves the last sector out.
            psize = (p.raw.last_lba - p.raw.first_lba + 1) * sector_size
        if psize <= 0 or (size is not None and p.offset >= size):
            continue
        psize = min(psize, size - p.offset) if size is not None else psize
        disk.seek(p.offset)
        head = disk.read(8192)
        kind = sniff_filesystem(head)
        if kind is None and psize > BTRFS_MAGIC_AT + 8:
            disk.seek(p.offset + BTRFS_MAGIC_AT)
            kind = "btrfs" if disk.read(8) == BTRFS_MAGIC else None
        out.append(
            Partition(
                index=int(p.number),
                table=scheme,
                offset=int(p.offset),
                size=int(psize),
                type=type_name,
                guid=guid,
                filesystem=kind,
                bootable=bool(scheme == "mbr" and (p.flags or 0) & 0x80),
            )
        )
    return out


def open_partition(disk: BinaryIO, part: Partition) -> BinaryIO:
    return RangeStream(disk, part.offset, part.size, align=4096)


def mbr_disk_signature(disk: BinaryIO, partitions: list[Partition]) -> int | None:
    """The MBR's 32-bit disk signature (offset 440), which Windows' MountedDevices names MBR volumes by."""
    if not partitions or partitions[0].table != "mbr":
        return None
    disk.seek(MBR_DISK_SIGNATURE_OFFSET)
    data = disk.read(4)
    return struct.unpack("<I", data)[0] if len(data) == 4 else None
