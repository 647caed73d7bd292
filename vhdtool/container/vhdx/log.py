"""VHDX log: find the active sequence and replay it (MS-VHDX 2.3).

A read-only open replays into memory: each descriptor becomes an overlay segment
of the ``ImageFile`` so reads see the replayed bytes while the file is left
untouched. A writer replays ``pending_sequence`` into the file itself.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from uuid import UUID

from vhdtool.container.imagefile import ImageFile
from vhdtool.container.vhdx.structs import (
    LOG_DATA_DESC_SIGNATURE,
    LOG_DATA_SECTOR_SIGNATURE,
    LOG_DESCRIPTOR,
    LOG_ENTRY_HEADER,
    LOG_ENTRY_SIGNATURE,
    LOG_SECTOR_SIZE,
    LOG_ZERO_SIGNATURE,
    checksum_zeroed,
)
from vhdtool.errors import CorruptImage

ENTRY_HEADER_SIZE = LOG_ENTRY_HEADER.size
DESCRIPTOR_SIZE = LOG_DESCRIPTOR.size


@dataclass(frozen=True)
class LogDescriptor:
    file_offset: int
    length: int
    data: bytes | None  # None: zero descriptor


@dataclass(frozen=True)
class LogEntry:
    offset: int  # within the log
    length: int
    tail: int
    sequence_number: int
    flushed_file_offset: int
    last_file_offset: int
    descriptors: tuple[LogDescriptor, ...]


class LogReader:
    """Reads entries out of the circular log region of one image."""

    def __init__(self, image: ImageFile, log_offset: int, log_length: int, log_guid: UUID):
        self.image = image
        self.log_offset = log_offset
        self.log_length = log_length
        self.log_guid = log_guid
        self._log = image.read_exact(log_offset, log_length, "log region")
        # Offsets where an entry header claims the active LogGuid but fails checks:
        # evidence of damage rather than of an empty log.
        self.damaged_entries: list[int] = []

    def _read(self, offset: int, length: int) -> bytes:
        """``length`` bytes of the log from ``offset``, wrapping at its end."""
        out = bytearray()
        pos = offset % self.log_length
        while len(out) < length:
            chunk = self._log[pos : pos + (length - len(out))]
            out += chunk
            pos = 0
        return bytes(out)

    def entry_at(self, offset: int) -> LogEntry | None:
        """The valid entry at ``offset`` (2.3.1), or None. Every field is checked."""
        head = self._log[offset : offset + ENTRY_HEADER_SIZE]
        if len(head) < ENTRY_HEADER_SIZE or head[:4] != LOG_ENTRY_SIGNATURE:
            return None
        hdr = LOG_ENTRY_HEADER.unpack(head)
        if UUID(bytes_le=hdr.log_guid) != self.log_guid:
            return None

        def bad() -> None:
            # The entry names the active log but is damaged.
            self.damaged_entries.append(offset)

        # 2.3.1.1: EntryLength a multiple of 4 KiB, Tail a multiple of 4 KiB, both inside the log.
        if (
            hdr.entry_length == 0
            or hdr.entry_length % LOG_SECTOR_SIZE
            or hdr.entry_length > self.log_length
            or hdr.tail % LOG_SECTOR_SIZE
            or hdr.tail >= self.log_length
            or hdr.sequence_number == 0
        ):
            return bad()
        desc_sectors = -(-(ENTRY_HEADER_SIZE + DESCRIPTOR_SIZE * hdr.descriptor_count) // LOG_SECTOR_SIZE)
        if desc_sectors * LOG_SECTOR_SIZE > hdr.entry_length:
            return bad()
        raw = self._read(offset, hdr.entry_length)
        if checksum_zeroed(raw) != hdr.checksum:
            return bad()

        descriptors = []
        data_sector = desc_sectors
        for i in range(hdr.descriptor_count):
            d = LOG_DESCRIPTOR.unpack(raw, ENTRY_HEADER_SIZE + i * DESCRIPTOR_SIZE)
            if d.sequence_number != hdr.sequence_number or d.file_offset % LOG_SECTOR_SIZE:
                return bad()
            if d.signature == LOG_ZERO_SIGNATURE:
                length = d.leading_bytes_or_zero_length
                if length == 0 or length % LOG_SECTOR_SIZE:
                    return bad()
                descriptors.append(LogDescriptor(d.file_offset, length, None))
            elif d.signature == LOG_DATA_DESC_SIGNATURE:
                start = data_sector * LOG_SECTOR_SIZE
                sector = raw[start : start + LOG_SECTOR_SIZE]
                if len(sector) != LOG_SECTOR_SIZE or sector[:4] != LOG_DATA_SECTOR_SIGNATURE:
                    return bad()
                (seq_high,) = struct.unpack_from("<I", sector, 4)
                (seq_low,) = struct.unpack_from("<I", sector, 4092)
                if (seq_high << 32 | seq_low) != hdr.sequence_number:
                    return bad()
                # 2.3.1.3/2.3.1.4: bytes 0-7 and 4092-4095 live in the descriptor.
                data = (
                    struct.pack("<Q", d.leading_bytes_or_zero_length)
                    + sector[8:4092]
                    + struct.pack("<I", d.trailing_bytes_or_reserved)
                )
                descriptors.append(LogDescriptor(d.file_offset, LOG_SECTOR_SIZE, data))
                data_sector += 1
            else:
                return bad()
        if data_sector * LOG_SECTOR_SIZE != hdr.entry_length:
            return bad()
        return LogEntry(
            offset=offset,
            length=hdr.entry_length,
            tail=hdr.tail,
            sequence_number=hdr.sequence_number,
            flushed_file_offset=hdr.flushed_file_offset,
            last_file_offset=hdr.last_file_offset,
            descriptors=tuple(descriptors),
        )

    def active_sequence(self) -> list[LogEntry]:
        """The newest valid and complete sequence, tail first (2.3.2, 2.3.3)."""
        cache: dict[int, LogEntry | None] = {}

        def entry(off: int) -> LogEntry | None:
            if off not in cache:
                cache[off] = self.entry_at(off)
            return cache[off]

        best: list[LogEntry] = []
        for start in range(0, self.log_length, LOG_SECTOR_SIZE):
            seq: list[LogEntry] = []
            off = start
            # Bounded by the number of sectors: a sequence cannot lap the log.
            while len(seq) < self.log_length // LOG_SECTOR_SIZE:
                e = entry(off)
                if e is None or (seq and e.sequence_number != seq[-1].sequence_number + 1):
                    break
                if any(x.offset == e.offset for x in seq):
                    break
                seq.append(e)
                off = (off + e.length) % self.log_length
            if not seq:
                continue
            # The head's tail must be one of the entries of this sequence; replay starts there.
            head = seq[-1]
            tail_index = next((i for i, x in enumerate(seq) if x.offset == head.tail), None)
            if tail_index is None:
                continue
            candidate = seq[tail_index:]
            if not best or candidate[-1].sequence_number > best[-1].sequence_number:
                best = candidate
        return best


def pending_sequence(image: ImageFile, log_offset: int, log_length: int, log_guid: UUID) -> list[LogEntry]:
    """The sequence a header with a non-zero LogGuid says must be replayed (2.3.3), checked against the file."""
    if log_length == 0:
        raise CorruptImage(image.path, "the header names a pending log but the log is empty")
    reader = LogReader(image, log_offset, log_length, log_guid)
    sequence = reader.active_sequence()
    if not sequence:
        if reader.damaged_entries:
            where = reader.damaged_entries[0]
            raise CorruptImage(
                image.path,
                f"pending log cannot be replayed: the log entry at log offset {where} fails its checks (checksum or fields)",
            )
        raise CorruptImage(image.path, "pending log has no valid log sequence (MS-VHDX 2.3.3)")
    head = sequence[-1]
    if image.file_size < head.flushed_file_offset:
        raise CorruptImage(
            image.path,
            f"truncated: the log says the file held {head.flushed_file_offset} bytes, it has {image.file_size}",
        )
    return sequence


def replay_into_overlay(image: ImageFile, log_offset: int, log_length: int, log_guid: UUID) -> int:
    """Replay the active log sequence into ``image``'s overlay, never the file; returns entries replayed."""
    sequence = pending_sequence(image, log_offset, log_length, log_guid)
    head = sequence[-1]
    for e in sequence:
        for d in e.descriptors:
            image.add_overlay(d.file_offset, d.data, d.length)
    image.extend_to(head.last_file_offset)
    return len(sequence)
