"""Pending writes over a virtual disk: everything one operation changes, before it is committed.

Upper layers (libntfs-3g's device, hive edits, plain file copies) write into an
``Overlay`` and read back through it, so they see their own changes while the
image file is untouched. At commit the overlay is compared with the disk, one
logical sector at a time: a sector written back with the bytes it already held
is no change, so an operation repeated on an image it already changed commits
nothing. ``changes()`` is what a container writer (vhdtool.container.vhdx.writer,
the VHD copy writer) turns into one transaction; a dry run just reports it.

Large file contents are not held: ``write_source`` records that a range of the disk
holds a range of a local file (vhdtool.container.source), and reads of it read that
file. Every byte of the disk is then in exactly one place: a held page, else a
source range, else the base disk. Source ranges cover whole pages (their unaligned
ends go into pages), pages and source ranges never overlap, and a later write into a
source range takes that page out of it. ``changes()`` reports source ranges as
extents whose data is the SourceRange; they are not compared with the disk (the
editor skips a file that is already there before it writes it).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass

from vhdtool.container.source import SourceRange
from vhdtool.container.stream import DiskStream
from vhdtool.units import KiB

PAGE = 64 * KiB  # held in memory per touched page, read from the disk on first touch


@dataclass(frozen=True)
class Extent:
    """A run of changed logical sectors: ``data`` goes at virtual-disk ``offset``.

    ``data`` is bytes, or a SourceRange: the bytes of a local file, copied at commit."""

    offset: int
    data: bytes | SourceRange

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
        # Source ranges: their disk offsets (sorted, page-aligned, disjoint) and, by offset, the range.
        self._source_at: list[int] = []
        self._sources: dict[int, SourceRange] = {}
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
            end = min(start + PAGE, self.size)
            buf = bytearray(self._read_lower(start, end - start))
            self._cut_sources(start, end)  # the page holds these bytes from now on
            self._pages[page] = buf
        return buf

    def write_source(self, offset: int, data: SourceRange) -> None:
        """Say that ``data`` (a range of a local file) goes at virtual-disk ``offset``; nothing is read now
        but the few bytes of its ends that do not fill a whole page."""
        end = offset + len(data)
        if offset < 0 or end > self.size:
            raise ValueError(f"write of {len(data)} bytes at {offset} lies outside the {self.size}-byte disk")
        lo = min(-(-offset // PAGE) * PAGE, end)
        hi = max(end // PAGE * PAGE, lo)
        if end == self.size:
            hi = end  # the disk's last, short page
        if lo > offset:
            self.write_at(offset, bytes(data[: lo - offset]))
        if hi < end:
            self.write_at(hi, bytes(data[hi - offset :]))
        if hi <= lo:
            return
        for page in range(lo // PAGE, -(-hi // PAGE)):
            self._pages.pop(page, None)
        self._cut_sources(lo, hi)
        i = bisect.bisect_left(self._source_at, lo)
        self._source_at.insert(i, lo)
        self._sources[lo] = data[lo - offset : hi - offset]

    def _cut_sources(self, lo: int, hi: int) -> None:
        """Take [lo, hi) out of the source ranges (what is left of a range on either side stays)."""
        i = bisect.bisect_right(self._source_at, lo) - 1
        i = max(i, 0)
        while i < len(self._source_at):
            at = self._source_at[i]
            if at >= hi:
                break
            rng = self._sources[at]
            end = at + len(rng)
            if end <= lo:
                i += 1
                continue
            del self._source_at[i]
            del self._sources[at]
            if at < lo:
                self._source_at.insert(i, at)
                self._sources[at] = rng[: lo - at]
                i += 1
            if end > hi:
                self._source_at.insert(i, hi)
                self._sources[hi] = rng[hi - at :]
                i += 1

    def _read_lower(self, offset: int, length: int) -> bytes:
        """What lies under the pages: the source ranges over the base disk."""
        end = offset + length
        if not self._source_at:
            return self.base.read_at(offset, length)
        out = bytearray()
        pos = offset
        i = max(bisect.bisect_right(self._source_at, offset) - 1, 0)
        while pos < end:
            at = self._source_at[i] if i < len(self._source_at) else None
            if at is not None and at + len(self._sources[at]) <= pos:
                i += 1
                continue
            if at is None or at >= end:
                out += self.base.read_at(pos, end - pos)
                break
            if at > pos:
                out += self.base.read_at(pos, at - pos)
                pos = at
            rng = self._sources[at]
            n = min(end, at + len(rng)) - pos
            out += bytes(rng[pos - at : pos - at + n])
            pos += n
            i += 1
        return bytes(out)

    # -- reading (DiskStream) ------------------------------------------------------------
    def read_at(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        if not self._pages:
            return self._read_lower(offset, end - offset)
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
                out += self._read_lower(pos, run_end - pos)
                n = run_end - pos
            pos += n
        return bytes(out)

    def _close_backing(self) -> None:
        # The base disk belongs to whoever opened it, the sources to whoever opened them.
        self._pages.clear()
        self._source_at.clear()
        self._sources.clear()

    # -- what changed ----------------------------------------------------------------------
    def changes(self) -> list[Extent]:
        """Runs of logical sectors whose bytes differ from the base disk, and the source ranges, in disk order."""
        found = list(self._changed_runs()) + [Extent(at, self._sources[at]) for at in self._source_at]
        return sorted(found, key=lambda e: e.offset)

    def source_extents(self) -> list[Extent]:
        """The source ranges alone, in disk order."""
        return [Extent(at, self._sources[at]) for at in self._source_at]

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
        return bool(self._pages) or bool(self._source_at)
