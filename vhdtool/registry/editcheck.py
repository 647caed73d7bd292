"""Checks of libhivex's answer: the edited hive is trusted only when vhdtool's own reader finds exactly the edits.

The base block must be the input's but for the sequence numbers (one more), the
hive bins data size and the checksum; the hive bins must chain; every edited
value must read back as asked, every deleted one be gone, the other values of
each edited key (which libhivex rewrites too) be as they were, every created key
exist where Windows' binary search looks for it. The checksum is then made
Windows' (hivex stores a raw XOR of 0 or 0xFFFFFFFF, which Windows reads as a
bad checksum).
"""

from __future__ import annotations

import io
import struct

from vhdtool.errors import CorruptHive
from vhdtool.registry.editplan import EditPlan, read_values, windows_order
from vhdtool.registry.hive import Hive
from vhdtool.registry.hivefile import BASE_BLOCK, base_block_checksum, bins_problem
from vhdtool.registry.records import fold
from vhdtool.units import MiB

ANSWER_OVERHEAD = 16 * MiB  # an answer may be twice the hive and this much more (a grown hive)


def max_answer(data: bytes) -> int:
    """The most bytes a child's answer to an edit of ``data`` may hold."""
    return 2 * len(data) + ANSWER_OVERHEAD


def check_answer(data: bytes, out: bytes | None, plan: EditPlan, name: str, image_path) -> bytes:
    """The child's hive, trusted only once vhdtool's own reader finds exactly the edits in it."""
    def lie(why: str) -> CorruptHive:
        return CorruptHive(image_path, f"{name} hive: libhivex's result fails vhdtool's check ({why})")

    if out is None or len(out) < len(data) or len(out) > max_answer(data):
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
        found = read_values(hive, tuple(path.split("\\")) if path else ()).get(value_key)
        if (None if found is None else found[1]) != new:
            raise lie(f"value {value_name!r} of {path!r} reads back differently")
    _check_untouched_values(data, hive, plan, name, image_path, lie)
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


def _check_untouched_values(data: bytes, hive: Hive, plan: EditPlan, name: str, image_path, lie) -> None:
    """hivex_node_set_values rewrites every value of a key it changes: the values not edited must read back
    record for record as they were (names, types, data; a repeated name's records too)."""
    edited: dict[tuple[str, ...], tuple[str, set[str]]] = {}
    for (key_folded, value_key), (path, _value_name, _new) in plan.values.items():
        edited.setdefault(key_folded, (path, set()))[1].add(value_key)
    before = Hive(io.BytesIO(data), name, image_path)

    def others(h: Hive, path: str, names: set[str]) -> list[tuple]:
        return [(v.default, v.folded, v.type, v.data) for v in h.stored_values(path, every=True)
                if ("\0default" if v.default else v.folded) not in names]

    for path, names in edited.values():
        if others(hive, path, names) != others(before, path, names):
            raise lie(f"the other values of {path!r} read back differently")
