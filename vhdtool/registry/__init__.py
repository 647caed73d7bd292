"""Registry layer: read Windows hives (dissect.regf), with their dirty state.

A hive is dirty when its base block's primary and secondary sequence numbers
differ: a write was in flight and the .LOG1/.LOG2 files hold changes the primary
file does not. Values read from a dirty primary may be stale; writes must never
touch one before its logs are replayed.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

from dissect.regf import RegistryHive
from dissect.regf.exceptions import RegistryKeyNotFoundError, RegistryValueNotFoundError

from vhdtool.errors import CorruptHive, VhdtoolError

BASE_BLOCK_SIZE = 4096
HIVE_SIGNATURE = b"regf"
REG_DWORD = 4
MAX_SUBKEYS = 200_000


def _xor_checksum(block: bytes) -> int:
    value = 0
    for (word,) in struct.iter_unpack("<I", block[:508]):
        value ^= word
    if value == 0xFFFFFFFF:
        return 0xFFFFFFFE
    if value == 0:
        return 1
    return value


class Hive:
    """One hive file; paths use backslashes and are case-insensitive."""

    def __init__(self, stream: BinaryIO, name: str, image_path: str | None = None):
        self.name = name
        self.image_path = image_path
        stream.seek(0)
        base = stream.read(BASE_BLOCK_SIZE)
        if len(base) < BASE_BLOCK_SIZE or base[:4] != HIVE_SIGNATURE:
            raise CorruptHive(image_path, f"{name} hive has no 'regf' signature")
        seq1, seq2 = struct.unpack_from("<II", base, 4)
        (stored,) = struct.unpack_from("<I", base, 508)
        self.sequence = (seq1, seq2)
        self.dirty = seq1 != seq2
        self.checksum_ok = _xor_checksum(base) == stored
        try:
            stream.seek(0)
            self._hive = RegistryHive(stream)
        except VhdtoolError:
            raise
        except Exception as e:  # noqa: BLE001 - damaged hives make dissect raise anything
            raise CorruptHive(image_path, f"{name} hive cannot be parsed ({type(e).__name__}: {e})") from None

    def _guard(self, what: str):
        return _HiveErrors(self, what)

    def key(self, path: str):
        """The key at ``path`` or None."""
        with self._guard(path):
            try:
                return self._hive.open(path)
            except RegistryKeyNotFoundError:
                return None

    def value(self, path: str, name: str, default=None):
        """Value ``name`` of key ``path``, or ``default`` when either is missing."""
        with self._guard(f"{path}\\{name}"):
            try:
                key = self._hive.open(path)
                return key.value(name).value
            except (RegistryKeyNotFoundError, RegistryValueNotFoundError):
                return default

    def values(self, path: str) -> dict:
        with self._guard(path):
            try:
                key = self._hive.open(path)
            except RegistryKeyNotFoundError:
                return {}
            return {v.name: v.value for v in key.values()}

    def subkey_names(self, path: str) -> list[str]:
        with self._guard(path):
            try:
                key = self._hive.open(path)
            except RegistryKeyNotFoundError:
                return []
            names = []
            for sub in key.subkeys():
                names.append(sub.name)
                if len(names) > MAX_SUBKEYS:
                    raise CorruptHive(self.image_path, f"{self.name} hive: {path} has too many subkeys")
            return names


class _HiveErrors:
    def __init__(self, hive: Hive, what: str):
        self.hive = hive
        self.what = what

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or isinstance(exc, VhdtoolError):
            return False
        if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            return False
        raise CorruptHive(
            self.hive.image_path, f"{self.hive.name} hive is damaged at {self.what} ({type(exc).__name__}: {exc})"
        ) from None
