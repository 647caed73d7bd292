"""Fuzz the writer's inputs: hostile VHDX headers, region tables, metadata, BATs and logs.

Each case damages one structure of an image (a dynamic VHDX with a pending log,
or a differencing child), resealing the checksums half of the time, then commits
a small change through it. The writer must either refuse with a typed error,
leaving the file byte-identical, or commit a change that reads back as written.
VHDTOOL_WRITE_FUZZ_EXAMPLES sets the number of cases of the full sweep (default 300, marked slow);
the default run makes a tenth of them.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess

import pytest

from conftest import SWEEPS, sweep_count
from test_fuzz_container import bases, reseal  # noqa: F401  (the fixture and the resealer)
from vhdtool import open_disk
from vhdtool.container.commit import commit
from vhdtool.container.overlay import Overlay
from vhdtool.errors import VhdtoolError

EXAMPLES = int(os.environ.get("VHDTOOL_WRITE_FUZZ_EXAMPLES", "300"))
TARGETS = ["header1", "header2", "region1", "region2", "metadata_table", "metadata_items", "bat", "log"]


def qemu_opens(image: bytes, path) -> bool:
    """Whether qemu opens ``image`` (replaying its log on a copy, as it must)."""
    path.write_bytes(image)
    try:
        res = subprocess.run(["qemu-img", "check", "-r", "all", "-f", "vhdx", str(path)], capture_output=True, text=True)
        return res.returncode == 0
    finally:
        path.unlink()


@pytest.mark.parametrize("sweep", SWEEPS)
def test_fuzz_writer_inputs(bases, sweep, tmp_path):  # noqa: F811
    rnd = random.Random(2026)
    outcomes = {"refused": 0, "written": 0}
    victim = tmp_path / "victim.vhdx"
    examples = sweep_count(EXAMPLES, sweep, EXAMPLES // 10)
    for case in range(examples):
        base = rnd.choice(["log", "diff"])
        path, original, spans = bases[base]
        start, length = spans[rnd.choice(TARGETS)]
        buf = bytearray(original)
        for _ in range(rnd.randint(1, 6)):
            span = length if rnd.random() < 0.7 else 64 * 1024
            buf[start + rnd.randrange(span)] = rnd.choice([0x00, 0xFF, 0x01, 0x80, rnd.randrange(256)])
        if rnd.random() < 0.5:
            reseal(buf)
        # Beside the parent, so that a differencing child still finds it.
        victim = path.with_name(f"victim{path.suffix}")
        victim.write_bytes(bytes(buf))
        before = hashlib.sha256(bytes(buf)).hexdigest()
        offset = rnd.randrange(0, 5 * 1024 * 1024 // 512) * 512
        data = rnd.randbytes(512 * rnd.choice([1, 8, 100]))
        try:
            with open_disk(victim) as disk:
                overlay = Overlay(disk)
                overlay.write_at(min(offset, disk.size - len(data)), data)
                where = min(offset, disk.size - len(data))
                commit(disk, overlay.changes())
        except VhdtoolError as e:
            assert e.message and "\n" not in e.message
            assert hashlib.sha256(victim.read_bytes()).hexdigest() == before, (case, e.message)
            outcomes["refused"] += 1
            continue
        with open_disk(victim) as disk:
            disk.seek(where)
            assert disk.read(len(data)) == data, case
        outcomes["written"] += 1
        if base == "log" and outcomes["written"] % 20 == 1:
            # qemu judges some of what was written over damaged-but-accepted structures: the
            # writer must not turn an input qemu opens into an output it cannot.
            if qemu_opens(bytes(buf), victim.with_name("input.vhdx")):
                res = subprocess.run(["qemu-img", "check", "-f", "vhdx", str(victim)], capture_output=True, text=True)
                assert res.returncode == 0 and "No errors were found" in res.stdout, (case, res.stdout + res.stderr)
                outcomes["qemu-judged"] = outcomes.get("qemu-judged", 0) + 1
    victim.unlink(missing_ok=True)
    assert outcomes["refused"] and outcomes["written"], outcomes
    print(f"\nwriter fuzz: {examples} cases, {outcomes}")
