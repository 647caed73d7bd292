#!/usr/bin/env python3
"""Benchmark the registry layer on hostile hives: dissect.regf's own walk against vhdtool.registry.

Each pattern (tests/registry_craft.py builds them; every cell is well-formed) is
grown step by step, and the same lookups vhdtool does (open a path, list values,
list subkey names) are timed twice, each in a child process with a time limit:
``dissect`` is what vhdtool.registry did before (``RegistryHive.open`` and its
KeyNode methods, which the old ``Hive`` wrapped), ``vhdtool`` is the bounded walk.
The table gives seconds (or the limit hit), and what vhdtool answered, with its
work units (cells read + list entries followed + 4 KiB pages).

    python3 bench/hostile_hive.py [--limit SECONDS] [--only PATTERN ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Imports from the project's root and tests/, not from this folder.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import argparse  # noqa: E402
import io  # noqa: E402
import multiprocessing  # noqa: E402
import time  # noqa: E402

import registry_craft as rc  # noqa: E402

# pattern: (builder, sizes, lookups). A lookup is (method, args...); lookups may be a function of n.
PATTERNS = {
    "lf-repeat": (rc.lf_repeat, [1_000, 10_000, 100_000, 1_000_000],
                  [("key", "Big\\Lookup"), ("subkey_names", "Big")]),
    "ri-repeat": (rc.ri_repeat, [1_000, 2_000, 4_000, 8_000, 16_000], [("key", "Big\\Lookup")]),
    "ri-nesting": (rc.ri_nesting, [10, 15, 20, 25], [("key", "Big\\Lookup")]),
    "ri-chain": (lambda n: rc.ri_nesting(n, fanout=1), [100, 1_000, 10_000], [("key", "Big\\Lookup")]),
    "value-repeat": (rc.value_repeat, [1_000, 10_000, 100_000, 1_000_000],
                     [("value", "Big", "Missing"), ("values", "Big")]),
    "value-count": (lambda n: rc.value_count(3, n), [0xFFFFFFFF], [("values", "Big")]),
    "cell-size-0": (lambda n: rc.cell_size(n, 0, filler=16 << 20), [10, 100, 1_000, 10_000], [("key", "Big\\Nope")]),
    "cycle": (rc.cycle, [1, 100],
              lambda n: [("key", "Big" + "".join(f"\\C{i}" for i in range(1, n + 1)) + "\\Big"),
                         ("subkey_names", "Big" + "".join(f"\\C{i}" for i in range(1, n + 1)))]),
    "shared-leaf": (lambda n: rc.shared_leaf(n, n), [250, 500, 1_000, 2_000],
                    [("subkey_names_all", "Big")]),
    "multi-sz": (rc.multi_sz, [100_000, 400_000, 1_600_000, 6_400_000], [("values", "Big")]),
    "big-data-repeat": (rc.big_data_repeat, [1_000, 10_000, 65_535], [("values", "Big")]),
    "many-subkeys (normal)": (rc.many_subkeys, [1_000, 10_000, 100_000],
                              [("key", "Big\\k00999"), ("subkey_names", "Big")]),
    "many-values (normal)": (rc.many_values, [1_000, 10_000, 100_000], [("value", "Big", "v999"), ("values", "Big")]),
    # Distinct keys, each read once: what the hive-wide cap (cells.MAX_BUDGET) costs before it stops a walk.
    "budget-cap": (rc.many_subkeys, [400_000, 600_000], [("subkey_names", "Big")]),
}


class DissectHive:
    """What vhdtool.registry.Hive did before: dissect.regf's open() and KeyNode methods."""

    def __init__(self, stream):
        from dissect.regf import RegistryHive

        self.hive = RegistryHive(stream)

    def _open(self, path):
        from dissect.regf.exceptions import RegistryKeyNotFoundError

        try:
            return self.hive.open(path)
        except RegistryKeyNotFoundError:
            return None

    def key(self, path):
        return self._open(path)

    def value(self, path, name):
        from dissect.regf.exceptions import RegistryValueNotFoundError

        key = self._open(path)
        try:
            return key and key.value(name).value
        except RegistryValueNotFoundError:
            return None

    def values(self, path):
        key = self._open(path)
        return {v.name: v.value for v in key.values()} if key else {}

    def subkey_names(self, path):
        key = self._open(path)
        return [s.name for s in key.subkeys()] if key else []


def run(which: str, data: bytes, lookups, out) -> None:
    start = time.perf_counter()
    try:
        if which == "dissect":
            hive = DissectHive(io.BytesIO(data))
        else:
            from vhdtool.registry.hive import Hive

            hive = Hive(io.BytesIO(data), "SOFTWARE")
        for method, *args in lookups:
            if method == "subkey_names_all":  # list every subkey's subkeys, as a walk does
                for name in hive.subkey_names(args[0]):
                    hive.subkey_names(f"{args[0]}\\{name}")
                answer = "every list read"
                continue
            answer = getattr(hive, method)(*args)
        text = summary(answer)
    except Exception as e:  # noqa: BLE001 - reported, not handled
        text = f"{type(e).__name__}: {str(e)[:110]}"
    work = getattr(locals().get("hive"), "work", None)
    out.send((time.perf_counter() - start, text, work))


def summary(answer) -> str:
    if isinstance(answer, list):
        return f"list of {len(answer)}"
    if isinstance(answer, dict):
        return f"dict of {len(answer)}: " + ", ".join(f"{k}={summary(v)}" for k, v in list(answer.items())[:2])
    if isinstance(answer, str) and " " in answer:
        return answer
    if isinstance(answer, (bytes, str)):
        return f"{type(answer).__name__} of {len(answer)}"
    return repr(answer)[:60]


def timed(which: str, data: bytes, lookups, limit: float):
    parent, child = multiprocessing.Pipe(duplex=False)
    proc = multiprocessing.Process(target=run, args=(which, data, lookups, child))
    proc.start()
    if parent.poll(limit):
        result = parent.recv()
        proc.join()
        return result
    proc.kill()
    proc.join()
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=float, default=60.0, help="seconds before a run is stopped")
    ap.add_argument("--only", nargs="*", help="patterns to run")
    args = ap.parse_args()
    multiprocessing.set_start_method("fork")
    head = f"{'pattern':22} {'n':>10} {'hive':>10} {'dissect':>9} {'vhdtool':>9} {'work':>8}"
    print(f"{head}  answers (dissect | vhdtool)")
    for name, (build, sizes, lookups) in PATTERNS.items():
        if args.only and name not in args.only:
            continue
        for n in sizes:
            data = build(n)
            steps = lookups(n) if callable(lookups) else lookups
            before = timed("dissect", data, steps, args.limit)
            after = timed("vhdtool", data, steps, args.limit)
            b = f"{before[0]:.3f}s" if before else f">{args.limit:g}s"
            a = f"{after[0]:.3f}s" if after else f">{args.limit:g}s"
            work = after[2] if after and after[2] is not None else ""
            said = f"{before[1] if before else 'stopped'} | {after[1] if after else 'stopped'}"
            print(f"{name:22} {n:>10} {len(data) / 2**20:>8.2f}Mi {b:>9} {a:>9} {work:>8}  {said}")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
