"""What an inspection found, as frozen values, and the JSON schema ``vhdtool inspect --json`` prints.

``Inspection.to_dict()`` is that document (schema 1). The walk that fills these
values in is ``vhdtool.guest.discover``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vhdtool.guest.linux import LinuxFacts
from vhdtool.guest.windows import IntegrationServices, WindowsFacts
from vhdtool.volume import Partition

SCHEMA = 1


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

