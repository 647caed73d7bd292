"""VHDX writer: one operation's changes to the virtual disk, committed as one crash-atomic transaction.

Everything is decided before the file is opened for writing: ``plan_commit`` maps
the overlay's changed extents onto the image as read (the pending log replayed in
memory) and says what will be appended and what will be logged. ``commit`` then
writes, in this order; the comment at each step says why stopping there is safe:

 0. A log left by a crash is replayed into the file first, as Hyper-V does:
    its writes applied, flushed, its LogGuid cleared, flushed.
 1. Header update: new FileWriteGuid and DataWriteGuid (MS-VHDX 2.2.2: before the
    first write of the session, before the first change of virtual-disk data).
 2. New payload blocks and sector bitmap blocks are appended at the end of the
    file, 1 MiB aligned; data the overlay marks unreachable (clusters the old
    volume's $Bitmap marks free) is written in place, inside blocks already
    allocated; all of it flushed. Nothing in the old state points at any of it,
    so the old state reads as before (ordered mode, as ext4 journals data=ordered:
    the data first, then the metadata that makes it reachable, through the log).
 3. The log sequence holding every in-place change (BAT entries, sector
    bitmaps, data in blocks already allocated) is written under a fresh LogGuid
    at the start of the log region (or of a larger region appended at the end of
    the file when it does not fit), and flushed. No header names it yet.
 4. Header update: LogGuid set (and LogOffset/LogLength when the log moved),
    flushed. From here any reader replays the sequence: the operation has happened.
 5. The logged writes are applied in place and flushed.
 6. Header update: LogGuid cleared, flushed. The log is retired.

A header update writes the older of the two header slots with the next sequence
number and flushes it (2.2.2.1): a torn write leaves that slot's CRC wrong and
the other, still valid header current. Every write and every flush is checked;
the first failure stops the commit with WriteFailed, and what is on disk is then
the state of the last completed step, which the table above says is consistent.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from vhdtool.container.overlay import CommitResult, Extent
from vhdtool.container.source import Source, SourceRange, pieces
from vhdtool.container.vhdx.bat import encode_entry
from vhdtool.container.vhdx.header import ZERO_GUID, VhdxHeader
from vhdtool.container.vhdx.log import pending_sequence
from vhdtool.container.vhdx.logwriter import LoggedWrite, build_sequence, sequence_size
from vhdtool.container.vhdx.reader import VhdxDisk
from vhdtool.container.vhdx.structs import (
    BAT_ENTRY,
    HEADER,
    HEADER_SECTION_SIZE,
    HEADER_OFFSETS,
    HEADER_SIGNATURE,
    HEADER_SIZE,
    LOG_SECTOR_SIZE,
    PAYLOAD_BLOCK_FULLY_PRESENT,
    PAYLOAD_BLOCK_NOT_PRESENT,
    PAYLOAD_BLOCK_PARTIALLY_PRESENT,
    SB_BLOCK_PRESENT,
    SECTORS_PER_BITMAP_BLOCK,
    Header,
    checksum_zeroed,
)
from vhdtool.container.writefile import WritableFile
from vhdtool.errors import CorruptImage, UnsupportedImage
from vhdtool.units import MiB

FULL_BAT_CHECK = 16 * MiB  # BATs up to this size are checked whole for blocks that share file space
ALLOCATED = (PAYLOAD_BLOCK_FULLY_PRESENT, PAYLOAD_BLOCK_PARTIALLY_PRESENT)


@dataclass
class CommitPlan:
    """What a commit will write, decided on the read-only view before anything is opened for writing."""

    appended: list[tuple[int, int, list[tuple[int, bytes]]]] = field(default_factory=list)
    """(file offset, length, [(offset in it, bytes)]) of each new 1 MiB-aligned block; the rest of it is zeros."""
    logged: list[LoggedWrite] = field(default_factory=list)
    direct: list[tuple[int, bytes | SourceRange]] = field(default_factory=list)
    """(file offset, bytes) written in place before the log: nothing of the old state reaches them."""
    end_of_file: int = 0  # the file's size once the new blocks are appended

    def written_ranges(self) -> list[tuple[int, int]]:
        """(file offset, length) of every byte step 2 and step 5 write: what ``reserve`` allocates first."""
        out = [(offset + within, len(data)) for offset, _length, pieces in self.appended for within, data in pieces]
        out += [(offset, len(data)) for offset, data in self.direct]
        out += [(w.file_offset, w.length) for w in self.logged]
        return out

    def sources(self) -> list[Source]:
        """The local files whose bytes step 2 copies."""
        found = {}
        for data in [d for _o, _l, pieces in self.appended for _w, d in pieces] + [d for _o, d in self.direct]:
            if isinstance(data, SourceRange):
                found[id(data.source)] = data.source
        return list(found.values())

    @property
    def empty(self) -> bool:
        return not self.appended and not self.logged and not self.direct

    @property
    def write_size(self) -> int:
        """Bytes ``VhdxCommit.run`` writes: three header updates, the new blocks' data, the direct
        writes, the log sequence and the logged writes applied (a pending log replayed comes on top)."""
        return (3 * HEADER_SIZE
                + sum(len(data) for _offset, _length, pieces in self.appended for _within, data in pieces)
                + sum(len(data) for _offset, data in self.direct)
                + sequence_size(self.logged) + sum(w.length for w in self.logged))


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


class _Planner:
    """Maps changed virtual-disk extents onto one VHDX file (2.4 sector bitmaps, 2.5 BAT)."""

    def __init__(self, disk: VhdxDisk, unreachable: list[tuple[int, int]] = ()):
        self.disk = disk
        self.unreachable = list(unreachable)
        self.geometry = disk.geometry
        self.lss = disk.logical_sector_size
        self.end = _round_up(disk.image.size, MiB)
        self.plan = CommitPlan()
        self.in_place: dict[int, bytearray] = {}  # 4 KiB-aligned file offset -> new sector contents
        self.bat: dict[int, int] = {}  # BAT index -> new raw entry
        self.new_bitmaps: dict[int, tuple[int, bytearray]] = {}  # chunk -> (file offset, bitmap block)
        self.targets: dict[int, tuple[int, int]] = {}  # BAT index written into in place -> (file offset, length)

    def _append(self, length: int) -> int:
        offset = self.end
        self.end += _round_up(length, MiB)
        return offset

    def _file_sector(self, offset: int) -> bytearray:
        base = offset - offset % LOG_SECTOR_SIZE
        sector = self.in_place.get(base)
        if sector is None:
            sector = self.in_place[base] = bytearray(self.disk.image.read_exact(base, LOG_SECTOR_SIZE, "a sector to log"))
        return sector

    def _write_in_place(self, file_offset: int, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            sector = self._file_sector(file_offset + pos)
            within = (file_offset + pos) % LOG_SECTOR_SIZE
            n = min(LOG_SECTOR_SIZE - within, len(data) - pos)
            sector[within : within + n] = data[pos : pos + n]
            pos += n

    def _bitmap_bits(self, chunk: int, first_sector: int, count: int) -> None:
        """Mark chunk sectors [first_sector, first_sector + count) present (2.4: bit s % 8 of byte s // 8)."""
        state, offset = self.disk.bat[self.geometry.bitmap_index(chunk)]
        if state == SB_BLOCK_PRESENT:
            target = None
            self.targets[self.geometry.bitmap_index(chunk)] = (offset, MiB)
        elif chunk in self.new_bitmaps:
            target = self.new_bitmaps[chunk][1]
        else:
            # A new sector bitmap block: all zero (every sector from the parent) but ours.
            offset = self._append(MiB)
            target = bytearray(MiB)
            self.new_bitmaps[chunk] = (offset, target)
            self.bat[self.geometry.bitmap_index(chunk)] = encode_entry(SB_BLOCK_PRESENT, offset)
        for s in range(first_sector, first_sector + count):
            if target is not None:
                target[s // 8] |= 1 << (s % 8)
            else:
                byte = self._file_sector(offset + s // 8)
                byte[(offset + s // 8) % LOG_SECTOR_SIZE] |= 1 << (s % 8)

    def _split_unreachable(self, virtual: int, data: bytes) -> list[tuple[int, bytes, bool]]:
        """(offset in data, bytes, unreachable?) runs of a piece at virtual-disk ``virtual``."""
        out, pos, end = [], 0, len(data)
        for lo, hi in self.unreachable:
            if hi <= virtual + pos or lo >= virtual + end:
                continue
            a, b = max(lo - virtual, pos), min(hi - virtual, end)
            if a > pos:
                out.append((pos, data[pos:a], False))
            out.append((a, data[a:b], True))
            pos = b
        if pos < end:
            out.append((pos, data[pos:], False))
        return out

    def add_block(self, block: int, pieces: list[tuple[int, bytes]]) -> None:
        """``pieces``: (offset within the block, bytes) of one payload block's changes."""
        index = self.geometry.payload_index(block)
        state, file_offset = self.disk.bat[index]
        bs = self.disk.block_size
        differencing = self.disk.has_parent
        chunk = block // self.geometry.chunk_ratio
        chunk_first_sector = (block * bs - chunk * SECTORS_PER_BITMAP_BLOCK * self.lss) // self.lss
        if state in (PAYLOAD_BLOCK_FULLY_PRESENT, PAYLOAD_BLOCK_PARTIALLY_PRESENT):
            # Allocated: data nothing old can reach goes straight in; the rest through the log.
            self.targets[index] = (file_offset, bs)
            for within, data in pieces:
                for at, run, unreachable in self._split_unreachable(block * bs + within, data):
                    if unreachable:
                        self.plan.direct.append((file_offset + within + at, run))
                    else:
                        # A local file's bytes over clusters the old volume uses (libntfs-3g reused
                        # what this session freed) go through the log like any other change.
                        self._write_in_place(file_offset + within + at, bytes(run))
                if state == PAYLOAD_BLOCK_PARTIALLY_PRESENT:
                    self._bitmap_bits(chunk, chunk_first_sector + within // self.lss, len(data) // self.lss)
            return
        # Not allocated: a new block at the end of the file. In a differencing disk a
        # block the parent supplies becomes partially present, holding only what
        # changed; anything else reads as zeros, so the new block is zeros and changes.
        new_offset = self._append(bs)
        self.plan.appended.append((new_offset, bs, pieces))
        if differencing and state == PAYLOAD_BLOCK_NOT_PRESENT:
            for within, data in pieces:
                self._bitmap_bits(chunk, chunk_first_sector + within // self.lss, len(data) // self.lss)
            self.bat[index] = encode_entry(PAYLOAD_BLOCK_PARTIALLY_PRESENT, new_offset)
        else:
            self.bat[index] = encode_entry(PAYLOAD_BLOCK_FULLY_PRESENT, new_offset)

    def check_targets(self) -> None:
        """Refuse to write in place into a block that shares file space with anything else (2.5.1).

        The reader follows a BAT entry wherever it points, but a write there would also
        change what the other structure holds: the header section, the BAT, the metadata,
        the log, or another block. Each block written is checked against the regions and
        against every allocated block of the BAT (whole BATs up to FULL_BAT_CHECK bytes;
        beyond that, against the blocks this commit writes).
        """
        d = self.disk
        h = d.header
        spans = [(0, HEADER_SECTION_SIZE, "the header section"),
                 (d.bat_region.file_offset, d.bat_region.file_offset + d.bat_region.length, "the BAT"),
                 (d.metadata_region.file_offset, d.metadata_region.file_offset + d.metadata_region.length,
                  "the metadata region")]
        if h.log_length:
            spans.append((h.log_offset, h.log_offset + h.log_length, "the log"))
        owners: dict[int, tuple[int, int]] = {}  # file offset -> (BAT index, length) of allocated blocks
        if self.geometry.entries * BAT_ENTRY.size <= FULL_BAT_CHECK:
            for i in range(self.geometry.entries):
                state, offset = d.bat[i]
                is_bitmap = (i + 1) % (self.geometry.chunk_ratio + 1) == 0
                if (state == SB_BLOCK_PRESENT if is_bitmap else state in ALLOCATED) and offset:
                    owners.setdefault(offset, (i, MiB if is_bitmap else d.block_size))
        for index, (offset, length) in sorted(self.targets.items()):
            for lo, hi, what in spans:
                if offset < hi and lo < offset + length:
                    raise CorruptImage(d.path, f"BAT entry {index} points into {what}; writing there would damage it")
            for other, (o_off, o_len) in self.targets.items():
                if other != index and offset < o_off + o_len and o_off < offset + length:
                    raise CorruptImage(d.path, f"BAT entries {index} and {other} share file space")
            # Another block overlaps this one if it starts inside it, or less than a block before it.
            for at in range(max(0, offset - d.block_size + MiB), offset + length, MiB):
                owner, owner_length = owners.get(at, (index, 0))
                if owner != index and at < offset + length and offset < at + owner_length:
                    raise CorruptImage(d.path, f"BAT entries {index} and {owner} share file space")

    def finish(self) -> CommitPlan:
        self.check_targets()
        bat_base = self.disk.bat_region.file_offset
        for index, raw in self.bat.items():
            self._write_in_place(bat_base + index * BAT_ENTRY.size, BAT_ENTRY.pack(raw))
        for chunk, (offset, bitmap) in self.new_bitmaps.items():
            self.plan.appended.append((offset, MiB, [(0, bytes(bitmap))]))
        self.plan.appended.sort()
        # Contiguous logged sectors become one write, so one descriptor run per extent.
        runs: list[LoggedWrite] = []
        for base in sorted(self.in_place):
            data = bytes(self.in_place[base])
            if runs and runs[-1].file_offset + runs[-1].length == base:
                last = runs.pop()
                runs.append(LoggedWrite(last.file_offset, last.length + LOG_SECTOR_SIZE, last.data + data))
            else:
                runs.append(LoggedWrite(base, LOG_SECTOR_SIZE, data))
        self.plan.logged = runs
        self.plan.end_of_file = self.end if self.plan.appended else self.disk.image.size
        self.plan.direct.sort()
        return self.plan


def plan_commit(disk: VhdxDisk, changes: list[Extent], unreachable: list[tuple[int, int]] = ()) -> CommitPlan:
    """Where each changed extent goes in the file: appended blocks, direct writes, logged in-place writes.

    ``unreachable``: virtual-disk ranges no structure of the old state points into.
    """
    if disk.parent is None and disk.has_parent:
        raise UnsupportedImage(disk.path, "a differencing disk is written only with its parent chain open")
    planner = _Planner(disk, unreachable)
    bs = disk.block_size
    per_block: dict[int, list[tuple[int, bytes]]] = defaultdict(list)
    for extent in changes:
        pos = extent.offset
        while pos < extent.end:
            block, within = divmod(pos, bs)
            n = min(bs - within, extent.end - pos)
            per_block[block].append((within, extent.data[pos - extent.offset : pos - extent.offset + n]))
            pos += n
    for block in sorted(per_block):
        planner.add_block(block, per_block[block])
    return planner.finish()


class VhdxCommit:
    """Runs steps 0-6 of the module docstring on one writable file."""

    def __init__(self, disk: VhdxDisk, file: WritableFile, progress: Callable[[int, int], None] | None = None,
                 total: int = 0):
        self.disk = disk
        self.file = file
        self.header: VhdxHeader = disk.header
        self.progress = progress  # progress(bytes written so far, bytes to write), after each write
        self.total = total
        self._first = file.bytes_written

    def _pwrite(self, offset: int, data: bytes | SourceRange) -> None:
        for at, part in pieces(data):
            self.file.pwrite(offset + at, part)
            if self.progress is not None:
                done = self.file.bytes_written - self._first
                self.total = max(self.total, done)
                self.progress(done, self.total)

    # -- headers (2.2.2) ----------------------------------------------------------------
    def _update_header(self, **changes) -> None:
        """Write the older header slot with the next sequence number and ``changes``; flush."""
        h = self.header
        fields = {
            "file_write_guid": h.file_write_guid,
            "data_write_guid": h.data_write_guid,
            "log_guid": h.log_guid,
            "log_length": h.log_length,
            "log_offset": h.log_offset,
        }
        fields.update(changes)
        slot = 2 if h.slot == 1 else 1
        new = VhdxHeader(slot=slot, sequence_number=h.sequence_number + 1, **fields)
        raw = bytearray(
            HEADER.pack(
                Header(
                    signature=HEADER_SIGNATURE,
                    checksum=0,
                    sequence_number=new.sequence_number,
                    file_write_guid=new.file_write_guid.bytes_le,
                    data_write_guid=new.data_write_guid.bytes_le,
                    log_guid=new.log_guid.bytes_le,
                    log_version=0,
                    version=1,
                    log_length=new.log_length,
                    log_offset=new.log_offset,
                )
            ).ljust(HEADER_SIZE, b"\0")
        )
        raw[4:8] = checksum_zeroed(raw).to_bytes(4, "little")
        self._pwrite(HEADER_OFFSETS[slot - 1], bytes(raw))
        self.file.flush()
        self.header = new

    # -- step 0 -----------------------------------------------------------------------
    def replay_pending_log(self) -> bool:
        """Apply a log a crash left behind into the file, then retire it (2.3.3)."""
        h = self.header
        if h.log_guid == ZERO_GUID:
            return False
        sequence = pending_sequence(self.disk.image, h.log_offset, h.log_length, h.log_guid)
        last = sequence[-1].last_file_offset
        if last > self.file.size:
            self.file.truncate(last)
        for entry in sequence:
            for d in entry.descriptors:
                self._pwrite(d.file_offset, d.data if d.data is not None else bytes(d.length))
        self.file.flush()
        self._update_header(log_guid=ZERO_GUID)
        return True

    # -- steps 1-6 ----------------------------------------------------------------------
    def run(self, plan: CommitPlan) -> bool:
        """Commit ``plan``; returns whether the log had to move to a larger region."""
        # Step 1. Interrupted: the old content under one of two valid headers.
        self._update_header(file_write_guid=uuid.uuid4(), data_write_guid=uuid.uuid4())

        # Step 2. Interrupted: a longer file whose new blocks nothing points at, and new
        # bytes in free clusters, which nothing of the old state reads.
        if plan.appended or plan.direct:
            self.file.truncate(max(self.file.size, plan.end_of_file))
            for offset, _length, parts in plan.appended:
                for within, data in parts:
                    self._pwrite(offset + within, data)
            for offset, data in plan.direct:
                self._pwrite(offset, data)
            self.file.flush()
        # Still step 2: what was copied from local files is what was decided on, or nothing is committed.
        for source in plan.sources():
            source.check_unchanged()

        # Step 3. Interrupted: entries under a LogGuid no header names, never replayed.
        log_guid = uuid.uuid4()
        # One 4 KiB sector of the log stays unused, so that a reader scanning the circular
        # log (as QEMU's does) never mistakes a full log for an empty one.
        size = sequence_size(plan.logged) + LOG_SECTOR_SIZE
        log_offset, log_length = self.header.log_offset, self.header.log_length
        moved = size > log_length
        if moved:
            # 2.2.2: any 1 MiB-aligned LogOffset and LogLength; the old region is left unused.
            log_offset = _round_up(self.file.size, MiB)
            log_length = _round_up(size, MiB)
            self.file.truncate(log_offset + log_length)
        sequence = build_sequence(
            plan.logged, log_guid, 1, flushed_file_offset=self.file.size, last_file_offset=self.file.size
        )
        self._pwrite(log_offset, sequence)
        self.file.flush()

        # Step 4. Interrupted: the header with the higher sequence number decides, and
        # both the old one (no log) and the new one (replay the entry) are consistent.
        self._update_header(log_guid=log_guid, log_offset=log_offset, log_length=log_length)

        # Step 5. Interrupted: the log replays over whatever was half-applied.
        for w in plan.logged:
            self._pwrite(w.file_offset, w.data if w.data is not None else bytes(w.length))
        self.file.flush()

        # Step 6. Interrupted: the log is replayed once more, to the same result.
        self._update_header(log_guid=ZERO_GUID)
        return moved


def commit(
    disk: VhdxDisk, changes: list[Extent], file: WritableFile | None = None, unreachable: list[tuple[int, int]] = (),
    progress: Callable[[int, int], None] | None = None,
) -> CommitResult | None:
    """Commit ``changes`` to the file ``disk`` was opened from; None when there is nothing to change.

    ``disk`` must be the top of its chain (its parents are never written) and is
    stale afterwards: close it and open the file again to read the result. ``file``
    is the caller's locked handle of the same file, or None to open one here.
    ``progress(done, total)`` is told the bytes written so far after each write.
    """
    plan = plan_commit(disk, changes, unreachable)
    if plan.empty and disk.header.log_guid == ZERO_GUID:
        return None  # nothing to change is no write at all
    # Nothing to change but a log a crash left pending: it is replayed and retired (step 0), so
    # that a re-run after a crash leaves the file as readers that do not replay (QEMU read-only)
    # can open it.
    own = file is None
    if own:
        file = WritableFile(disk.path)
    before = (file.bytes_written, file.writes, file.flushes)
    try:
        if not plan.empty:
            # A full host filesystem is found here, before anything is written (or a log is moved:
            # that region is allocated as it is written, and it is small).
            file.reserve(plan.written_ranges())
        writer = VhdxCommit(disk, file, progress, plan.write_size)
        replayed = writer.replay_pending_log()
        moved = writer.run(plan) if not plan.empty else False
        return CommitResult(file.bytes_written - before[0], file.writes - before[1], file.flushes - before[2],
                            replayed, moved)
    finally:
        if own:
            file.close()

