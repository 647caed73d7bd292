"""Writing the VHDX log (MS-VHDX 2.3): one operation's in-place changes as one log entry.

An entry is a 4 KiB-aligned run in the log region: the entry header (2.3.1.1) and
its descriptors fill the first sectors; each data descriptor (2.3.1.3) has a data
sector (2.3.1.4) after them, in the same order, carrying bytes 8-4091 of the 4 KiB
it replaces (the first 8 and last 4 bytes live in the descriptor, with the
sequence number split around the data so that a torn sector is detected). A zero
descriptor (2.3.1.2) zeroes a run without carrying data.

vhdtool writes one sequence per operation, from the start of the log region,
under a LogGuid of its own; the reader (vhdtool.container.vhdx.log) and QEMU's
are the judges of what is written here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from uuid import UUID

from vhdtool.container.vhdx.structs import (
    LOG_DATA_DESC_SIGNATURE,
    LOG_DATA_SECTOR_SIGNATURE,
    LOG_DESCRIPTOR,
    LOG_ENTRY_HEADER,
    LOG_ENTRY_SIGNATURE,
    LOG_SECTOR_SIZE,
    LOG_ZERO_SIGNATURE,
    LogDescriptor,
    LogEntryHeader,
    checksum_zeroed,
)


@dataclass(frozen=True)
class LoggedWrite:
    """4 KiB-aligned bytes to put at ``file_offset``; ``data`` None means zeros of ``length``."""

    file_offset: int
    length: int
    data: bytes | None = None

    def __post_init__(self) -> None:
        # 2.3.1.2/2.3.1.3: descriptors address whole 4 KiB sectors of the file.
        if self.file_offset % LOG_SECTOR_SIZE or self.length % LOG_SECTOR_SIZE or self.length <= 0:
            raise ValueError(f"log writes cover whole 4 KiB sectors, not {self.length} bytes at {self.file_offset}")
        if self.data is not None and len(self.data) != self.length:
            raise ValueError("logged data must be as long as the write")


# 2.3.1: the entry header takes 64 bytes of the first 4 KiB sector, leaving room for 126
# descriptors. Larger entries continue their descriptors in further sectors, which
# MS-VHDX allows but QEMU (at least to 7.2) cannot read back: it reads every
# descriptor sector into the same buffer. So an operation's writes are split into
# entries of at most 126 descriptors, consecutive in one sequence: what a reader
# replays is the whole sequence or nothing.
MAX_DESCRIPTORS = (LOG_SECTOR_SIZE - LOG_ENTRY_HEADER.size) // LOG_DESCRIPTOR.size


def _descriptors(writes: list[LoggedWrite]) -> list[tuple[int, int, bytes | None]]:
    """(file offset, length, 4 KiB of data or None for zeros) of every descriptor, in order."""
    out = []
    for w in writes:
        if w.data is None:
            out.append((w.file_offset, w.length, None))
        else:
            for at in range(0, w.length, LOG_SECTOR_SIZE):
                out.append((w.file_offset + at, LOG_SECTOR_SIZE, w.data[at : at + LOG_SECTOR_SIZE]))
    return out


def sequence_size(writes: list[LoggedWrite]) -> int:
    """Bytes the sequence for ``writes`` takes in the log region."""
    descriptors = _descriptors(writes)
    entries = max(1, -(-len(descriptors) // MAX_DESCRIPTORS))
    data = sum(LOG_SECTOR_SIZE for _o, _l, d in descriptors if d is not None)
    return entries * LOG_SECTOR_SIZE + data


def build_sequence(
    writes: list[LoggedWrite],
    log_guid: UUID,
    first_sequence_number: int,
    flushed_file_offset: int,
    last_file_offset: int,
    offset_in_log: int = 0,
) -> bytes:
    """The log sequence (2.3.2) that replays ``writes``: entries of at most MAX_DESCRIPTORS descriptors,
    consecutive sequence numbers, each naming the first as the tail, laid out from ``offset_in_log``.

    ``flushed_file_offset``: the file's size when the sequence is written, all of it flushed;
    ``last_file_offset``: the size the file must have for every write to land inside it.
    """
    if first_sequence_number <= 0:
        raise ValueError("log sequence numbers start at 1")
    descriptors = _descriptors(writes)
    groups = [descriptors[i : i + MAX_DESCRIPTORS] for i in range(0, len(descriptors), MAX_DESCRIPTORS)] or [[]]
    out = bytearray()
    for n, group in enumerate(groups):
        out += _entry(group, log_guid, first_sequence_number + n, offset_in_log, flushed_file_offset, last_file_offset)
    return bytes(out)


def _entry(descriptors, log_guid: UUID, sequence_number: int, tail: int, flushed: int, last: int) -> bytes:
    """One log entry (2.3.1) whose descriptors fit its first sector."""
    packed: list[bytes] = []
    sectors: list[bytes] = []
    seq_high, seq_low = struct.pack("<I", sequence_number >> 32), struct.pack("<I", sequence_number & 0xFFFFFFFF)
    for file_offset, length, data in descriptors:
        if data is None:
            packed.append(LOG_DESCRIPTOR.pack(LogDescriptor(LOG_ZERO_SIGNATURE, 0, length, file_offset, sequence_number)))
            continue
        (leading,) = struct.unpack_from("<Q", data, 0)
        (trailing,) = struct.unpack_from("<I", data, LOG_SECTOR_SIZE - 4)
        packed.append(
            LOG_DESCRIPTOR.pack(LogDescriptor(LOG_DATA_DESC_SIGNATURE, trailing, leading, file_offset, sequence_number))
        )
        # 2.3.1.4: bytes 8-4091 go in the data sector, between the halves of the sequence number.
        sectors.append(LOG_DATA_SECTOR_SIGNATURE + seq_high + data[8 : LOG_SECTOR_SIZE - 4] + seq_low)
    header = LogEntryHeader(
        signature=LOG_ENTRY_SIGNATURE,
        checksum=0,
        entry_length=LOG_SECTOR_SIZE * (1 + len(sectors)),
        tail=tail,
        sequence_number=sequence_number,
        descriptor_count=len(packed),
        reserved=0,
        log_guid=log_guid.bytes_le,
        flushed_file_offset=flushed,
        last_file_offset=last,
    )
    head = (LOG_ENTRY_HEADER.pack(header) + b"".join(packed)).ljust(LOG_SECTOR_SIZE, b"\0")
    entry = bytearray(head + b"".join(sectors))
    # 2.3.1.1: the checksum covers the whole entry, with the checksum field taken as zero.
    struct.pack_into("<I", entry, 4, checksum_zeroed(entry))
    return bytes(entry)
