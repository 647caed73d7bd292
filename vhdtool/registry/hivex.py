"""Hive edits through libhivex (ctypes, hivex.h), run in the native sandbox, all or nothing.

``edit_hive(data, edits, name, image_path)`` sets values, deletes values and creates
keys in a hive held in memory, and returns the new hive bytes with, for each edit,
what was there before.

How
    Everything is decided here, in the parent, with vhdtool's own bounded reader
    (editplan.py): the old value of each edit (edits apply in order; a later edit
    sees an earlier one), whether it changes anything, and whether libhivex can
    make it safely. When no edit changes anything the input is returned as it is:
    hivex_commit always bumps both sequence numbers and rewrites the checksum, so
    calling libhivex for nothing would change the file. Otherwise the edits that
    change something run in ``vhdtool.native``'s forked, confined child
    (hivexchild.py, on the bindings of libhivex.py), which commits only when every
    edit succeeded (libguestfs' rule: commit only a whole edit). A failure or a
    crash of libhivex leaves nothing behind but a ``CorruptHive``. The parent
    trusts the answer only after reading it back with its own reader
    (editcheck.py), and then gives it Windows' checksum.

    A dirty hive (sequence numbers differ, or its checksum is wrong) is refused
    with ``CorruptHive``: replay its logs first (``vhdtool.registry.logreplay``).
    What callers ask for, and get back, is in values.py (``HiveEdit``,
    ``RegValue``, ``EditResult``); names, and the edits refused because libhivex
    would write what Windows misreads, are in editplan.py.

What libhivex leaves as it was: key timestamps (a changed key keeps its Last
written time; a new key gets its parent's), the base block's Last written
timestamp. Freed cells stay in the file as free cells.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

from vhdtool.errors import CorruptHive, MissingLibrary, NativeError
from vhdtool.native import run_isolated
from vhdtool.registry.editcheck import check_answer, max_answer
from vhdtool.registry.editplan import plan_edits
from vhdtool.registry.hive import Hive
from vhdtool.registry.hivexchild import apply_here
from vhdtool.registry.libhivex import Library, load
from vhdtool.registry.hivefile import BASE_BLOCK, BOOT_HINT, BaseBlock
from vhdtool.registry.values import EditResult, HiveEdit
from vhdtool.units import MiB

CHILD_TIMEOUT = 30.0  # seconds, plus one per 8 MiB of hive


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
    plan = plan_edits(hive, edits, name, image_path)
    if not plan.ops:
        return EditResult(data, tuple(plan.outcomes))
    library = _load(name, image_path)
    cap = max_answer(data)
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
    out = check_answer(data, out, plan, name, image_path)
    return EditResult(out, tuple(plan.outcomes))


def _load(name: str, image_path) -> Library:
    return load(os.fspath(image_path) if image_path is not None else None)
