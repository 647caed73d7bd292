"""Hive edits through libhivex (ctypes, hivex.h), run in the native sandbox, all or nothing.

``edit_hive(data, edits, name, image_path)`` sets values, deletes values and creates
keys in a hive held in memory, and returns the new hive bytes with, for each edit,
what was there before.

How
    Everything is decided here, in the parent, with vhdtool's own bounded reader:
    the old value of each edit (edits apply in order; a later edit sees an earlier
    one), whether it changes anything, and whether libhivex can make it safely.
    When no edit changes anything the input is returned as it is: hivex_commit
    always bumps both sequence numbers and rewrites the checksum, so calling
    libhivex for nothing would change the file. Otherwise the edits that change
    something run in ``vhdtool.native``'s forked, confined child: the hive goes
    into a memfd that hivex_open(HIVEX_OPEN_WRITE) opens by its /proc/self/fd path
    (libhivex opens files by name), the edits are made, and only when every one of
    them succeeded does hivex_commit write into a second memfd, whose bytes are the
    answer (libguestfs' rule: commit only a whole edit). A failure or a crash of
    libhivex leaves nothing behind but a ``CorruptHive``.

    The parent trusts the answer only after reading it back with its own reader:
    the base block must be the input's but for the sequence numbers (one more),
    the hive bins data size and the checksum; every edited value must read back as
    asked, every deleted one be gone, every created key exist. The checksum is
    then made Windows' (hivex stores a raw XOR of 0 or 0xFFFFFFFF, which Windows
    reads as a bad checksum).

Names
    Key and value names compare as Windows compares them, each character upcased
    (libhivex's own lookups use strcasecmp, which upcases ASCII only, so lookups
    here walk the children and compare names themselves). An existing value keeps
    the spelling of its name. The empty name is the key's default value.

Refused (``UnsupportedLayout``), because libhivex would write what Windows misreads:
    - a new key whose name is not ASCII (libhivex hashes the UTF-8 bytes of the
      name for the lh list; Windows hashes UTF-16 code units, and a wrong hash hides
      the key from Windows);
    - a new key that libhivex would sort differently from Windows among its
      siblings (strcasecmp lowercases, Windows uppercases: "_" sorts on different
      sides of the letters; Windows binary-searches subkey lists);
    - a value larger than 16344 bytes, or any change to the values of a key that
      holds one (hivex_node_set_values rewrites every value of the key, and writes
      data of any size into one cell, where Windows expects big data records from
      format 1.4 on).
    A dirty hive (sequence numbers differ, or its checksum is wrong) is refused
    with ``CorruptHive``: replay its logs first (``vhdtool.registry.logreplay``).

What libhivex leaves as it was: key timestamps (a changed key keeps its Last
written time; a new key gets its parent's), the base block's Last written
timestamp. Freed cells stay in the file as free cells.
"""

from __future__ import annotations

import ctypes
import io
import os
import struct
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from vhdtool.errors import CorruptHive, MissingLibrary, NativeError, UnsupportedLayout
from vhdtool.native import Refusal, load_library, run_isolated
from vhdtool.registry.hive import Hive
from vhdtool.registry.cells import Damage
from vhdtool.registry.logreplay import BASE_BLOCK, BOOT_HINT, BaseBlock, base_block_checksum, bins_problem
from vhdtool.registry.records import (
    BIG_DATA_SEGMENT,
    DATA_INLINE,
    REG_BINARY,
    REG_DWORD,
    REG_EXPAND_SZ,
    REG_MULTI_SZ,
    REG_NONE,
    REG_QWORD,
    REG_SZ,
    decode_value,
    fold,
)
from vhdtool.units import MiB

SONAME = "libhivex.so.0"
PACKAGE = "libhivex0"
LIBC_SONAME = "libc.so.6"
HIVEX_OPEN_WRITE = 4  # hivex.h

TYPE_NAMES = {
    REG_NONE: "REG_NONE",
    REG_SZ: "REG_SZ",
    REG_EXPAND_SZ: "REG_EXPAND_SZ",
    REG_BINARY: "REG_BINARY",
    REG_DWORD: "REG_DWORD",
    REG_MULTI_SZ: "REG_MULTI_SZ",
    REG_QWORD: "REG_QWORD",
}
TYPES_BY_NAME = {v: k for k, v in TYPE_NAMES.items()}
# Data larger than this lives in big data records from format 1.4 on; libhivex writes it as one cell.
MAX_DATA = BIG_DATA_SEGMENT
MAX_NAME = 255  # key names (Windows: 255 characters); value names may be longer in Windows, not here
MAX_VALUE_NAME = 16383

BACKSLASH = "\\"
CHILD_TIMEOUT = 30.0  # seconds, plus one per 8 MiB of hive
ANSWER_OVERHEAD = 16 * MiB


# -- values and edits -------------------------------------------------------------------

@dataclass(frozen=True)
class RegValue:
    """A value's type and raw data, as stored in the hive."""

    type: int
    data: bytes

    @property
    def type_name(self) -> str:
        return TYPE_NAMES.get(self.type, f"REG_{self.type:#x}")

    def decoded(self):
        """int for DWORD/QWORD, str for strings, a list for REG_MULTI_SZ, else the bytes (as vhdtool reads values)."""
        try:
            return decode_value(self.type, self.data)
        except (Damage, UnicodeError):
            return self.data

    def to_json(self):
        """A JSON-able form for reports: decoded, with bytes as lower-case hex."""
        value = self.decoded()
        return value.hex() if isinstance(value, bytes) else value


def encode_value(value, type: int | str) -> RegValue:
    """``value`` as the raw data of a value of ``type`` (a REG_* number or name); bytes are taken as raw data."""
    vtype = TYPES_BY_NAME.get(type) if isinstance(type, str) else type
    if vtype not in TYPE_NAMES or isinstance(vtype, bool):
        raise UnsupportedLayout(None, f"registry value type {type!r} cannot be written",
                                hint="use REG_SZ, REG_EXPAND_SZ, REG_BINARY, REG_DWORD, REG_QWORD or REG_MULTI_SZ")
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    elif vtype in (REG_SZ, REG_EXPAND_SZ) and isinstance(value, str):
        data = _utf16z(value)
    elif vtype == REG_MULTI_SZ and isinstance(value, (list, tuple)) and all(isinstance(s, str) for s in value):
        if any(s == "" for s in value):
            raise UnsupportedLayout(None, "a REG_MULTI_SZ cannot hold an empty string (it would end the list)")
        data = b"".join(_utf16z(s) for s in value) + b"\0\0"
    elif vtype in (REG_DWORD, REG_QWORD) and isinstance(value, int) and not isinstance(value, bool):
        bits = 32 if vtype == REG_DWORD else 64
        if not 0 <= value < 1 << bits:
            raise UnsupportedLayout(None, f"{value} does not fit a {TYPE_NAMES[vtype]}")
        data = value.to_bytes(bits // 8, "little")
    else:
        raise UnsupportedLayout(None, f"{type!r} data cannot be made from a {_kind(value)}")
    if len(data) > MAX_DATA:
        raise UnsupportedLayout(None, f"a value of {len(data)} bytes is larger than libhivex can write "
                                      f"({MAX_DATA} bytes)")
    return RegValue(vtype, data)


def _kind(value) -> str:
    return type(value).__name__


def _utf16z(text: str) -> bytes:
    if "\0" in text:
        raise UnsupportedLayout(None, "registry strings cannot contain NUL characters")
    try:
        return text.encode("utf-16-le") + b"\0\0"
    except UnicodeEncodeError:
        raise UnsupportedLayout(None, "registry strings cannot contain lone surrogates") from None


def split_key(path: str) -> tuple[str, ...]:
    """A key path (backslashes, relative to the hive root) as its parts; "" is the root."""
    if not isinstance(path, str):
        raise UnsupportedLayout(None, f"key path {path!r} is not a string")
    stripped = path.strip("\\")
    if not stripped:
        return ()
    parts = tuple(stripped.split("\\"))
    for part in parts:
        if not part or len(part) > MAX_NAME or "\0" in part:
            raise UnsupportedLayout(None, f"key path {path!r} has an empty, over-long or NUL-holding part")
    return parts


@dataclass(frozen=True)
class HiveEdit:
    """One change: set a value, delete a value, or create a key (and its missing parents)."""

    action: str  # "set" | "delete" | "create_key"
    key: str
    name: str = ""  # "" is the key's default value
    value: RegValue | None = None

    @classmethod
    def set_value(cls, key: str, name: str, value, type: int | str) -> HiveEdit:
        """Set value ``name`` of ``key`` (created with its parents when missing)."""
        split_key(key)
        _check_value_name(name)
        return cls("set", key, name, encode_value(value, type))

    @classmethod
    def delete_value(cls, key: str, name: str) -> HiveEdit:
        """Delete value ``name`` of ``key``; no change when either is missing."""
        split_key(key)
        _check_value_name(name)
        return cls("delete", key, name)

    @classmethod
    def create_key(cls, key: str) -> HiveEdit:
        if not split_key(key):
            raise UnsupportedLayout(None, "the root key always exists; give a key path to create")
        return cls("create_key", key)


def _check_value_name(name: str) -> None:
    if not isinstance(name, str) or len(name) > MAX_VALUE_NAME or "\0" in name:
        raise UnsupportedLayout(None, f"value name {name!r} is not a valid registry value name")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsupportedLayout(None, f"value name {name!r} holds a lone surrogate") from None


@dataclass(frozen=True)
class EditOutcome:
    """What one edit found and did: ``old`` is the value before it (None when there was none)."""

    edit: HiveEdit
    old: RegValue | None
    changed: bool


@dataclass(frozen=True)
class EditResult:
    data: bytes  # the input object itself when nothing changed
    outcomes: tuple[EditOutcome, ...]

    @property
    def changed(self) -> bool:
        return any(o.changed for o in self.outcomes)


# -- ordering, as Windows and as libhivex see it ------------------------------------------

def windows_order(name: str) -> bytes:
    """Windows' subkey list order: names upcased, compared by UTF-16 code unit."""
    return fold(name).encode("utf-16-be", "surrogatepass")


def hivex_order(name: str) -> bytes:
    """libhivex's insertion order: strcasecmp on the UTF-8 name (ASCII letters lowercased)."""
    return name.encode("utf-8", "surrogatepass").translate(_ASCII_LOWER)


_ASCII_LOWER = bytes(c + 32 if 65 <= c <= 90 else c for c in range(256))


def _sign(a: bytes, b: bytes) -> int:
    return (a > b) - (a < b)


# -- the plan, made with vhdtool's own reader -----------------------------------------------

@dataclass
class _Plan:
    outcomes: list[EditOutcome]
    ops: list[tuple]  # what the child does, in order
    values: dict[tuple[tuple[str, ...], str], tuple[str, RegValue | None]]  # final state to check
    created: dict[tuple[str, ...], tuple[str, ...]]  # folded path -> path as given


class _State:
    """The hive as the edits so far leave it: the reader's answers, overlaid with the plan."""

    def __init__(self, hive: Hive):
        self.hive = hive
        self.keys: dict[tuple[str, ...], bool] = {(): True}
        self.values: dict[tuple[tuple[str, ...], str], RegValue | None] = {}
        self.new_children: dict[tuple[str, ...], list[str]] = {}

    def key_exists(self, parts: tuple[str, ...]) -> bool:
        folded = tuple(fold(p) for p in parts)
        found = self.keys.get(folded)
        if found is None:
            found = self.keys[folded] = self.hive.key("\\".join(parts)) is not None
        return found

    def value(self, parts: tuple[str, ...], name: str) -> RegValue | None:
        folded = (tuple(fold(p) for p in parts), fold(name))
        if folded in self.values:
            return self.values[folded]
        if not self.key_exists(parts):
            return None
        found = _read_values(self.hive, parts).get(_value_key(name))
        return None if found is None else found[1]


def _value_key(name: str) -> str:
    # The default value (no name) never matches a value that has one.
    return "\0default" if name == "" else fold(name)


def _read_values(hive: Hive, parts: tuple[str, ...]) -> dict[str, tuple[int, RegValue]]:
    """Values of an existing key by folded name (first of each name wins): (stored size, RegValue)."""
    path = "\\".join(parts)
    with hive._reading(path):
        found = hive._open(path)
        if found is None:
            return {}
        tree = hive._tree
        values: dict[str, tuple[int, RegValue]] = {}
        for vk in tree.value_keys(found[0]):
            (name_length,) = struct.unpack_from("<H", hive._cells.cell(vk.offset).read(4), 2)
            key = "\0default" if name_length == 0 else vk.folded
            if key not in values:
                values[key] = (vk.data_length & ~DATA_INLINE, RegValue(vk.type, tree.value_data(vk)))
        return values


def _plan(hive: Hive, edits: Sequence[HiveEdit], name: str, image_path) -> _Plan:
    state = _State(hive)
    outcomes: list[EditOutcome] = []
    ops: list[tuple] = []
    checked_sizes: set[tuple[str, ...]] = set()
    created: dict[tuple[str, ...], tuple[str, ...]] = {}
    for edit in edits:
        if not isinstance(edit, HiveEdit):
            raise UnsupportedLayout(image_path, f"{edit!r} is not a HiveEdit")
        parts = split_key(edit.key)
        where = BACKSLASH.join((name, *parts))
        if edit.action not in ("set", "delete", "create_key"):
            raise UnsupportedLayout(image_path, f"unknown registry edit {edit.action!r}")
        if edit.action == "set" and not isinstance(edit.value, RegValue):
            raise UnsupportedLayout(image_path, f"{where}: a value to set needs a RegValue")
        if edit.action == "create_key":
            missing = _missing_keys(state, parts, name, image_path, created)
            outcomes.append(EditOutcome(edit, None, bool(missing)))
            if missing:
                ops.append(("create_key", parts))
            continue
        old = state.value(parts, edit.name)
        new = edit.value if edit.action == "set" else None
        changed = old != new
        outcomes.append(EditOutcome(edit, old, changed))
        if not changed:
            continue  # a delete of a value that is not there (its key missing or not) lands here
        missing = _missing_keys(state, parts, name, image_path, created)
        folded = tuple(fold(p) for p in parts)
        if folded not in checked_sizes and state.key_exists(parts) and not missing:
            checked_sizes.add(folded)
            for size, _value in _read_values(hive, parts).values():
                if size > MAX_DATA:
                    raise UnsupportedLayout(
                        image_path, f"{where} holds a value of {size} bytes; libhivex would rewrite it "
                                    f"in a form Windows misreads, so values of this key are not changed")
        state.values[(folded, fold(edit.name))] = new
        ops.append((edit.action, parts, edit.name, None if new is None else (new.type, new.data)))
    final: dict[tuple[tuple[str, ...], str], tuple[str, RegValue | None]] = {}
    for op in ops:
        if op[0] != "create_key":
            parts = op[1]
            key = (tuple(fold(p) for p in parts), _value_key(op[2]))
            final[key] = (BACKSLASH.join(parts), op[2], state.values[(key[0], fold(op[2]))])
    return _Plan(outcomes, ops, final, created)


def _missing_keys(state: _State, parts: tuple[str, ...], name: str, image_path,
                  created: dict[tuple[str, ...], tuple[str, ...]]) -> list[tuple[str, ...]]:
    """The keys of ``parts`` that do not exist yet, checked and marked as existing from now on."""
    missing = []
    for depth in range(1, len(parts) + 1):
        prefix = parts[:depth]
        if state.key_exists(prefix):
            continue
        new_name = prefix[-1]
        where = BACKSLASH.join((name, *prefix))
        if not new_name.isascii() or not new_name.isprintable():
            raise UnsupportedLayout(image_path, f"{where}: libhivex can create keys with printable ASCII names only")
        folded = tuple(fold(p) for p in prefix)
        # Its siblings: those the hive has (none when the parent is new) and those made by earlier edits.
        siblings = list(state.new_children.get(folded[:-1], []))
        if folded[:-1] not in created:
            siblings += state.hive.subkey_names(BACKSLASH.join(prefix[:-1]))
        for sibling in siblings:
            if _sign(windows_order(new_name), windows_order(sibling)) != _sign(hivex_order(new_name),
                                                                              hivex_order(sibling)):
                raise UnsupportedLayout(image_path, f"{where}: libhivex would file this key in another place "
                                                    f"than Windows among its sibling {sibling!r}, so it is not created")
        state.keys[folded] = True
        state.new_children.setdefault(folded[:-1], []).append(new_name)
        created[folded] = prefix
        missing.append(prefix)
    return missing


# -- libhivex ---------------------------------------------------------------------------------

class HiveSetValue(ctypes.Structure):
    _fields_ = [("key", ctypes.c_char_p), ("t", ctypes.c_int), ("len", ctypes.c_size_t),
                ("value", ctypes.c_char_p)]


@dataclass(frozen=True)
class Library:
    lib: ctypes.CDLL  # opened with use_errno: ctypes.get_errno() is libhivex's errno after each call
    free: ctypes._CFuncPtr


_library: Library | None = None
_library_lock = threading.Lock()


def load(label) -> Library:
    """libhivex, opened on first use; MissingLibrary (naming libhivex0) when it is not installed."""
    global _library
    with _library_lock:
        if _library is None:
            load_library(SONAME, "libhivex", PACKAGE, label)  # a missing library is named here
            libc = load_library(LIBC_SONAME, "the C library", "libc6", label)
            # A second handle on the same library (dlopen counts references), keeping errno for us.
            lib = ctypes.CDLL(SONAME, use_errno=True)
            size_p = ctypes.POINTER(ctypes.c_size_t)
            for fn, restype, argtypes in (
                ("hivex_open", ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_int]),
                ("hivex_close", ctypes.c_int, [ctypes.c_void_p]),
                ("hivex_commit", ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]),
                ("hivex_root", ctypes.c_size_t, [ctypes.c_void_p]),
                ("hivex_node_name", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t]),
                ("hivex_node_children", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t]),
                ("hivex_node_add_child", ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]),
                ("hivex_node_values", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t]),
                ("hivex_value_key", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t]),
                ("hivex_value_value", ctypes.c_void_p,
                 [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_int), size_p]),
                ("hivex_node_set_values", ctypes.c_int,
                 [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.POINTER(HiveSetValue), ctypes.c_int]),
            ):
                f = getattr(lib, fn)
                f.restype, f.argtypes = restype, argtypes
            free = libc.free
            free.restype, free.argtypes = None, [ctypes.c_void_p]
            _library = Library(lib, free)
        return _library


# -- in the child ------------------------------------------------------------------------------

class _Session:
    """One libhivex handle on a memfd copy of the hive; runs in the sandbox child."""

    def __init__(self, library: Library, data: bytes):
        self.library = library
        self.lib = library.lib
        self.limit = len(data) // 8 + 1  # no list in the hive can name more cells than this
        source = os.memfd_create("hive", 0)
        _write_all(source, _hivex_checksum(data))
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
        wanted = _value_key(name)
        index = next((i for i, (key, _, _) in enumerate(values)
                      if _value_key(key.decode("utf-8", "surrogateescape")) == wanted), None)
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


def _hivex_checksum(data: bytes) -> bytes:
    """libhivex wants the raw XOR as checksum; Windows stores 1 or 0xFFFFFFFE when that is 0 or 0xFFFFFFFF."""
    raw = 0
    for (word,) in struct.iter_unpack("<I", data[:508]):
        raw ^= word
    (stored,) = struct.unpack_from("<I", data, 508)
    if stored != raw and stored == base_block_checksum(data):
        return data[:508] + struct.pack("<I", raw) + data[512:]
    return data


def apply_here(library: Library, data: bytes, ops: list[tuple]) -> dict:
    """Make every op with libhivex and commit the whole; runs in the child."""
    session = _Session(library, data)
    for op in ops:
        if op[0] == "create_key":
            session.key(op[1], create=True)
        else:
            action, parts, name, new = op
            node = session.key(parts, create=action == "set")
            session.set_values(node, action, name, new)
    return {"payload": session.commit()}


# -- the parent ---------------------------------------------------------------------------------

def edit_hive(data: bytes, edits: Sequence[HiveEdit], name: str,
              image_path: str | os.PathLike | None = None) -> EditResult:
    """``data`` with ``edits`` made, all or none; the input itself when no edit changes anything."""
    base = BaseBlock.parse(data[:BASE_BLOCK])
    if base is None or len(data) < BASE_BLOCK * 2:
        raise CorruptHive(image_path, f"{name} hive has no 'regf' base block")
    if not base.checksum_ok or base.seq1 != base.seq2:
        state = "its base block checksum is wrong" if not base.checksum_ok else \
            f"sequence numbers {base.seq1} and {base.seq2}"
        raise CorruptHive(image_path, f"{name} hive is dirty ({state}); its logs must be replayed before it is edited",
                          hint=BOOT_HINT)
    hive = Hive(io.BytesIO(data), name, image_path)
    plan = _plan(hive, edits, name, image_path)
    if not plan.ops:
        return EditResult(data, tuple(plan.outcomes))
    library = _load(name, image_path)
    cap = 2 * len(data) + ANSWER_OVERHEAD
    ops = plan.ops
    try:
        _answer, out = run_isolated(
            lambda: apply_here(library, data, ops),
            os.fspath(image_path) if image_path is not None else None,
            library="libhivex",
            subject=f"the {name} hive",
            cap=cap,
            timeout=CHILD_TIMEOUT + len(data) / (8 * MiB),
        )
    except MissingLibrary:
        raise
    except NativeError as e:
        raise CorruptHive(image_path, f"{name} hive cannot be edited: {e.problem}") from None
    out = _check_answer(data, out, plan, name, image_path)
    return EditResult(out, tuple(plan.outcomes))


def _load(name: str, image_path) -> Library:
    return load(os.fspath(image_path) if image_path is not None else None)


def _check_answer(data: bytes, out: bytes | None, plan: _Plan, name: str, image_path) -> bytes:
    """The child's hive, trusted only once vhdtool's own reader finds exactly the edits in it."""
    def lie(why: str) -> CorruptHive:
        return CorruptHive(image_path, f"{name} hive: libhivex's result fails vhdtool's check ({why})")

    if out is None or len(out) < len(data) or len(out) > 2 * len(data) + ANSWER_OVERHEAD:
        raise lie("its size")
    expected = bytearray(data[:BASE_BLOCK])
    (seq,) = struct.unpack_from("<I", data, 4)
    struct.pack_into("<II", expected, 4, (seq + 1) & 0xFFFFFFFF, (seq + 1) & 0xFFFFFFFF)
    got = bytearray(out[:BASE_BLOCK])
    for at in (40, 508):
        got[at : at + 4] = expected[at : at + 4]
    if got != expected:
        raise lie("its base block")
    (bins_size,) = struct.unpack_from("<I", out, 40)
    if bins_size % 4096 or BASE_BLOCK + bins_size > len(out):
        raise lie("its hive bins data size")
    problem = bins_problem(out, bins_size)
    if problem:
        raise lie(problem)
    fixed = bytearray(out)
    struct.pack_into("<I", fixed, 508, base_block_checksum(fixed))
    result = bytes(fixed)
    hive = Hive(io.BytesIO(result), name, image_path)
    for folded, path in plan.created.items():
        if hive.key("\\".join(path)) is None:
            raise lie(f"key {path} is missing")
    for (key_folded, value_key), (path, value_name, new) in plan.values.items():
        found = _read_values(hive, tuple(path.split("\\")) if path else ()).get(value_key)
        if (None if found is None else found[1]) != new:
            raise lie(f"value {value_name!r} of {path!r} reads back differently")
    for folded, path in plan.created.items():
        # The new key must sit where Windows' binary search looks for it.
        parent = "\\".join(path[:-1])
        names = hive.subkey_names(parent)
        at = next((i for i, n in enumerate(names) if fold(n) == folded[-1]), None)
        mine = windows_order(path[-1])
        if at is None or any(windows_order(n) >= mine for n in names[:at]) or \
                any(windows_order(n) <= mine for n in names[at + 1 :]):
            raise lie(f"key {path[-1]!r} is out of Windows' order among the subkeys of {parent!r}")
    return result
