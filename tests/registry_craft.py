"""Build regf hive bytes in Python, well-formed or hostile, for the registry layer's tests.

Layout follows msuhanov's "Windows registry file format specification": a 4 KiB
base block (checksum over its first 508 bytes), then one hive bin holding every
cell; cells are 8-byte aligned, their size negative while allocated, and the bin
ends in one free cell so hivex accepts the file. Offsets given to and returned by
``HiveBuilder`` are cell indexes (relative to the first bin), as the format uses.
Nothing checks what it is asked to write: that is how hostile hives are made.
"""

from __future__ import annotations

import struct

BASE_BLOCK = 4096
HBIN_HEADER = 32
NO_CELL = 0xFFFFFFFF
KEY_COMP_NAME = 0x0020
KEY_HIVE_ENTRY = 0x0004
VALUE_COMP_NAME = 0x0001
BIG_DATA_THRESHOLD = 0x3FD8  # larger values are split into db segments (format 1.4 and later)
BIG_DATA_SEGMENT = 16344

REG_SZ, REG_EXPAND_SZ, REG_BINARY, REG_DWORD, REG_MULTI_SZ, REG_QWORD = 1, 2, 3, 4, 7, 11


def xor_checksum(block: bytes) -> int:
    value = 0
    for (word,) in struct.iter_unpack("<I", block[:508]):
        value ^= word
    return {0: 1, 0xFFFFFFFF: 0xFFFFFFFE}.get(value, value)


def encode_name(name: str) -> tuple[bytes, bool]:
    """(bytes, compressed): Latin-1 names are stored one byte a character."""
    try:
        return name.encode("latin-1"), True
    except UnicodeEncodeError:
        return name.encode("utf-16-le"), False


def name_hash(name: str) -> int:
    """The lh hash Windows stores: h = 37 * h + upcase(unit) over UTF-16 code units."""
    h = 0
    for (unit,) in struct.iter_unpack("<H", name.encode("utf-16-le")):
        up = chr(unit).upper()
        h = (h * 37 + (ord(up) if len(up) == 1 else unit)) & 0xFFFFFFFF
    return h


def name_hint(name: str) -> bytes:
    """The lf hint: the first four characters, one byte each."""
    return name[:4].encode("latin-1", "replace").ljust(4, b"\0")


class HiveBuilder:
    """Cells appended one after another into one hive bin, after the bins of ``base`` if given."""

    def __init__(self, minor: int = 5, base: bytes | None = None):
        self.minor = minor
        self.base = base[:BASE_BLOCK] if base else None
        self.bins = bytearray(base[BASE_BLOCK:] if base else b"")
        self.bin_start = len(self.bins)
        self.bins += bytes(HBIN_HEADER)

    # -- raw cells ------------------------------------------------------------
    def cell(self, payload: bytes, size: int | None = None) -> int:
        """Append an allocated cell; ``size`` overrides the size field (hostile claims)."""
        offset = len(self.bins)
        length = (4 + len(payload) + 7) & ~7
        self.bins += struct.pack("<i", -(size if size is not None else length)) + payload
        self.bins += bytes(offset + length - len(self.bins))
        return offset

    def patch(self, offset: int, at: int, fmt: str, *values) -> None:
        """Overwrite a field at payload offset ``at`` of the cell at ``offset``."""
        struct.pack_into("<" + fmt, self.bins, offset + 4 + at, *values)

    # -- records --------------------------------------------------------------
    def key(self, name: str, parent: int = NO_CELL, *, root: bool = False) -> int:
        raw, comp = encode_name(name)
        flags = (KEY_COMP_NAME if comp else 0) | (KEY_HIVE_ENTRY | 0x0008 if root else 0)
        head = struct.pack(
            "<2sHQII", b"nk", flags, 0x01D0000000000000, 0, parent if parent != NO_CELL else 0
        )
        counts = struct.pack("<IIIIII", 0, 0, NO_CELL, NO_CELL, 0, NO_CELL)
        rest = struct.pack("<IIIIIIIHH", NO_CELL, NO_CELL, 0, 0, 0, 0, 0, len(raw), 0)
        return self.cell(head + counts + rest + raw)

    def set_subkeys(self, key: int, count: int, lst: int) -> None:
        self.patch(key, 20, "I", count)
        self.patch(key, 28, "I", lst)

    def set_values(self, key: int, count: int, lst: int) -> None:
        self.patch(key, 36, "II", count, lst)

    def lf(self, entries: list[tuple[int, bytes]], count: int | None = None) -> int:
        body = b"".join(struct.pack("<I4s", cell, hint) for cell, hint in entries)
        return self.cell(struct.pack("<2sH", b"lf", len(entries) if count is None else count) + body)

    def lh(self, entries: list[tuple[int, int]], count: int | None = None) -> int:
        body = b"".join(struct.pack("<II", cell, h) for cell, h in entries)
        return self.cell(struct.pack("<2sH", b"lh", len(entries) if count is None else count) + body)

    def li(self, cells: list[int], sig: bytes = b"li", count: int | None = None) -> int:
        body = b"".join(struct.pack("<I", c) for c in cells)
        return self.cell(struct.pack("<2sH", sig, len(cells) if count is None else count) + body)

    def ri(self, leaves: list[int], count: int | None = None) -> int:
        return self.li(leaves, b"ri", count)

    def value(self, name: str, vtype: int, data: bytes) -> int:
        raw, comp = encode_name(name)
        if len(data) <= 4:
            length, where = 0x80000000 | len(data), int.from_bytes(data.ljust(4, b"\0"), "little")
        elif len(data) > BIG_DATA_THRESHOLD and self.minor > 4:
            segments = [self.cell(data[i : i + BIG_DATA_SEGMENT]) for i in range(0, len(data), BIG_DATA_SEGMENT)]
            lst = self.value_list(segments)
            length, where = len(data), self.cell(struct.pack("<2sHI", b"db", len(segments), lst))
        else:
            length, where = len(data), self.cell(data)
        flags = VALUE_COMP_NAME if comp else 0
        return self.cell(struct.pack("<2sHIIIHH", b"vk", len(raw), length, where, vtype, flags, 0) + raw)

    def value_list(self, cells: list[int]) -> int:
        return self.cell(b"".join(struct.pack("<I", c) for c in cells))

    # -- convenience: a tree of keys ---------------------------------------------
    def subkeys(self, parent: int, names: list[str], kind: str = "lh") -> list[int]:
        """Add child keys ``names`` (in this order) to ``parent`` under one leaf list."""
        keys = [self.key(n, parent) for n in names]
        if kind == "lh":
            lst = self.lh([(k, name_hash(n)) for k, n in zip(keys, names)])
        elif kind == "lf":
            lst = self.lf([(k, name_hint(n)) for k, n in zip(keys, names)])
        else:
            lst = self.li(keys)
        self.set_subkeys(parent, len(keys), lst)
        return keys

    def values(self, key: int, items: list[tuple[str, int, bytes]]) -> list[int]:
        cells = [self.value(n, t, d) for n, t, d in items]
        self.set_values(key, len(cells), self.value_list(cells))
        return cells

    # -- the file -------------------------------------------------------------------
    def build(self, root: int | None = None, seq: tuple[int, int] = (1, 1)) -> bytes:
        """The hive file; ``root`` defaults to the base hive's root key."""
        bins = bytearray(self.bins)
        end = (len(bins) + 8 + 4095) & ~4095
        free = end - len(bins)
        bins += struct.pack("<i", free) + bytes(free - 4)
        struct.pack_into("<4sII", bins, self.bin_start, b"hbin", self.bin_start, end - self.bin_start)
        if self.base is not None:
            base = bytearray(self.base)
            struct.pack_into("<I", base, 36, struct.unpack_from("<I", base, 36)[0] if root is None else root)
            struct.pack_into("<I", base, 40, end)
        else:
            base = bytearray(BASE_BLOCK)
            struct.pack_into("<4sIIQIIIIIII", base, 0, b"regf", seq[0], seq[1], 0, 1, self.minor, 0, 1, root, end, 1)
        struct.pack_into("<I", base, 508, xor_checksum(base))
        return bytes(base) + bytes(bins)


def encode_sz(text: str) -> bytes:
    return (text + "\0").encode("utf-16-le")


def encode_multi_sz(items: list[str]) -> bytes:
    return "".join(s + "\0" for s in items).encode("utf-16-le") + b"\0\0"


# -- reading what hivex wrote (to patch it), independently of vhdtool -------------------

def key_cell(hive: bytes, path: str) -> int:
    """The nk cell at ``path`` in a hive whose lists are lf/lh leaves (as hivex writes them)."""
    (node,) = struct.unpack_from("<I", hive, 36)
    for part in filter(None, path.split("\\")):
        for child, _ in subkey_list(hive, node):
            nk = BASE_BLOCK + child + 4
            (length,) = struct.unpack_from("<H", hive, nk + 72)
            if hive[nk + 76 : nk + 76 + length].decode("latin-1").lower() == part.lower():
                node = child
                break
        else:
            raise KeyError(path)
    return node


def subkey_list(hive: bytes, key: int) -> list[tuple[int, int]]:
    """(cell, hint) entries of an nk's single lf/lh leaf."""
    count, lst = struct.unpack_from("<I4xI", hive, BASE_BLOCK + key + 4 + 20)
    if not count:
        return []
    sig, n = struct.unpack_from("<2sH", hive, BASE_BLOCK + lst + 4)
    assert sig in (b"lf", b"lh"), sig
    return list(struct.iter_unpack("<II", hive[BASE_BLOCK + lst + 8 : BASE_BLOCK + lst + 8 + 8 * n]))


def split_into_index_root(hive: bytes, path: str, leaves: int) -> bytes:
    """The hive with the subkey list of ``path`` split into ``leaves`` lh leaves under an ri, as Windows does."""
    key = key_cell(hive, path)
    entries = subkey_list(hive, key)
    b = HiveBuilder(base=hive)
    step = -(-len(entries) // leaves)
    lhs = [b.lh(entries[i : i + step]) for i in range(0, len(entries), step)]
    b.patch(key, 28, "I", b.ri(lhs))
    return b.build()


# -- hostile hives: every one below is well-formed cell by cell ------------------------

LOOKUP = "Lookup"  # the name the hostile lists pretend to hold


def _root_and_big(b: HiveBuilder) -> tuple[int, int]:
    root = b.key("ROOT", root=True)
    (big,) = b.subkeys(root, ["Big"])
    return root, big


def _leaves(b: HiveBuilder, entries: list[tuple[int, int]]) -> int:
    """One lh leaf, or an ri over as many leaves as 65535-entry lists need."""
    if len(entries) <= 0xFFFF:
        return b.lh(entries)
    return b.ri([b.lh(entries[i : i + 0xFFFF]) for i in range(0, len(entries), 0xFFFF)])


def lf_repeat(n: int) -> bytes:
    """Big's subkey list names one key cell ``n`` times, each entry hinting at LOOKUP."""
    b = HiveBuilder()
    root, big = _root_and_big(b)
    dupe = b.key("Dupe", big)
    if n <= 0xFFFF:
        lst = b.lf([(dupe, name_hint(LOOKUP))] * n)
    else:
        lst = b.ri([b.lf([(dupe, name_hint(LOOKUP))] * min(0xFFFF, n - i)) for i in range(0, n, 0xFFFF)])
    b.set_subkeys(big, n, lst)
    return b.build(root)


def ri_repeat(n: int) -> bytes:
    """Big's index root names one leaf ``n`` times; the leaf names one key ``n`` times."""
    b = HiveBuilder()
    root, big = _root_and_big(b)
    dupe = b.key("Dupe", big)
    leaf = b.lh([(dupe, name_hash(LOOKUP))] * n)
    b.set_subkeys(big, min(n * n, 0xFFFFFFFF), b.ri([leaf] * n))
    return b.build(root)


def ri_nesting(depth: int, fanout: int = 2) -> bytes:
    """Index roots ``depth`` deep, each naming the next one ``fanout`` times: fanout**depth leaves."""
    b = HiveBuilder()
    root, big = _root_and_big(b)
    (leaf_key,) = [b.key("Dupe", big)]
    node = b.lh([(leaf_key, name_hash("Dupe"))])
    for _ in range(depth):
        node = b.ri([node] * fanout)
    b.set_subkeys(big, min(fanout**depth, 0xFFFFFFFF), node)
    return b.build(root)


def ri_self(n: int = 1) -> bytes:
    """Big's index root names itself."""
    b = HiveBuilder()
    root, big = _root_and_big(b)
    ri = b.ri([0] * n)
    b.patch(ri, 4, "I" * n, *[ri] * n)
    b.set_subkeys(big, 1, ri)
    return b.build(root)


def value_repeat(n: int) -> bytes:
    """Big's value list names one value cell ``n`` times."""
    b = HiveBuilder()
    root, big = _root_and_big(b)
    vk = b.value("Dup", REG_DWORD, (1).to_bytes(4, "little"))
    b.set_values(big, n, b.value_list([vk] * n))
    return b.build(root)


def value_count(n: int, claimed: int) -> bytes:
    """Big has ``n`` distinct values but claims ``claimed``."""
    b = HiveBuilder()
    root, big = _root_and_big(b)
    cells = [b.value(f"V{i}", REG_DWORD, i.to_bytes(4, "little")) for i in range(n)]
    b.set_values(big, claimed, b.value_list(cells))
    return b.build(root)


def many_values(n: int) -> bytes:
    """Big has ``n`` distinct values: large but well-formed."""
    return value_count(n, n)


def many_subkeys(n: int, hashes_wrong: bool = False) -> bytes:
    """Big has ``n`` distinct subkeys K00000.. (lh leaves, an ri past 65535); hashes may all be wrong."""
    b = HiveBuilder()
    root, big = _root_and_big(b)
    names = [f"K{i:05d}" for i in range(n)]
    keys = [b.key(name, big) for name in names]
    entries = [(k, name_hash(name) ^ (1 if hashes_wrong else 0)) for k, name in zip(keys, names)]
    b.set_subkeys(big, n, _leaves(b, entries))
    return b.build(root)


def cell_size(n: int, size: int, filler: int = 0) -> bytes:
    """Big has ``n`` subkeys (li) whose cells' size fields say ``size``, and ``filler`` bytes of data after them."""
    b = HiveBuilder()
    root, big = _root_and_big(b)
    keys = [b.key(f"K{i:05d}", big) for i in range(n)]
    for k in keys:
        struct.pack_into("<i", b.bins, k, size)
    b.set_subkeys(big, n, b.li(keys))
    if filler:
        b.cell(bytes(filler))
    return b.build(root)


def cycle(depth: int = 1) -> bytes:
    """A chain Big\\C1\\..\\C<depth> whose last key lists Big again."""
    b = HiveBuilder()
    root, big = _root_and_big(b)
    node = big
    for i in range(1, depth + 1):
        (node,) = b.subkeys(node, [f"C{i}"])
    b.set_subkeys(node, 1, b.lh([(big, name_hash("Big"))]))
    return b.build(root)


def shared_leaf(keys: int, n: int) -> bytes:
    """``keys`` keys under Big, each with its own index root naming one shared leaf of ``n`` subkeys."""
    b = HiveBuilder()
    root, big = _root_and_big(b)
    owners = b.subkeys(big, [f"O{i:05d}" for i in range(keys)])
    names = [f"S{i:05d}" for i in range(n)]
    leaf = b.lh([(b.key(name, owners[0]), name_hash(name)) for name in names])
    for owner in owners:
        b.set_subkeys(owner, n, b.ri([leaf]))
    return b.build(root)


def multi_sz(n: int) -> bytes:
    """Big has one REG_MULTI_SZ value of ``n`` characters with no terminator."""
    b = HiveBuilder()
    root, big = _root_and_big(b)
    b.values(big, [("Multi", REG_MULTI_SZ, "x".encode("utf-16-le") * n)])
    return b.build(root)


def big_data_repeat(n: int) -> bytes:
    """Big's one value is big data whose segment list names one 16 KiB segment ``n`` times."""
    b = HiveBuilder()
    root, big = _root_and_big(b)
    segment = b.cell(b"Z" * 16344)
    segments = b.value_list([segment] * n)
    db = b.cell(struct.pack("<2sHI", b"db", n, segments))
    raw, _ = encode_name("Blob")
    vk = b.cell(struct.pack("<2sHIIIHH", b"vk", len(raw), n * 16344, db, REG_BINARY, VALUE_COMP_NAME, 0) + raw)
    b.set_values(big, 1, b.value_list([vk]))
    return b.build(root)
