"""LVM2 physical volumes (dissect.volume): the visible logical volumes on a partition, as streams, and where
a linear one lies on its physical volume (the LVM2 metadata's segments: ``striped`` with one stripe)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from vhdtool.errors import CorruptImage, translating
from vhdtool.volume.mapping import Span, VolumeMap

SECTOR = 512  # LVM2 metadata counts extent_size and pe_start in 512-byte sectors


@dataclass(frozen=True)
class LogicalVolume:
    vg: str
    name: str
    stream: BinaryIO | None  # None: a non-linear volume dissect.volume cannot read (on another PV, thin...)
    # Where the volume lies on its physical volume (offsets from the PV's start), when it is linear;
    # else None and ``layout`` says what it is (striped, mirror, thin, a snapshot's origin...).
    pv_map: VolumeMap | None = None
    layout: str = "linear"

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
        origins = _snapshot_origins(lvm.vg)
        volumes = []
        for lv in lvm.vg.lv:
            if not lv.is_visible:
                continue
            pv_map, layout = _linear_map(lvm.vg, lv, pv)
            if lv.name in origins:
                pv_map, layout = None, "the origin of a snapshot"
            volumes.append(LogicalVolume(lvm.vg.name, lv.name, _open(lv, pv_map), pv_map, layout))
    yield from volumes


def _open(lv, pv_map: VolumeMap | None) -> BinaryIO | None:
    """dissect.volume's stream of ``lv``; a non-linear volume it cannot read is None, not the end of the walk."""
    if pv_map is not None:
        return lv.open()
    try:
        return lv.open()
    except Exception:  # noqa: BLE001 - dissect.volume raises anything on layouts it does not implement
        return None


def _snapshot_origins(vg) -> set[str]:
    return {getattr(s, "origin", None) for lv in vg.lv for s in lv.segments if s.type == "snapshot"} - {None}


def _linear_map(vg, lv, pv: BinaryIO) -> tuple[VolumeMap | None, str]:
    """The runs of ``pv`` that hold ``lv``, when every segment is one stripe on this PV; else (None, what it is).

    A segment's extents are contiguous on the PV: logical extent ``start_extent + i`` is physical
    extent ``first + i``, physical extent ``e`` at byte ``pe_start + e * extent_size`` of the PV."""
    extent = vg.extent_size * SECTOR
    spans, at = [], 0
    for seg in sorted(lv.segments, key=lambda s: s.start_extent):
        stripes = getattr(seg, "stripes", None) or []
        if seg.type not in ("striped", "linear") or seg.flags or len(stripes) != 1:
            return None, seg.type if len(stripes) <= 1 else f"striped over {len(stripes)} stripes"
        pv_name, first = stripes[0]
        here = vg.physical_volumes.get(pv_name)
        size = getattr(pv, "size", None)
        if here is None or here.dev is None or here.dev.fh is not pv:
            return None, "spread over more than one physical volume"
        if seg.start_extent * extent != at or seg.extent_count <= 0 or first < 0 or extent <= 0:
            return None, "made of segments with gaps between them or damaged"
        start = here.pe_start * SECTOR + first * extent
        length = seg.extent_count * extent
        if size is not None and start + length > size:
            return None, "longer than its physical volume"
        spans.append(Span(at, length, start))
        at += length
    if not spans:
        return None, "empty"
    return VolumeMap(tuple(spans)), "linear"
