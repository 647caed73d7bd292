"""A regf primary file as log replay and log retirement see it: base block, checksum, hive bins chain, results.

Facts from Maxim Suhanov's "Windows registry file format specification" ("Base
block", "Hive bin", "Dirty state of a hive"); the code is ours. The replays
themselves are in logreplay.py (new format, and the entry point) and dirtlog.py
(old format); retiring the logs after a write is in logretire.py.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from vhdtool.errors import UnreplayableHive

BASE_BLOCK = 4096  # the primary's base block; hive bins start here
LOG_BASE_BLOCK = 512  # what a log keeps of it (one 512-byte sector as of Windows 8)
SECTOR = 512
PAGE = 4096  # Windows logs and grows hive bins data in 4 KiB pages
HBIN_HEADER = struct.Struct("<4sII")  # signature, offset, size

FILE_TYPE_PRIMARY = 0
FILE_TYPES_OLD_LOG = (1, 2)  # 2 up to Windows 2000
FILE_TYPE_NEW_LOG = 6
MAX_SEQUENCE = 0xFFFFFFFF

BOOT_HINT = "boot the guest once and shut it down cleanly, so that Windows replays its registry logs, then try again"


def base_block_xor(block: bytes | bytearray) -> int:
    """The raw XOR of a base block's first 127 dwords (what libhivex stores and checks)."""
    value = 0
    for (word,) in struct.iter_unpack("<I", bytes(block[:508])):
        value ^= word
    return value


def base_block_checksum(block: bytes | bytearray) -> int:
    """The checksum Windows stores: the raw XOR, except that 0 becomes 1 and 0xFFFFFFFF becomes 0xFFFFFFFE."""
    value = base_block_xor(block)
    if value == 0xFFFFFFFF:
        return 0xFFFFFFFE
    return value or 1


@dataclass(frozen=True)
class BaseBlock:
    """The fields of a primary's or a log's base block that recovery reads."""

    seq1: int
    seq2: int
    timestamp: int
    file_type: int
    bins_size: int
    clustering: int
    flags: int
    checksum_ok: bool

    @classmethod
    def parse(cls, block: bytes) -> BaseBlock | None:
        """None unless ``block`` starts with a 'regf' base block (its first 512 bytes at least)."""
        if len(block) < LOG_BASE_BLOCK or block[:4] != b"regf":
            return None
        seq1, seq2, timestamp = struct.unpack_from("<IIQ", block, 4)
        (file_type,) = struct.unpack_from("<I", block, 28)
        bins_size, clustering = struct.unpack_from("<II", block, 40)
        (flags,) = struct.unpack_from("<I", block, 144)
        (stored,) = struct.unpack_from("<I", block, 508)
        return cls(seq1, seq2, timestamp, file_type, bins_size, clustering, flags,
                   base_block_checksum(block) == stored)

    @property
    def valid_log(self) -> bool:
        return self.checksum_ok and self.seq1 == self.seq2


def is_dirty(primary: bytes) -> bool:
    """True when the primary's base block needs recovery: bad checksum, no signature, or sequence numbers differ."""
    base = BaseBlock.parse(primary[:BASE_BLOCK])
    return base is None or not base.checksum_ok or base.seq1 != base.seq2


@dataclass(frozen=True)
class Applied:
    """One log record applied: the log's name and the entry's sequence number (old format: None)."""

    log: str
    sequence: int | None
    offset: int
    pages: int


@dataclass(frozen=True)
class Replayed:
    """A primary brought up to date, or the primary itself when it was clean."""

    data: bytes
    applied: tuple[Applied, ...]
    log_format: str | None  # "new" (HvLE), "old" (DIRT) or None when nothing was replayed
    sequence: int  # both sequence numbers of the result's base block

    @property
    def replayed(self) -> bool:
        return bool(self.applied)


def refusal(name: str, image_path: str | os.PathLike | None, state: str, why: str) -> UnreplayableHive:
    """The one-line refusal of a dirty hive whose logs cannot bring it up to date."""
    return UnreplayableHive(image_path,
                            f"{name} hive is dirty ({state}) and its logs cannot bring it up to date: {why}",
                            why, hint=BOOT_HINT)


def grow(out: bytearray, bins_size: int) -> None:
    """The file grows to hold ``bins_size`` bytes of hive bins (spec: log entries, note 9)."""
    end = BASE_BLOCK + bins_size
    if len(out) < end:
        out.extend(bytes(end - len(out)))


def bins_problem(hive: bytes | bytearray, bins_size: int) -> str | None:
    """What is wrong with the chain of hive bins from 4096 to 4096 + ``bins_size``, or None."""
    if bins_size % PAGE or BASE_BLOCK + bins_size > len(hive):
        return f"hive bins data size {bins_size} does not fit the file"
    offset = 0
    while offset < bins_size:
        sig, stored, size = HBIN_HEADER.unpack_from(hive, BASE_BLOCK + offset)
        if sig != b"hbin" or stored != offset or size == 0 or size % PAGE or offset + size > bins_size:
            return f"the hive bin at offset {offset:#x} is not valid"
        offset += size
    return None


def check_bins(out: bytearray, bins_size: int, name: str, image_path, state: str) -> None:
    """The hive bins data after recovery must be a chain of well-formed hive bins."""
    problem = bins_problem(out, bins_size)
    if problem:
        raise refusal(name, image_path, state, f"after replay {problem}")
