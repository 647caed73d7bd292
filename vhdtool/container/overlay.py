"""Pending writes over a virtual disk: everything one operation changes, before it is committed.

Upper layers (libntfs-3g's device, hive edits, plain file copies) write into an
``Overlay`` and read back through it, so they see their own changes while the
image file is untouched. At commit the overlay is compared with the disk, one
logical sector at a time: a sector written back with the bytes it already held
is no change, so an operation repeated on an image it already changed commits
nothing. ``changes()`` is what a container writer (vhdtool.container.vhdx.writer,
the VHD copy writer) turns into one transaction; a dry run just reports it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from vhdtool.container.stream import DiskStream
from vhdtool.units import KiB

PAGE = 64 * KiB  # held in memory per touched page, read from the disk on first touch


@dataclass(frozen=True)
class Extent:
    """A run of changed logical sectors: ``data`` goes at virtual-disk ``offset``."""

    offset: int
    data: bytes

    @property
    def end(self) -> int:
        return self.offset + len(self.data)


@dataclass(frozen=True)
class CommitResult:
    """What committing an overlay's changes wrote to the image file."""

    bytes_written: int
    writes: int
    flushes: int
    log_replayed: bool = False  # VHDX: a pending log was replayed into the file first
    log_moved: bool = False  # VHDX: the log moved to a larger region


class Overlay(DiskStream):
    """A writable view of ``base``: reads see pending writes, the base disk is never written."""

    def __init__(self, base: DiskStream):
        super().__init__()
        self.base = base
        self.path = base.path
        self.format = base.format
        self.size = base.size
        self.block_size = base.block_size
        self.logical_sector_size = base.logical_sector_size
        self.physical_sector_size = base.physical_sector_size
        self._pages: dict[int, bytearray] = {}
        # Virtual-disk ranges whose old content nothing in the old state can reach (clusters the
        # volume's old $Bitmap marks free): a writer may put new data there before its log.
        self._unreachable: list[tuple[int, int]] = []

    def mark_unreachable(self, offset: int, length: int) -> None:
        """Say that no structure of the disk's old state points into [offset, offset + length)."""
        if length > 0:
            self._unreachable.append((offset, offset + length))

    def unreachable(self) -> list[tuple[int, int]]:
        """The marked ranges, merged and sorted."""
        merged: list[list[int]] = []
        for lo, hi in sorted(self._unreachable):
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        return [(lo, hi) for lo, hi in merged]

    # -- writing -----------------------------------------------------------------------
    def write_at(self, offset: int, data: bytes) -> None:
        """Put ``data`` at virtual-disk ``offset``; it must lie inside the disk."""
        if offset < 0 or offset + len(data) > self.size:
            raise ValueError(f"write of {len(data)} bytes at {offset} lies outside the {self.size}-byte disk")
        view = memoryview(data)
        pos = offset
        while view:
            page, within = divmod(pos, PAGE)
            n = min(PAGE - within, len(view))
            self._page(page)[within : within + n] = view[:n]
            view = view[n:]
            pos += n

    def _page(self, page: int) -> bytearray:
        buf = self._pages.get(page)
        if buf is None:
            start = page * PAGE
            buf = bytearray(self.base.read_at(start, min(PAGE, self.size - start)))
            self._pages[page] = buf
        return buf

    # -- reading (DiskStream) ------------------------------------------------------------
    def read_at(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        if not self._pages:
            return self.base.read_at(offset, end - offset)
        out = bytearray()
        pos = offset
        while pos < end:
            page, within = divmod(pos, PAGE)
            n = min(PAGE - within, end - pos)
            held = self._pages.get(page)
            if held is not None:
                out += held[within : within + n]
            else:
                # Unheld pages in one read from the base: gather the run up to the next held page.
                run_end = pos + n
                while run_end < end and (run_end // PAGE) not in self._pages:
                    run_end = min(end, run_end + PAGE)
                out += self.base.read_at(pos, run_end - pos)
                n = run_end - pos
            pos += n
        return bytes(out)

    def _close_backing(self) -> None:
        # The base disk belongs to whoever opened it.
        self._pages.clear()

    # -- what changed ----------------------------------------------------------------------
    def changes(self) -> list[Extent]:
        """Runs of logical sectors whose bytes differ from the base disk, in disk order."""
        return list(self._changed_runs())

    def _changed_runs(self) -> Iterator[Extent]:
        sector = self.logical_sector_size
        run_start, run = None, bytearray()
        for page in sorted(self._pages):
            held = self._pages[page]
            start = page * PAGE
            base = self.base.read_at(start, len(held))
            for s in range(0, len(held), sector):
                new = held[s : s + sector]
                here = start + s
                if new != base[s : s + sector]:
                    if run_start is not None and run_start + len(run) == here:
                        run += new
                    else:
                        if run_start is not None:
                            yield Extent(run_start, bytes(run))
                        run_start, run = here, bytearray(new)
        if run_start is not None:
            yield Extent(run_start, bytes(run))

    @property
    def touched(self) -> bool:
        return bool(self._pages)
