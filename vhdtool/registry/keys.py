"""Subkey and value lookups over a hive's key tree, every list walked once.

Follows the regf spec's "Subkeys list", "Index root" and "Key values list".

Invariants enforced here (each broken one is ``Damage``):
- an index root (ri) holds leaves (li, lf, lh) only: Windows builds one level
  (CmpFindSubKeyInRoot), so a nested or self-naming root is a loop, not a tree;
- an index root names a leaf at most once, a key's subkey list names a key cell
  at most once, a value list names a value cell at most once, big data names a
  segment at most once: a repeat only multiplies a reader's work;
- a list's count fits its cell (records.py).

Everything parsed is kept by cell index, so each key node, value key and list is
parsed at most once per ``KeyTree``; a repeated lookup costs a dict probe.

Lookups compare names as Windows does, each character upcased. The lf name hint
and the lh hash only pick which key nodes to read first; when none of those
matches, every key node of the list is read and compared before the answer is
"no such key", so a wrong or unusual hint never hides a key.
"""

from __future__ import annotations

import struct

from vhdtool.registry.cells import Damage, HiveCells
from vhdtool.registry.records import (
    BIG_DATA_SEGMENT,
    BIG_DATA_THRESHOLD,
    DATA_INLINE,
    KeyNode,
    ValueKey,
    fold,
    hint_of,
    name_hash,
    parse_big_data,
    parse_key_node,
    parse_list,
    parse_value_key,
    parse_value_list,
)

# No value in a SOFTWARE or SYSTEM hive comes near this; big data could address 1 GiB.
MAX_VALUE_DATA = 64 * 1024 * 1024


class KeyTree:
    """The keys and values of one hive, read through ``HiveCells``."""

    def __init__(self, cells: HiveCells, big_data: bool):
        self.cells = cells
        self.big_data = big_data  # format 1.4 and later keep values over 16344 bytes in db cells
        self._nodes: dict[int, KeyNode] = {}
        self._value_keys: dict[int, ValueKey] = {}
        self._entries: dict[int, tuple[tuple[int, bytes, int | bytes | None], ...]] = {}
        self._children: dict[int, tuple[KeyNode, ...]] = {}
        self._by_name: dict[int, dict[str, KeyNode]] = {}
        self._hinted: set[int] = set()
        self._values: dict[tuple[int, int], tuple[ValueKey, ...]] = {}
        self._values_by_name: dict[tuple[int, int], dict[str, ValueKey]] = {}

    # -- cells, parsed once ----------------------------------------------------------
    def node(self, offset: int) -> KeyNode:
        node = self._nodes.get(offset)
        if node is None:
            node = self._nodes[offset] = parse_key_node(self.cells.cell(offset))
        return node

    def _value_key(self, offset: int) -> ValueKey:
        vk = self._value_keys.get(offset)
        if vk is None:
            vk = self._value_keys[offset] = parse_value_key(self.cells.cell(offset))
        return vk

    # -- subkeys --------------------------------------------------------------------
    def _subkey_entries(self, node: KeyNode) -> tuple[tuple[int, bytes, int | bytes | None], ...]:
        """(key cell, leaf signature, hint) of every subkey, in list order, an index root flattened."""
        top = node.subkey_list
        entries = self._entries.get(top)
        if entries is not None:
            return entries
        sig, items = parse_list(self.cells.cell(top))
        self.cells.follow(len(items))
        if sig == b"ri":
            leaves: set[int] = set()
            flat: list[tuple[int, bytes, int | bytes | None]] = []
            for leaf, _ in items:
                if leaf in leaves:
                    raise Damage(f"index root at cell {top:#x} names leaf {leaf:#x} twice")
                leaves.add(leaf)
                leaf_sig, leaf_items = parse_list(self.cells.cell(leaf))
                if leaf_sig == b"ri":
                    raise Damage(f"index root at cell {top:#x} names index root {leaf:#x}; roots hold leaves only")
                self.cells.follow(len(leaf_items))
                flat.extend((cell, leaf_sig, hint) for cell, hint in leaf_items)
        else:
            flat = [(cell, sig, hint) for cell, hint in items]
        seen: set[int] = set()
        for cell, _, _ in flat:
            if cell in seen:
                raise Damage(f"subkey list at cell {top:#x} names key cell {cell:#x} twice")
            seen.add(cell)
        entries = self._entries[top] = tuple(flat)
        return entries

    def children(self, node: KeyNode) -> tuple[KeyNode, ...]:
        if not node.subkey_count:  # as Windows and dissect.regf: no count, no list
            return ()
        top = node.subkey_list
        children = self._children.get(top)
        if children is None:
            children = self._children[top] = tuple(self.node(cell) for cell, _, _ in self._subkey_entries(node))
        return children

    def child(self, node: KeyNode, name: str) -> KeyNode | None:
        """The subkey of ``node`` called ``name`` (any case), or None."""
        if not node.subkey_count:
            return None
        top = node.subkey_list
        by_name = self._by_name.get(top)
        if by_name is None:
            entries = self._subkey_entries(node)
            if top not in self._hinted:
                # First lookup in this list: read only the key nodes the hints point at.
                self._hinted.add(top)
                found = self._through_hints(entries, name)
                if found is not None:
                    return found
            by_name = {}
            for sub in self.children(node):
                by_name.setdefault(sub.folded, sub)
            self._by_name[top] = by_name
        return by_name.get(fold(name))

    def _through_hints(self, entries, name: str) -> KeyNode | None:
        wanted, wanted_hash, wanted_hint = fold(name), name_hash(name), hint_of(name)
        for cell, sig, hint in entries:
            if sig == b"lh" and hint != wanted_hash:
                continue
            if sig == b"lf" and fold(hint.rstrip(b"\0").decode("latin-1")) != wanted_hint:
                continue
            sub = self.node(cell)
            if sub.folded == wanted:
                return sub
        return None

    # -- values -----------------------------------------------------------------------
    def value_keys(self, node: KeyNode) -> tuple[ValueKey, ...]:
        if not node.value_count:
            return ()
        key = (node.value_list, node.value_count)
        vks = self._values.get(key)
        if vks is None:
            entries = parse_value_list(self.cells.cell(node.value_list), node.value_count)
            self.cells.follow(len(entries))
            seen: set[int] = set()
            found = []
            for entry in entries:
                if entry <= 2:  # as dissect.regf: no value there (also what a set high bit reads as)
                    continue
                if entry in seen:
                    raise Damage(f"value list at cell {node.value_list:#x} names value cell {entry:#x} twice")
                seen.add(entry)
                found.append(self._value_key(entry))
            vks = self._values[key] = tuple(found)
        return vks

    def value_key(self, node: KeyNode, name: str) -> ValueKey | None:
        """The first value of ``node`` called ``name`` (any case), or None."""
        vks = self.value_keys(node)
        key = (node.value_list, node.value_count)
        by_name = self._values_by_name.get(key)
        if by_name is None:
            by_name = {}
            for vk in vks:
                by_name.setdefault(vk.folded, vk)
            self._values_by_name[key] = by_name
        return by_name.get(fold(name))

    def value_data(self, vk: ValueKey) -> bytes:
        """The raw data of ``vk``, as dissect.regf's KeyValue.data reads it."""
        size = vk.data_length & ~DATA_INLINE
        if vk.data_length & DATA_INLINE:
            return struct.pack("<I", vk.data)[:size]
        if size == 0:
            return b""
        if size > MAX_VALUE_DATA:
            raise Damage(f"value {vk.name!r} at cell {vk.offset:#x} claims {size} bytes of data")
        if self.big_data and size > BIG_DATA_THRESHOLD:
            data = self._big_data(vk, size)
        else:
            cell = self.cells.cell(vk.data)
            data = cell.read(min(size, cell.capacity))
        return data

    def _big_data(self, vk: ValueKey, size: int) -> bytes:
        count, segment_list = parse_big_data(self.cells.cell(vk.data))
        segments = parse_value_list(self.cells.cell(segment_list), count)
        needed = -(-size // BIG_DATA_SEGMENT)
        self.cells.follow(min(count, needed))
        parts = []
        seen: set[int] = set()
        for segment in segments[:needed]:
            if segment in seen:
                raise Damage(f"big data at cell {vk.data:#x} names segment {segment:#x} twice")
            seen.add(segment)
            cell = self.cells.cell(segment & 0xFFFFFFFF)
            parts.append(cell.read(min(cell.capacity, BIG_DATA_SEGMENT)))
        return b"".join(parts)[:size]
