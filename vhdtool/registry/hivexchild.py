"""The libhivex side of a hive edit, run in the native sandbox's child: open a memfd copy, make the edits, commit.

The hive goes into a memfd that hivex_open(HIVEX_OPEN_WRITE) opens by its
/proc/self/fd path (libhivex opens files by name); the edits are made, and only
when every one of them succeeded does hivex_commit write into a second memfd,
whose bytes are the answer (libguestfs' rule: commit only a whole edit). Any
failure is a ``Refusal``, which the sandbox hands to the parent.
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterable

from vhdtool.native import Refusal
from vhdtool.registry.editplan import value_key
from vhdtool.registry.libhivex import HIVEX_OPEN_WRITE, HiveSetValue, Library
from vhdtool.registry.hivefile import base_block_checksum, base_block_xor
from vhdtool.registry.records import fold
from vhdtool.units import MiB


class HivexSession:
    """One libhivex handle on a memfd copy of the hive; runs in the sandbox child."""

    def __init__(self, library: Library, data: bytes):
        self.library = library
        self.lib = library.lib
        self.limit = len(data) // 8 + 1  # no list in the hive can name more cells than this
        source = os.memfd_create("hive", 0)
        _write_all(source, hivex_checksum(data))
        self.h = self.lib.hivex_open(f"/proc/self/fd/{source}".encode(), HIVEX_OPEN_WRITE)
        if not self.h:
            raise Refusal(f"libhivex cannot open the hive ({self.error()})")

    @staticmethod
    def error() -> str:
        code = ctypes.get_errno()
        return os.strerror(code) if code else "no reason given"

    def _string(self, pointer: int | None) -> bytes:
        if not pointer:
            raise Refusal(f"libhivex cannot read a name in the hive ({self.error()})")
        try:
            return ctypes.string_at(pointer)
        finally:
            self.library.free(pointer)

    def _handles(self, pointer: int | None, what: str) -> list[int]:
        if not pointer:
            raise Refusal(f"libhivex cannot list the {what} of a key ({self.error()})")
        try:
            array = ctypes.cast(pointer, ctypes.POINTER(ctypes.c_size_t))
            found = []
            for i in range(self.limit + 1):
                if not array[i]:
                    return found
                found.append(array[i])
            raise Refusal(f"libhivex listed more {what} than the hive can hold")
        finally:
            self.library.free(pointer)

    def child(self, node: int, name: str) -> int | None:
        wanted = fold(name)
        for sub in self._handles(self.lib.hivex_node_children(self.h, node), "subkeys"):
            if fold(self._string(self.lib.hivex_node_name(self.h, sub)).decode("utf-8", "surrogateescape")) == wanted:
                return sub
        return None

    def key(self, parts: Iterable[str], create: bool) -> int:
        node = self.lib.hivex_root(self.h)
        if not node:
            raise Refusal(f"libhivex finds no root key ({self.error()})")
        for part in parts:
            found = self.child(node, part)
            if found is None:
                if not create:
                    raise Refusal(f"libhivex does not find key {part!r}")
                found = self.lib.hivex_node_add_child(self.h, node, part.encode("utf-8"))
                if not found:
                    raise Refusal(f"libhivex cannot create key {part!r} ({self.error()})")
            node = found
        return node

    def values(self, node: int) -> list[tuple[bytes, int, bytes]]:
        found = []
        for value in self._handles(self.lib.hivex_node_values(self.h, node), "values"):
            key = self._string(self.lib.hivex_value_key(self.h, value))
            vtype, size = ctypes.c_int(), ctypes.c_size_t()
            pointer = self.lib.hivex_value_value(self.h, value, ctypes.byref(vtype), ctypes.byref(size))
            if not pointer:
                raise Refusal(f"libhivex cannot read value {key!r} ({self.error()})")
            try:
                data = ctypes.string_at(pointer, size.value)
            finally:
                self.library.free(pointer)
            found.append((key, vtype.value & 0xFFFFFFFF, data))
        return found

    def set_values(self, node: int, action: str, name: str, new: tuple[int, bytes] | None) -> None:
        values = self.values(node)
        wanted = value_key(name)
        index = next((i for i, (key, _, _) in enumerate(values)
                      if value_key(key.decode("utf-8", "surrogateescape")) == wanted), None)
        if action == "set":
            if index is None:
                values.append((name.encode("utf-8"), *new))
            else:
                values[index] = (values[index][0], *new)
        elif index is not None:
            del values[index]
        else:
            return
        array = (HiveSetValue * max(1, len(values)))()
        keep = []  # the buffers must live until the call returns
        for i, (key, vtype, data) in enumerate(values):
            buffer = ctypes.create_string_buffer(data, max(1, len(data)))
            keep.append(buffer)
            array[i] = HiveSetValue(key, vtype if vtype < 1 << 31 else vtype - (1 << 32), len(data),
                                    ctypes.cast(buffer, ctypes.c_char_p))
        if self.lib.hivex_node_set_values(self.h, node, len(values), array, 0) != 0:
            raise Refusal(f"libhivex cannot write the values of a key ({self.error()})")

    def commit(self) -> bytes:
        target = os.memfd_create("committed", 0)
        if self.lib.hivex_commit(self.h, f"/proc/self/fd/{target}".encode(), 0) != 0:
            raise Refusal(f"libhivex cannot commit the hive ({self.error()})")
        size = os.fstat(target).st_size
        chunks, offset = [], 0
        while offset < size:
            chunk = os.pread(target, min(size - offset, 16 * MiB), offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def hivex_checksum(data: bytes) -> bytes:
    """``data`` with the checksum libhivex wants: the raw XOR of the base block's first 127 dwords.

    Windows stores 1 when that XOR is 0 and 0xFFFFFFFE when it is 0xFFFFFFFF
    (``base_block_checksum``); libhivex calls those bad checksums."""
    (stored,) = struct.unpack_from("<I", data, 508)
    if stored != base_block_checksum(data):
        return data  # not Windows' checksum: libhivex judges it
    raw = base_block_xor(data)
    if raw == stored:
        return data
    return data[:508] + struct.pack("<I", raw) + data[512:]


def apply_here(library: Library, data: bytes, ops: list[tuple]) -> dict:
    """Make every op with libhivex and commit the whole; runs in the child."""
    session = HivexSession(library, data)
    for op in ops:
        if op[0] == "create_key":
            session.key(op[1], create=True)
        else:
            action, parts, name, new = op
            node = session.key(parts, create=action == "set")
            session.set_values(node, action, name, new)
    return {"payload": session.commit()}
