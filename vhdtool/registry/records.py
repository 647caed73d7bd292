"""Key node, key value and subkey-list records of a regf hive (regf spec, "Key node", "Key value", "Subkeys list").

Each parser reads only the bytes its record needs from a ``Cell`` and checks
every length and count against the cell's size before it is trusted. Names and
values are decoded here with the results dissect.regf gives (tests compare the
two on random data); importing dissect.regf for that would cost every start of
vhdtool several milliseconds of structure parsing.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vhdtool.registry.cells import Cell, Damage

# CM_KEY_NODE up to its name; counts and lists are [stable, volatile].
KEY_NODE = struct.Struct("<2sHQIIIIIIIIIIIIIIIHH")
KEY_COMP_NAME = 0x0020
# CM_KEY_VALUE up to its name.
KEY_VALUE = struct.Struct("<2sHIIIHH")
VALUE_COMP_NAME = 0x0001
DATA_INLINE = 0x80000000
REG_NONE, REG_SZ, REG_EXPAND_SZ, REG_BINARY, REG_DWORD, REG_DWORD_BIG_ENDIAN = 0, 1, 2, 3, 4, 5
REG_MULTI_SZ = 7
REG_QWORD = 11
# CM_KEY_INDEX / CM_KEY_FAST_INDEX / CM_KEY_HASH_INDEX: signature, count, entries.
LIST_HEAD = struct.Struct("<2sH")
LEAF_ENTRY_SIZE = {b"li": 4, b"ri": 4, b"lf": 8, b"lh": 8}
# CM_BIG_DATA: signature, segment count, segment list.
BIG_DATA = struct.Struct("<2sHI")
BIG_DATA_SEGMENT = 16344  # CM_KEY_VALUE_BIG: payload bytes used of each segment
BIG_DATA_THRESHOLD = 0x3FD8  # larger values live in big data cells (format 1.4 and later)


def fold(name: str) -> str:
    """A name as Windows compares it: each character upcased, one for one."""
    upper = name.upper()
    if len(upper) == len(name):  # upcasing never shortens, so every character mapped to one
        return upper
    return "".join(u if len(u := c.upper()) == 1 else c for c in name)  # leave "ß", not "SS"


def name_hash(name: str) -> int:
    """The lh hash of ``name``: h = 37 * h + upcase(unit), over UTF-16 code units."""
    h = 0
    for (unit,) in struct.iter_unpack("<H", fold(name).encode("utf-16-le", "surrogatepass")):
        h = (h * 37 + unit) & 0xFFFFFFFF
    return h


def hint_of(name: str) -> str:
    """What an lf name hint holds for ``name``, folded: its first four characters."""
    return fold(name[:4])


@dataclass(frozen=True, slots=True)
class KeyNode:
    offset: int
    name: str
    folded: str
    flags: int
    parent: int
    last_written: int
    subkey_count: int
    subkey_list: int
    value_count: int
    value_list: int


@dataclass(frozen=True, slots=True)
class ValueKey:
    offset: int
    name: str
    folded: str
    type: int
    data_length: int
    data: int


def _expect(cell: Cell, sig: bytes, what: str) -> None:
    if (found := cell.read(2)) != sig:
        raise Damage(f"cell {cell.offset:#x} is {found!r}, not {what}")


def parse_key_node(cell: Cell) -> KeyNode:
    _expect(cell, b"nk", "a key node")
    head = cell.read(KEY_NODE.size)
    (_sig, flags, last_written, _spare, parent, subkeys, _vsubkeys, subkey_list, _vlist,
     value_count, value_list, *_rest, name_length, _class_length) = KEY_NODE.unpack(head)
    raw = cell.read(KEY_NODE.size + name_length)[KEY_NODE.size :]
    name = decode_name(raw, bool(flags & KEY_COMP_NAME))
    return KeyNode(cell.offset, name, fold(name), flags, parent, last_written,
                   subkeys, subkey_list, value_count, value_list)


def parse_value_key(cell: Cell) -> ValueKey:
    _expect(cell, b"vk", "a key value")
    head = cell.read(KEY_VALUE.size)
    _sig, name_length, data_length, data, vtype, flags, _spare = KEY_VALUE.unpack(head)
    if name_length == 0:
        name = "(Default)"
    else:
        raw = cell.read(KEY_VALUE.size + name_length)[KEY_VALUE.size :]
        name = decode_name(raw, bool(flags & VALUE_COMP_NAME))
    return ValueKey(cell.offset, name, fold(name), vtype, data_length, data)


def parse_list(cell: Cell) -> tuple[bytes, list[tuple[int, int | bytes | None]]]:
    """(signature, [(cell, hint)]) of an li/lf/lh leaf or ri root; hint is the lf bytes, the lh hash or None."""
    sig, count = LIST_HEAD.unpack(cell.read(LIST_HEAD.size))
    size = LEAF_ENTRY_SIZE.get(sig)
    if size is None:
        raise Damage(f"cell {cell.offset:#x} is {sig!r}, not a subkey list")
    if count * size > cell.capacity - LIST_HEAD.size:
        raise Damage(f"{sig.decode()} list at cell {cell.offset:#x} claims {count} entries, its cell holds "
                     f"{(cell.capacity - LIST_HEAD.size) // size}")
    body = cell.read(LIST_HEAD.size + count * size)[LIST_HEAD.size :]
    if sig == b"lf":
        return sig, list(struct.iter_unpack("<I4s", body))
    if sig == b"lh":
        return sig, list(struct.iter_unpack("<II", body))
    return sig, [(c, None) for (c,) in struct.iter_unpack("<I", body)]


def parse_value_list(cell: Cell, count: int) -> list[int]:
    """The first ``count`` entries of a value list, signed as dissect.regf reads them."""
    if count * 4 > cell.capacity:
        raise Damage(f"value list at cell {cell.offset:#x} holds {cell.capacity // 4} entries, its key claims {count}")
    return [c for (c,) in struct.iter_unpack("<i", cell.read(count * 4))]


def parse_big_data(cell: Cell) -> tuple[int, int]:
    """(segment count, segment list cell) of a db record."""
    _expect(cell, b"db", "big data")
    _sig, count, segments = BIG_DATA.unpack(cell.read(BIG_DATA.size))
    return count, segments


def decode_name(raw: bytes, compressed: bool) -> str:
    """A key or value name: one byte per character when the record says so, else UTF-16LE.

    As dissect.regf reads them: a one-byte name that is valid UTF-8 is read as UTF-8
    (else Latin-1); a UTF-16 name drops a trailing odd byte and, when it is not valid
    UTF-16, is shown as the repr of its bytes.
    """
    if compressed:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("latin-1")
    try:
        return raw[: len(raw) & ~1].decode("utf-16-le")
    except UnicodeDecodeError:
        return repr(raw)


def _fixed(data: bytes, size: int, fmt: str) -> int:
    if not data:
        return 0
    if len(data) < size:
        raise Damage(f"its type needs {size} bytes of data, it holds {len(data)}")
    return struct.unpack_from(fmt, data)[0]


def _string(data: bytes) -> str:
    """A REG_SZ: up to its terminator, in the encoding its bytes show."""
    if not data:
        return ""
    # One-byte text (ASCII, or NUL-terminated with a non-NUL second byte) is stored by
    # some writers as it is: read it as Latin-1 up to the first NUL.
    if (data.isascii() or data.endswith(b"\0")) and data[1:2] != b"\0":
        return data.split(b"\0", 1)[0].decode("latin-1")
    if len(data) % 2:
        data += b"\0"
    # UTF-16LE up to the first NUL code unit (an aligned pair of zero bytes).
    end = data.find(b"\0\0")
    while end >= 0 and end % 2:
        end = data.find(b"\0\0", end + 1)
    if end < 0:
        end = len(data)
    try:
        return data[:end].decode("utf-16-le")
    except UnicodeDecodeError:
        return data.decode("utf-16-le", "ignore").strip("\0")


def decode_value(vtype: int, data: bytes):
    """A value's data: int for DWORD and QWORD types, str for strings, a list for REG_MULTI_SZ, else bytes.

    The results are dissect.regf's ``parse_value``'s, in time linear in the size:
    dissect.regf grows each REG_MULTI_SZ string a code unit at a time (quadratic:
    800 KB take 14 s), so those are split here, with the same result: strings
    up to the first empty one, a trailing odd byte dropped, a lone surrogate an error.
    """
    if vtype == REG_DWORD:
        return _fixed(data, 4, "<I")
    if vtype == REG_DWORD_BIG_ENDIAN:
        return _fixed(data, 4, ">I")
    if vtype == REG_QWORD:
        return _fixed(data, 8, "<Q")
    if vtype in (REG_SZ, REG_EXPAND_SZ):
        return _string(data)
    if vtype != REG_MULTI_SZ:
        return data
    text = data[: len(data) & ~1].decode("utf-16-le", "surrogatepass")
    strings = []
    for piece in text.split("\0"):
        if not piece:
            break
        piece.encode("utf-16-le")  # UnicodeEncodeError on a lone surrogate, where dissect.regf fails too
        strings.append(piece)
    return strings
