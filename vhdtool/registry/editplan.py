"""Hive edit planning: each edit's outcome, decided by vhdtool's own reader, and subkey order as Windows and libhivex see it.

Edits apply in order and a later edit sees an earlier one; the plan holds each
edit's outcome, the operations the libhivex child makes, and the final state
the result is checked against (editcheck.py).

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
    - any change to the values of a key holding a value whose name contains a NUL
      character (Windows' names are counted strings; libhivex hands names over as
      C strings, so its rewrite would cut the name at the NUL).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vhdtool.errors import UnsupportedLayout
from vhdtool.registry.hive import Hive
from vhdtool.registry.records import fold
from vhdtool.registry.values import MAX_DATA, EditOutcome, HiveEdit, RegValue, split_key

BACKSLASH = "\\"


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
class EditPlan:
    """Each edit's outcome, the child's operations in order, and the state the result must show."""

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
        found = read_values(self.hive, parts).get(value_key(name))
        return None if found is None else found[1]


def value_key(name: str) -> str:
    # The default value (no name) never matches a value that has one.
    return "\0default" if name == "" else fold(name)


def read_values(hive: Hive, parts: tuple[str, ...]) -> dict[str, tuple[int, RegValue]]:
    """Values of an existing key by ``value_key`` (first of each name wins): (stored size, RegValue)."""
    return {"\0default" if v.default else v.folded: (v.size, RegValue(v.type, v.data))
            for v in hive.stored_values("\\".join(parts))}


def plan_edits(hive: Hive, edits: Sequence[HiveEdit], name: str, image_path) -> EditPlan:
    """The plan of ``edits`` on ``hive``; UnsupportedLayout for an edit libhivex would make wrongly."""
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
            # Every record counts, a repeated name's too: libhivex rewrites them all.
            for stored in hive.stored_values(BACKSLASH.join(parts), every=True):
                if stored.size > MAX_DATA:
                    raise UnsupportedLayout(
                        image_path, f"{where} holds a value of {stored.size} bytes; libhivex would rewrite it "
                                    f"in a form Windows misreads, so values of this key are not changed")
                if "\0" in stored.folded:
                    raise UnsupportedLayout(
                        image_path, f"{where} holds a value whose name contains a NUL character; libhivex would "
                                    f"cut the name there, so values of this key are not changed")
        state.values[(folded, fold(edit.name))] = new
        ops.append((edit.action, parts, edit.name, None if new is None else (new.type, new.data)))
    final: dict[tuple[tuple[str, ...], str], tuple[str, RegValue | None]] = {}
    for op in ops:
        if op[0] != "create_key":
            parts = op[1]
            key = (tuple(fold(p) for p in parts), value_key(op[2]))
            final[key] = (BACKSLASH.join(parts), op[2], state.values[(key[0], fold(op[2]))])
    return EditPlan(outcomes, ops, final, created)


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
