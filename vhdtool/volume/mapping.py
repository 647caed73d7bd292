"""Where a volume's bytes lie on the virtual disk: a partition is one span, a linear LVM volume one per segment."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from dissect.util.stream import MappingStream, RangeStream


@dataclass(frozen=True)
class Span:
    """Bytes [volume_offset, volume_offset + length) of the volume are at ``disk_offset`` of the disk."""

    volume_offset: int
    length: int
    disk_offset: int


@dataclass(frozen=True)
class VolumeMap:
    """A volume as contiguous runs of the disk, in volume order, with no gap and no overlap."""

    spans: tuple[Span, ...]

    def __post_init__(self):
        at = 0
        for s in self.spans:
            if s.volume_offset != at or s.length <= 0 or s.disk_offset < 0:
                raise ValueError(f"volume spans must follow each other from 0: {self.spans}")
            at += s.length

    @classmethod
    def whole(cls, disk_offset: int, size: int) -> VolumeMap:
        """A volume that is one run of the disk (a partition)."""
        return cls((Span(0, size, disk_offset),))

    def shifted(self, delta: int) -> VolumeMap:
        """The same volume on a disk where its container (a physical volume) starts ``delta`` bytes in."""
        return VolumeMap(tuple(Span(s.volume_offset, s.length, s.disk_offset + delta) for s in self.spans))

    @property
    def size(self) -> int:
        last = self.spans[-1]
        return last.volume_offset + last.length

    def pieces(self, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        """(disk offset, position in the request, length) of each run that [offset, offset + length) of the
        volume covers; ValueError when the range leaves the volume."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"{length} bytes at {offset} lie outside the {self.size}-byte volume")
        done = 0
        for s in self.spans:
            if done == length:
                return
            lo = offset + done
            if lo >= s.volume_offset + s.length:
                continue
            n = min(length - done, s.volume_offset + s.length - lo)
            yield s.disk_offset + lo - s.volume_offset, done, n
            done += n

    def disk_ranges(self) -> list[tuple[int, int]]:
        """The disk's [start, end) runs that hold the volume."""
        return [(s.disk_offset, s.disk_offset + s.length) for s in self.spans]

    def holds(self, disk_offset: int, length: int) -> bool:
        """Whether [disk_offset, disk_offset + length) of the disk lies inside one run of the volume."""
        return any(lo <= disk_offset and disk_offset + length <= hi for lo, hi in self.disk_ranges())

    def open(self, disk: BinaryIO) -> BinaryIO:
        """The volume as a stream over ``disk``."""
        if len(self.spans) == 1:
            return RangeStream(disk, self.spans[0].disk_offset, self.size, align=4096)
        stream = MappingStream(align=4096)
        for s in self.spans:
            stream.add(s.volume_offset, s.length, disk, s.disk_offset)
        return stream
