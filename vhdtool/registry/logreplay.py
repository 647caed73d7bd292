"""Bring a dirty hive up to date from its .LOG1/.LOG2 as Windows does at boot (new-format logs here, old in dirtlog.py).

Facts from Maxim Suhanov's "Windows registry file format specification"
("Format of transaction log files", "Dirty state of a hive", "Multiple
transaction log files") and his note "Missing log entries for a dirty primary
file"; the code is ours.

Dirty
    A primary is dirty when its base block checksum is wrong or its primary and
    secondary sequence numbers differ. A clean primary is returned as it is, even
    when a log holds entries newer than it: Windows ignores those too.

New format (Windows 8.1 / Server 2012 R2 and later; log base block file type 6)
    A log is its 512-byte base block (a copy of the primary's, checksum valid,
    equal sequence numbers) followed by HvLE entries from offset 512, back to back
    in 512-byte units, numbered one more each from the log base block's sequence
    number. The log's run ends at the first place that holds no header of the next
    number (remnants of older entries follow a run). A header of the next number
    whose size, hive bins data size (a non-zero multiple of 4096) or page
    references do not fit, or whose Marvin32 hashes fail (hash-2 over its first 32
    bytes, hash-1 over the rest), is a bad entry: recovery stops there (note 8).

    The rule, from the primary's secondary sequence number N (notes 4-7 and the
    note on missing log entries): an entry numbered below N is already in the
    primary and is skipped, unchecked. Since Windows 8.1 a partial reconcile can
    write a primary without updating its base block, and after two log rotations
    the first entry left to apply is numbered above N (UsrClass-gap: primary N =
    255, LOG1 287-290, LOG2 291-300). So recovery starts in the log whose entries
    numbered N or above start first (LOG1 on a tie, whatever the files' order
    otherwise), applies them in order, then continues into the other log from the
    next number, as long as the numbers stay contiguous. It stops at the first gap,
    bad hash or bad size; what was applied before stays applied. Applying a log
    merely because it is LOG1 would bring back older data over a partially
    reconciled primary: an inconsistent hive. Each entry's pages are written at
    4096 + offset and the file grows to its hive bins data size (note 9). The
    recovered base block is the primary's with both sequence numbers = last entry
    + 1 (what Windows 10 wrote for NewDirtyHive1: entries 2..5 -> 6), the hive bins
    data size and the Flags of the last entry (note 11), and a fresh checksum. A
    primary whose base block is invalid takes the base block of the log with the
    latest entries (file type set back to 0) and only that log's entries, as
    Windows does.

Either way the hive bins are then checked: from offset 4096 to the hive bins data
size they must be a chain of 'hbin' headers whose offsets match their place and
whose sizes are non-zero multiples of 4096. Windows would replace a bad bin with
an empty one; vhdtool refuses instead. vhdtool refuses what Windows could not
recover either: a dirty primary with no log, no entry numbered N or above, a
first entry to apply that is bad, or a damaged base block and no log to rebuild
it from. Every such case is ``CorruptHive`` with a one-line message saying why
and telling the user to boot the guest once so that Windows replays its own logs.

Bounds: every offset, size and count read from a log is checked against the log
and the entry holding it before it is used; the recovered file is at most as
large as the primary and both logs together; the work is linear in their size
(hashes are computed only over entries that are applied).

After a write, ``retire_logs`` (logretire.py) makes sure the old entries are never
applied over the change.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from vhdtool.errors import CorruptHive
from vhdtool.registry.dirtlog import replay_old
# BASE_BLOCK, BOOT_HINT, BaseBlock, base_block_checksum, bins_problem, is_dirty, Replayed, retire_logs and
# log_sequences are imported from here by the rest of vhdtool: this module is the registry's replay API.
from vhdtool.registry.hivefile import (BASE_BLOCK, BOOT_HINT, FILE_TYPE_NEW_LOG, FILE_TYPE_PRIMARY,  # noqa: F401
                                       LOG_BASE_BLOCK, MAX_SEQUENCE, PAGE, SECTOR, Applied, BaseBlock, Replayed,
                                       base_block_checksum, bins_problem, check_bins, grow, is_dirty, refusal)
from vhdtool.registry.logretire import log_sequences, retire_logs  # noqa: F401

ENTRY_HEADER = struct.Struct("<4sIIIII")  # signature, size, flags, sequence, hive bins data size, page count
ENTRY_HEAD_SIZE = 40  # the header above plus hash-1 and hash-2
PAGE_REF = struct.Struct("<II")  # offset in hive bins data, size

# Marvin32 seed of registry log entries (spec: bytes 82 EF 4D 88 7A 4E 55 C5).
MARVIN_SEED = 0x82EF4D887A4E55C5
_M32 = 0xFFFFFFFF


def marvin32(data: bytes | memoryview, seed: int = MARVIN_SEED) -> int:
    """Marvin32 of ``data`` as a 64-bit value (high word: the second state word)."""
    s0, s1 = seed & _M32, seed >> 32
    whole = len(data) & ~3
    view = memoryview(data)
    words = struct.unpack(f"<{whole // 4}I", view[:whole])
    # The tail: up to three bytes, then 0x80, as one little-endian word; then a zero word.
    tail = int.from_bytes(bytes(view[whole:]) + b"\x80", "little")
    for w in words + (tail, 0):
        s0 = (s0 + w) & _M32
        s1 ^= s0
        s0 = ((((s0 << 20) | (s0 >> 12)) & _M32) + s1) & _M32
        s1 = (((s1 << 9) | (s1 >> 23)) & _M32) ^ s0
        s0 = ((((s0 << 27) | (s0 >> 5)) & _M32) + s1) & _M32
        s1 = ((s1 << 19) | (s1 >> 13)) & _M32
    return (s1 << 32) | s0


# -- new-format log entries ---------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """One HvLE entry of a log's run; ``problem`` says why it is bad when its header or sizes do not fit."""

    log: str
    offset: int  # in the log file
    size: int
    flags: int
    sequence: int
    bins_size: int
    pages: tuple[tuple[int, int, int], ...]  # (offset in hive bins data, size, offset of the data in the log)
    hash1: int
    hash2: int
    problem: str | None = None

    def hashes_check(self, log: bytes) -> bool:
        view = memoryview(log)[self.offset : self.offset + self.size]
        return marvin32(view[:32]) == self.hash2 and marvin32(view[ENTRY_HEAD_SIZE:]) == self.hash1


def _entry_at(log: bytes, name: str, offset: int, sequence: int) -> Entry | None:
    """The entry numbered ``sequence`` at ``offset``; None when no such header is there (the run ends)."""
    if offset + ENTRY_HEAD_SIZE > len(log):
        return None
    sig, size, flags, found, bins_size, count = ENTRY_HEADER.unpack_from(log, offset)
    if sig != b"HvLE" or found != sequence:
        return None
    hash1, hash2 = struct.unpack_from("<QQ", log, offset + 24)

    def problem(why: str) -> Entry:
        return Entry(name, offset, size, flags, sequence, bins_size, (), hash1, hash2,
                     f"{name} entry {sequence} at offset {offset} {why}")

    if size < ENTRY_HEAD_SIZE or size % SECTOR or size > len(log) - offset:
        return problem(f"gives a size of {size} bytes, not a whole entry inside the log")
    if bins_size == 0 or bins_size % PAGE:
        return problem(f"gives a hive bins data size of {bins_size}, not a multiple of {PAGE}")
    refs_end = ENTRY_HEAD_SIZE + count * PAGE_REF.size
    if refs_end > size:
        return problem(f"lists {count} pages, more than it holds")
    pages = []
    data = offset + refs_end
    for i in range(count):
        page_offset, page_size = PAGE_REF.unpack_from(log, offset + ENTRY_HEAD_SIZE + i * PAGE_REF.size)
        if page_size == 0 or page_offset % PAGE or page_size % PAGE or page_offset + page_size > bins_size:
            return problem(f"has a page ({page_size} bytes at {page_offset}) outside its hive bins data")
        if data + page_size > offset + size:
            return problem("has pages beyond its end")
        pages.append((page_offset, page_size, data))
        data += page_size
    return Entry(name, offset, size, flags, sequence, bins_size, tuple(pages), hash1, hash2)


@dataclass
class _NewLog:
    name: str
    data: bytes
    base: BaseBlock
    entries: list[Entry]  # the run from the base block's number; only the last may have a problem


def _new_log(name: str, data: bytes | None) -> _NewLog | None:
    if not data:
        return None
    base = BaseBlock.parse(data[:LOG_BASE_BLOCK])
    if base is None or not base.valid_log or base.file_type != FILE_TYPE_NEW_LOG:
        return None
    entries: list[Entry] = []
    offset = LOG_BASE_BLOCK
    sequence = base.seq1
    while True:
        entry = _entry_at(data, name, offset, sequence)
        if entry is None:
            break
        entries.append(entry)
        if entry.problem is not None or sequence == MAX_SEQUENCE:
            break  # nothing past a bad entry counts; no number follows the last one
        offset += entry.size
        sequence += 1
    return _NewLog(name, data, base, entries)


# -- replay ----------------------------------------------------------------------------------

def replay(primary: bytes, log1: bytes | None, log2: bytes | None, name: str,
           image_path: str | os.PathLike | None = None) -> Replayed:
    """``primary`` brought up to date from its logs as Windows would at boot; unchanged when it is clean.

    ``log1`` and ``log2`` are the .LOG1 and .LOG2 files (None or b"" when absent; a
    single old-style .LOG may be passed as ``log1``). Raises CorruptHive when the
    primary is dirty and its logs cannot bring it up to date exactly.
    """
    if len(primary) < BASE_BLOCK + PAGE:
        raise CorruptHive(image_path, f"{name} hive is {len(primary)} bytes, too short for a base block and a hive bin")
    base = BaseBlock.parse(primary[:BASE_BLOCK])
    if base is not None and base.checksum_ok and base.seq1 == base.seq2:
        return Replayed(primary, (), None, base.seq1)
    primary_ok = base is not None and base.checksum_ok
    state = f"sequence numbers {base.seq1} and {base.seq2}" if primary_ok else "its base block is damaged"
    logs = {"LOG1": log1 or b"", "LOG2": log2 or b""}
    limit = len(primary) + sum(len(v) for v in logs.values())
    new_logs = [log for log in (_new_log(n, d) for n, d in logs.items()) if log is not None]
    if new_logs:
        return _replay_new(primary, base if primary_ok else None, new_logs, limit, name, image_path, state)
    old = replay_old(primary, base if primary_ok else None, logs, limit, name, image_path, state)
    if old is not None:
        return old
    raise refusal(name, image_path, state, "no log holds entries to replay")


def _runs(logs: list[_NewLog], first: int) -> list[tuple[_NewLog, list[Entry]]]:
    """Each log's entries numbered ``first`` or above, the run that starts first in front (LOG1 on a tie)."""
    runs = [(log, [e for e in log.entries if e.sequence >= first]) for log in logs]
    runs = [(log, entries) for log, entries in runs if entries]
    return sorted(runs, key=lambda run: run[1][0].sequence)  # stable: LOG1 stays first on a tie


def _nothing_to_apply(logs: list[_NewLog], first: int) -> str:
    held = ", ".join(f"{log.name} {log.entries[0].sequence}-{log.entries[-1].sequence}"
                     for log in logs if log.entries) or "none"
    return (f"no log entry is numbered {first} or above, where the primary's sequence continues "
            f"(entries found: {held}), so the logs do not hold the primary's last write")


def _replay_new(primary: bytes, base: BaseBlock | None, logs: list[_NewLog], limit: int, name: str,
                image_path, state: str) -> Replayed:
    out = bytearray(primary)
    if base is None:
        # No trustworthy base block: the log with the latest entries gives it, and only its entries apply.
        source = sorted(logs, key=lambda log: log.base.seq1)[-1]  # LOG2 on a tie, as before the gap rule
        out[:LOG_BASE_BLOCK] = source.data[:LOG_BASE_BLOCK]
        struct.pack_into("<I", out, 28, FILE_TYPE_PRIMARY)
        logs, first = [source], source.base.seq1
    else:
        first = base.seq2
    runs = _runs(logs, first)
    if not runs:
        raise refusal(name, image_path, state, _nothing_to_apply(logs, first))
    applied: list[Applied] = []
    for log, entry in _subsequent(runs):
        problem = entry.problem
        if problem is None and not entry.hashes_check(log.data):
            problem = f"{log.name} entry {entry.sequence} at offset {entry.offset} fails its hash check"
        if problem is not None:
            if not applied:
                raise refusal(name, image_path, state, f"the first entry to apply is bad: {problem}")
            break  # a bad entry: nothing after it is applied, in this log or the other
        if BASE_BLOCK + entry.bins_size > limit:
            raise refusal(name, image_path, state,
                          f"{log.name} entry {entry.sequence} claims {entry.bins_size} bytes of hive bins, "
                          f"more than the hive and its logs hold")
        _apply_entry(out, entry, log.data)
        applied.append(Applied(log.name, entry.sequence, entry.offset, len(entry.pages)))
        last = entry  # the first entry yielded is always applied or refused, so ``last`` is set below
    sequence = (last.sequence + 1) & MAX_SEQUENCE
    struct.pack_into("<II", out, 4, sequence, sequence)
    struct.pack_into("<I", out, 40, last.bins_size)
    struct.pack_into("<I", out, 144, last.flags)
    struct.pack_into("<I", out, 508, base_block_checksum(out))
    check_bins(out, last.bins_size, name, image_path, state)
    return Replayed(bytes(out), tuple(applied), "new", sequence)


def _subsequent(runs: list[tuple[_NewLog, list[Entry]]]) -> Iterator[tuple[_NewLog, Entry]]:
    """The entries to apply, in order: the first run, then the other log's from the next number on, no gap."""
    expected = runs[0][1][0].sequence
    for log, entries in runs:
        entries = [e for e in entries if e.sequence >= expected]  # the other log may repeat numbers applied
        if not entries or entries[0].sequence != expected:
            return  # a gap: recovery stops after the last entry applied
        for entry in entries:  # a log's run has no gap
            yield log, entry
            expected = entry.sequence + 1


def _apply_entry(out: bytearray, entry: Entry, log: bytes) -> None:
    grow(out, entry.bins_size)
    for page_offset, page_size, at in entry.pages:
        out[BASE_BLOCK + page_offset : BASE_BLOCK + page_offset + page_size] = log[at : at + page_size]
