"""Registry values and edits as vhdtool writes them: REG_* types, encoding, checked key paths, edits and their outcomes."""

from __future__ import annotations

from dataclasses import dataclass

from vhdtool.errors import UnsupportedLayout
from vhdtool.registry.cells import Damage
from vhdtool.registry.records import (
    BIG_DATA_SEGMENT,
    REG_BINARY,
    REG_DWORD,
    REG_EXPAND_SZ,
    REG_MULTI_SZ,
    REG_NONE,
    REG_QWORD,
    REG_SZ,
    decode_value,
)

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
