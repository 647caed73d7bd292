"""Registry hives read with hivexget/hivexsh, base block fields read by hand, a new-format log replayed."""

from __future__ import annotations

import re
import struct
import subprocess
from pathlib import Path
from typing import Callable

from .tools import sh

REG_SZ, REG_EXPAND_SZ, REG_DWORD = 1, 2, 4


def _unquote(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def hive_typed_values(hive: Path, key: str) -> dict[str, tuple[int, object]] | None:
    """All values of `key` as {name: (REG_* type, str | int | bytes)}; None if the key does not exist."""
    proc = sh("hivexget", hive, key, check=False)
    if proc.returncode != 0:
        assert b"not found" in proc.stderr, proc.stderr
        return None
    values: dict[str, tuple[int, object]] = {}
    for line in proc.stdout.decode().splitlines():
        m = re.fullmatch(r'(?:"((?:[^"\\]|\\.)*)"|@)=(.*)', line)
        assert m, line
        name, data = _unquote(m.group(1) or ""), m.group(2)
        if data.startswith('"'):
            values[name] = (REG_SZ, _unquote(data[1:-1]))
        elif data.startswith("str(2):"):
            values[name] = (REG_EXPAND_SZ, _unquote(data[8:-1]))
        elif data.startswith("dword:"):
            values[name] = (REG_DWORD, int(data[6:], 16))
        elif data.startswith("hex("):
            kind, hexbytes = data.split(":", 1)  # hivexget prints the type in decimal: hex(11) is REG_QWORD
            values[name] = (int(kind[4:-1]), bytes.fromhex(hexbytes.replace(",", "")) if hexbytes else b"")
        else:
            raise AssertionError(f"unparsed hivexget line {line!r}")
    return values


def hive_values(hive: Path, key: str) -> dict[str, object] | None:
    """All values of `key` as {name: str | int | bytes}; None if the key does not exist."""
    typed = hive_typed_values(hive, key)
    return None if typed is None else {name: value for name, (_, value) in typed.items()}


def hive_subkeys(hive: Path, key: str) -> list[str]:
    proc = subprocess.run(["hivexsh", str(hive)], input=f"cd \\{key}\nls\n".encode(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if proc.returncode != 0:
        return []
    return proc.stdout.decode().splitlines()


def regf_checksum(block: bytes) -> int:
    """The base block checksum: XOR of the first 127 dwords, 0 and ~0 avoided."""
    csum = 0
    for (word,) in struct.iter_unpack("<I", block[:508]):
        csum ^= word
    return {0: 1, 0xFFFFFFFF: 0xFFFFFFFE}.get(csum, csum)


def hive_sequences(hive: Path) -> tuple[int, int, bool]:
    """Sequence1, Sequence2 and whether the base block checksum is right."""
    block = hive.read_bytes()[:4096]
    assert block[:4] == b"regf"
    seq1, seq2 = struct.unpack_from("<II", block, 4)
    return seq1, seq2, regf_checksum(block) == struct.unpack_from("<I", block, 508)[0]


def replay_new_log(primary: bytes, log: bytes, marvin32: Callable[[bytes], int]) -> bytes:
    """A minimal replay of a new-format (HvLE) log onto a dirty primary, per yarp.
    `marvin32` checks the entries' hashes (the caller checks it against a real Windows log)."""
    seq2 = struct.unpack_from("<I", primary, 8)[0]
    assert log[:4] == b"regf" and struct.unpack_from("<I", log, 28)[0] == 6
    expected = struct.unpack_from("<I", log, 4)[0]
    assert expected >= seq2
    hive = bytearray(primary)
    pos = 512
    applied = 0
    while pos + 40 <= len(log) and log[pos:pos + 4] == b"HvLE":
        size, _flags, seq, bins_size, count = struct.unpack_from("<IIIII", log, pos + 4)
        entry = log[pos:pos + size]
        h1, h2 = struct.unpack_from("<QQ", entry, 24)
        if seq != expected or h2 != marvin32(entry[:32]) or h1 != marvin32(entry[40:]):
            break
        data = pos + 40 + 8 * count
        for i in range(count):
            off, length = struct.unpack_from("<II", log, pos + 40 + 8 * i)
            end = 4096 + off + length
            if len(hive) < end:
                hive.extend(b"\0" * (end - len(hive)))
            hive[4096 + off:end] = log[data:data + length]
            data += length
        struct.pack_into("<II", hive, 4, seq, seq)
        struct.pack_into("<I", hive, 40, bins_size)
        applied += 1
        pos += size
        expected += 1
    assert applied, "no log entry applied"
    struct.pack_into("<I", hive, 508, regf_checksum(bytes(hive[:508])))
    return bytes(hive)
