"""What an inspection found, as frozen values, and the JSON schema ``vhdtool inspect --json`` prints.

``Inspection.to_dict()`` is that document (schema 1). The walk that fills these
values in is ``vhdtool.guest.discover``. A disk without an operating system (a data
disk) is an inspection too, with ``guest.os`` None; ``require_guest`` is the refusal
of the commands that need a guest (plan, stage, services, status, writes without
``--partition``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vhdtool.errors import EncryptedVolume, NoGuestFound, UnsupportedLayout
from vhdtool.guest.windows import IntegrationServices, WindowsFacts
from vhdtool.volume import Partition

if TYPE_CHECKING:  # a Windows guest's inspection (and every edit) does without the Linux side
    from vhdtool.guest.linux import LinuxFacts

SCHEMA = 1
NO_GUEST = "no operating system found (no Windows system root, no Linux root filesystem)"


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


@dataclass(frozen=True)
class IoStats:
    """What inspecting cost in reads of the image files (the chain included)."""

    bytes_read: int
    reads: int



def require_guest(inspection: Inspection, hint: str | None = None) -> Inspection:
    """``inspection`` when it found a guest; otherwise the refusal of a command that needs one."""
    if inspection.guest.os is not None:
        return inspection
    path = inspection.image.path
    if any(p.filesystem == "bitlocker" for p in inspection.partitions):
        # The guest may well be on the volume that cannot be read.
        raise EncryptedVolume(path, "the guest's volume is BitLocker-encrypted and cannot be read")
    btrfs = [p.index for p in inspection.partitions if p.filesystem == "btrfs"]
    if btrfs:
        # A Linux guest may well be on it: say so, rather than that the disk holds no system.
        raise UnsupportedLayout(path, f"partition {btrfs[0]} holds Btrfs, which vhdtool neither reads nor writes",
                                "vhdtool reads NTFS, ext2/3/4 and XFS guests and writes NTFS and ext2/3/4")
    raise NoGuestFound(path, NO_GUEST, hint)
