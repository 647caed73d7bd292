"""VHDX writer: one operation's changes to the virtual disk, committed as one crash-atomic transaction.

Everything is decided before the file is opened for writing: ``plan_commit``
(vhdtool.container.vhdx.planner) maps
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
from collections.abc import Callable

from vhdtool.container.overlay import CommitResult, Extent
from vhdtool.container.source import SourceRange, pieces
from vhdtool.container.vhdx.header import ZERO_GUID, VhdxHeader
from vhdtool.container.vhdx.log import pending_sequence
from vhdtool.container.vhdx.logwriter import build_sequence, sequence_size
from vhdtool.container.vhdx.planner import CommitPlan, _round_up, plan_commit
from vhdtool.container.vhdx.reader import VhdxDisk
from vhdtool.container.vhdx.structs import (
    HEADER,
    HEADER_OFFSETS,
    HEADER_SIGNATURE,
    HEADER_SIZE,
    LOG_SECTOR_SIZE,
    Header,
    checksum_zeroed,
)
from vhdtool.container.writefile import WritableFile
from vhdtool.units import MiB

__all__ = ["CommitPlan", "VhdxCommit", "commit", "plan_commit"]

_ZEROS = bytes(MiB)


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
                if d.data is not None:
                    self._pwrite(d.file_offset, d.data)
                    continue
                # A zero descriptor's length is the file's to choose (a whole block, say): zeros by the MiB.
                for at in range(0, d.length, MiB):
                    self._pwrite(d.file_offset + at, _ZEROS[: min(MiB, d.length - at)])
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
            source.settle()

        # Step 3. Interrupted: entries under a LogGuid no header names, never replayed.
        log_guid = uuid.uuid4()
        # One 4 KiB sector of the log stays unused, so that a reader scanning the circular
        # log (as QEMU's does) never mistakes a full log for an empty one.
        size = sequence_size(plan.logged) + LOG_SECTOR_SIZE
        log_offset, log_length = self.header.log_offset, self.header.log_length
        moved = size > log_length
        if moved:
            # 2.2.2: any 1 MiB-aligned LogOffset and LogLength; the old region is left unused. Past
            # the file and past what the old state uses beyond it (a last block that ends early).
            log_offset = _round_up(max(self.file.size, plan.free_from), MiB)
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
        for source in plan.sources():
            source.check_unchanged()  # changed already: SourceChanged before the headers are touched
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

