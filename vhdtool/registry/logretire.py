"""After vhdtool has written a primary: the base block that keeps Windows from applying old log entries over it.

Windows applies entries only to a dirty primary, only from the primary's
secondary sequence number on and only in an unbroken run (spec: "Format of
transaction log files", log entries notes 5-8); it makes a primary dirty only
after it has written fresh log entries numbered from that primary's own sequence
number. So vhdtool writes the primary clean (equal sequence numbers, Windows'
checksum) with a sequence number greater than every sequence number found
anywhere in either log: both base blocks and any "HvLE" header at any 512-byte
boundary, hashes valid or not (a later run of Windows that writes fewer bytes
than a stale entry could line up the next stale header behind its own). Every
stale entry is then older than the primary and is never "subsequent"; an entry
Windows writes later starts a run the stale ones cannot continue. The log files
themselves are left as they are: a clean primary and logs holding older, already
applied entries is the state Windows itself leaves after every write of the
primary, so it is the state Windows has been tested on most, and it costs no
write to the log files. (Emptying the logs would also be safe, as install images
ship them empty, but needs the file system layer to rewrite files that need no
change.) For old-format logs, which are matched by timestamp rather than by
sequence number, the primary's Last written timestamp is also moved past every
log's, so no stale log matches it either. If no sequence number is left above
the logs' (only a hostile log gets near 2^32), the hive is refused.
"""

from __future__ import annotations

import os
import struct

from vhdtool.errors import CorruptHive
from vhdtool.registry.hivefile import (BASE_BLOCK, BOOT_HINT, FILE_TYPE_PRIMARY, FILE_TYPES_OLD_LOG, LOG_BASE_BLOCK,
                                       MAX_SEQUENCE, SECTOR, BaseBlock, base_block_checksum, refusal)


def log_sequences(log: bytes | None) -> list[int]:
    """Every sequence number a log shows: its base block's and any 'HvLE' header's at a 512-byte boundary."""
    if not log:
        return []
    found = []
    base = BaseBlock.parse(log[:LOG_BASE_BLOCK])
    if base is not None:
        found += [base.seq1, base.seq2]
    at = log.find(b"HvLE", LOG_BASE_BLOCK)
    while at >= 0:
        if at % SECTOR == 0 and at + 16 <= len(log):
            found.append(struct.unpack_from("<I", log, at + 12)[0])
            at = log.find(b"HvLE", at + SECTOR)
        else:
            at = log.find(b"HvLE", at + 1)
    return found


def retire_logs(primary: bytes, log1: bytes | None, log2: bytes | None, name: str,
                image_path: str | os.PathLike | None = None) -> bytes:
    """The primary to write after a change, so that Windows never applies the old log entries over it.

    Call it on the changed hive (after ``replay`` and the edit), with the log files as
    they are on disk; write its result as the primary and leave the logs as they
    are (see the module docstring for why). Returns the base block made clean:
    both sequence numbers above every one the logs show (and the primary's own),
    the Last written timestamp past every old-format log's, Windows' checksum.
    """
    base = BaseBlock.parse(primary[:BASE_BLOCK])
    if len(primary) < BASE_BLOCK or base is None:
        raise CorruptHive(image_path, f"{name} hive has no 'regf' base block")
    if not base.checksum_ok or base.seq1 != base.seq2:
        # Making a dirty primary clean would throw away what its logs hold: replay them first.
        raise refusal(name, image_path, f"sequence numbers {base.seq1} and {base.seq2}",
                      "they must be replayed before the hive is written")
    in_logs = log_sequences(log1) + log_sequences(log2)
    if all(seq < base.seq1 for seq in in_logs):
        sequence = base.seq1  # already above every log entry: keep it
    else:
        highest = max([base.seq1, *in_logs])
        if highest >= MAX_SEQUENCE:
            raise CorruptHive(image_path, f"{name} hive's logs use up every sequence number (up to {highest:#x})",
                              hint=BOOT_HINT)
        sequence = highest + 1
    out = bytearray(primary)
    struct.pack_into("<II", out, 4, sequence, sequence)
    old_stamps = []
    for log in (log1, log2):
        log_base = BaseBlock.parse(log[:LOG_BASE_BLOCK]) if log else None
        if log_base is not None and log_base.file_type in FILE_TYPES_OLD_LOG:
            old_stamps.append(log_base.timestamp)
    if base.timestamp in old_stamps:
        struct.pack_into("<Q", out, 12, min(max(old_stamps + [base.timestamp]) + 1, 2**63 - 1))
    struct.pack_into("<I", out, 28, FILE_TYPE_PRIMARY)
    struct.pack_into("<I", out, 508, base_block_checksum(out))
    return bytes(out)
