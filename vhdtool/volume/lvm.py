"""LVM2 physical volumes (dissect.volume): the visible logical volumes on a partition, as streams."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from vhdtool.errors import CorruptImage, translating


@dataclass(frozen=True)
class LogicalVolume:
    vg: str
    name: str
    stream: BinaryIO

    @property
    def label(self) -> str:
        return f"LVM volume {self.vg}/{self.name}"


def logical_volumes(pv: BinaryIO, image_path: str | None, label: str) -> Iterator[LogicalVolume]:
    """The visible logical volumes of the volume group on ``pv`` (a partition stream).

    Raises CorruptImage, naming ``label``, when the LVM metadata cannot be read.
    """
    with translating(CorruptImage, image_path, f"LVM on {label}"):
        from dissect.volume.lvm import LVM2

        lvm = LVM2(pv)
        volumes = [LogicalVolume(lvm.vg.name, lv.name, lv.open()) for lv in lvm.vg.lv if lv.is_visible]
    yield from volumes
