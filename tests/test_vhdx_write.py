"""The VHDX writer: changes committed through the log, judged by qemu-img and libvhdi, and crash tests.

Images are made by qemu-img (dynamic with several block sizes, fixed) and, for
differencing disks, by tests/vhdx_craft.py from MS-VHDX. After every commit:
`qemu-img check` finds no errors, and qemu-img's raw conversion, libvhdi and
vhdtool's own reader all read the expected bytes. The crash tests kill a real
writing process with SIGKILL at each write and flush system call of the commit
(strace's syscall fault injection), then judge the image the same way: it must
read as exactly the old content or exactly the new one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import vhdx_craft as vc
from conftest import SWEEPS, held_by_qemu, sweep_count, sweep_points
from test_container import pyvhdi_bytes
from vhdtool import open_disk
from vhdtool.container.overlay import Overlay
from vhdtool.container.vhdx.writer import commit, plan_commit

MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent
CRASH_SCRIPT = Path(__file__).resolve().parent / "write_job.py"
SIZE = 40 * MiB


def qemu_check(path: Path, repair: bool = False) -> str:
    cmd = ["qemu-img", "check", "-f", "vhdx"] + (["-r", "all"] if repair else []) + [str(path)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "No errors were found" in res.stdout, res.stdout
    return res.stdout


def qemu_bytes(path: Path, tmp: Path) -> bytes:
    out = tmp / f"{path.name}.{uuid.uuid4().hex}.raw"
    data = vc.qemu_raw(path, out, "vhdx")
    out.unlink()
    return data


def ours(path: Path) -> bytes:
    with open_disk(path) as d:
        return d.read()


def random_writes(seed: int, size: int, count: int = 24) -> list[tuple[int, bytes]]:
    """Sector-aligned writes of 1 to 300 sectors: into holes, into allocated data, across block edges."""
    rnd = random.Random(seed)
    out = []
    for _ in range(count):
        n = rnd.choice([1, 1, 7, 8, 64, 300])
        offset = rnd.randrange(0, size // 512 - n) * 512
        out.append((offset, rnd.randbytes(n * 512)))
    return out


def apply(raw: bytes, writes) -> bytes:
    buf = bytearray(raw)
    for offset, data in writes:
        buf[offset : offset + len(data)] = data
    return bytes(buf)


def write_and_commit(path: Path, writes):
    with open_disk(path) as disk:
        overlay = Overlay(disk)
        for offset, data in writes:
            overlay.write_at(offset, data)
        return commit(disk, overlay.changes())


@pytest.fixture
def source(tmp_path):
    raw = vc.patterned_raw(tmp_path / "src.raw", SIZE)
    return raw, tmp_path / "src.raw"


KINDS = {
    "dynamic-1M": ("subformat=dynamic", "block_size=1M"),
    "dynamic-32M": ("subformat=dynamic",),
    "dynamic-8M-4k-log": ("subformat=dynamic", "block_size=8M", "log_size=1M"),
    "fixed": ("subformat=fixed",),
}


def judge(path: Path, expected: bytes, tmp: Path, parent: Path | None = None) -> None:
    if parent is None:
        qemu_check(path)
        assert qemu_bytes(path, tmp) == expected
    assert ours(path) == expected
    assert pyvhdi_bytes(path, parent)[: len(expected)] == expected


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_commit_random_writes(kind, source, tmp_path):
    raw, src = source
    path = vc.qemu_vhdx(src, tmp_path / "d.vhdx", *KINDS[kind])
    writes = random_writes(hash(kind) & 0xFFFF, SIZE)
    result = write_and_commit(path, writes)
    assert result is not None and result.flushes >= 5
    judge(path, apply(raw, writes), tmp_path)
    # The same change again is no change: nothing is written, the file is byte-identical.
    before = path.read_bytes()
    assert write_and_commit(path, writes) is None
    assert path.read_bytes() == before


def test_writing_back_what_is_there_is_no_change(source, tmp_path):
    raw, src = source
    path = vc.qemu_vhdx(src, tmp_path / "d.vhdx")
    before = path.read_bytes()
    with open_disk(path) as disk:
        overlay = Overlay(disk)
        overlay.write_at(5 * MiB, raw[5 * MiB : 6 * MiB])  # allocated data, unchanged
        overlay.write_at(2 * MiB, bytes(4096))  # a hole, written with zeros
        assert overlay.touched and overlay.changes() == []
        assert commit(disk, overlay.changes()) is None
    assert path.read_bytes() == before


def test_headers_and_guids(source, tmp_path):
    raw, src = source
    path = vc.qemu_vhdx(src, tmp_path / "d.vhdx")
    buf = path.read_bytes()
    old = vc.read_header(buf, vc.current_slot(buf))
    write_and_commit(path, [(0, b"\x42" * 512)])
    buf = path.read_bytes()
    new = vc.read_header(buf, vc.current_slot(buf))
    # MS-VHDX 2.2.2: FileWriteGuid and DataWriteGuid changed, no log left active.
    assert new["file_write"] != old["file_write"] and new["data_write"] != old["data_write"]
    assert new["log_guid"] == uuid.UUID(int=0)
    assert new["seq"] > old["seq"]
    # Both header copies are valid, the other one older.
    other = vc.read_header(buf, 3 - vc.current_slot(buf))
    assert other["seq"] < new["seq"]


def test_log_grows_when_one_operation_does_not_fit(tmp_path):
    # A fixed VHDX: every change is an in-place change through the log, 8 MiB of them
    # against qemu's 1 MiB log, so the log moves to a larger region at the end of the file.
    raw = vc.patterned_raw(tmp_path / "src.raw", SIZE, seed=5)
    path = vc.qemu_vhdx(tmp_path / "src.raw", tmp_path / "f.vhdx", "subformat=fixed", "log_size=1M")
    writes = [(4 * MiB, random.Random(1).randbytes(8 * MiB))]
    result = write_and_commit(path, writes)
    assert result.log_moved
    buf = path.read_bytes()
    h = vc.read_header(buf, vc.current_slot(buf))
    assert h["log_offset"] % MiB == 0 and h["log_length"] >= 8 * MiB and h["log_offset"] + h["log_length"] <= len(buf)
    judge(path, apply(raw, writes), tmp_path)


def test_pending_log_is_replayed_before_the_change(source, tmp_path):
    raw, src = source
    path = vc.qemu_vhdx(src, tmp_path / "d.vhdx", "subformat=dynamic", "block_size=1M")
    buf = bytearray(path.read_bytes())
    _, block0 = vc.bat_entry(buf, 0)
    pending = b"\x77" * 4096
    vc.add_pending_log(path, [(block0, pending)])
    expected = bytearray(raw)
    expected[0:4096] = pending
    writes = [(8 * MiB, b"\x11" * 1024)]
    result = write_and_commit(path, writes)
    assert result.log_replayed
    judge(path, apply(bytes(expected), writes), tmp_path)


def test_differencing_child_gets_partial_blocks(tmp_path):
    raw, parent = vc.patterned_raw(tmp_path / "src.raw", SIZE), None
    parent = vc.qemu_vhdx(tmp_path / "src.raw", tmp_path / "parent.vhdx", "subformat=dynamic", "block_size=2M")
    child = tmp_path / "child.avhdx"
    own = {1: b"\x01" * 512, 4100: b"\x03" * 512}
    vc.make_differencing(parent, child, own, full_block=10)
    base = bytearray(raw)
    for lba, data in own.items():
        base[lba * 512 : lba * 512 + 512] = data
    base[10 * 2 * MiB : 11 * 2 * MiB] = b"\x5a" * (2 * MiB)
    parent_before = parent.read_bytes()
    # Into a not-present block, a partially present one, the fully present one, and a second chunk-less area.
    writes = [(3 * 512, b"\x21" * 1024), (4101 * 512, b"\x22" * 512), (10 * 2 * MiB + 4096, b"\x23" * 8192),
              (30 * MiB + 512, b"\x24" * 512)]
    write_and_commit(child, writes)
    expected = apply(bytes(base), writes)
    judge(child, expected, tmp_path, parent=parent)
    assert parent.read_bytes() == parent_before
    states = {vc.bat_entry(child.read_bytes(), i)[0] for i in (0, 15)}
    assert states == {7}  # the blocks the writes created are partially present


def test_image_held_by_another_process_is_refused(source, tmp_path):
    from vhdtool.errors import ImageInUse

    raw, src = source
    path = vc.qemu_vhdx(src, tmp_path / "d.vhdx")
    before = path.read_bytes()
    with held_by_qemu(path, "vhdx"), pytest.raises(ImageInUse):
        write_and_commit(path, [(0, b"\x42" * 512)])
    assert path.read_bytes() == before


# -- crash safety -----------------------------------------------------------------------------------

def run_job(image: Path, seed: int, inject: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(CRASH_SCRIPT), str(image), str(seed)]
    if inject:
        cmd = ["strace", "-f", "-o", "/dev/null", "-e", f"inject={inject}"] + cmd
    return subprocess.run(cmd, capture_output=True, text=True, env=job_env(), timeout=120)


def syscall_counts(image: Path, seed: int) -> dict[str, int]:
    """How many pwrite64, fsync and ftruncate calls the job makes, counted by strace on a copy."""
    trace = image.with_suffix(".trace")
    subprocess.run(["strace", "-f", "-o", str(trace), "-e", "trace=pwrite64,fsync,ftruncate",
                    sys.executable, str(CRASH_SCRIPT), str(image), str(seed)], check=True, env=job_env(), capture_output=True)
    counts = {"pwrite64": 0, "fsync": 0, "ftruncate": 0}
    for line in trace.read_text().splitlines():
        for name in counts:
            if f" {name}(" in line or line.startswith(f"{name}("):
                counts[name] += 1
    return counts


def make_kind(kind: str, tmp: Path) -> tuple[bytes, Path, Path | None]:
    """(content, image, parent) of a fresh image of ``kind`` for the crash tests."""
    raw = vc.patterned_raw(tmp / "src.raw", SIZE, seed=9)
    if kind == "differencing":
        parent = vc.qemu_vhdx(tmp / "src.raw", tmp / "parent.vhdx", "subformat=dynamic", "block_size=2M")
        child = tmp / "orig.avhdx"
        own = {1: b"\x01" * 512, 4100: b"\x03" * 512}
        vc.make_differencing(parent, child, own, full_block=10, relative_path=".\\parent.vhdx")
        content = bytearray(raw)
        for lba, data in own.items():
            content[lba * 512 : lba * 512 + 512] = data
        content[10 * 2 * MiB : 11 * 2 * MiB] = b"\x5a" * (2 * MiB)
        return bytes(content), child, parent
    opts = {"dynamic-1M": ("subformat=dynamic", "block_size=1M"), "dynamic-32M": ("subformat=dynamic",),
            "fixed-log-grows": ("subformat=fixed", "log_size=1M")}[kind]
    return raw, vc.qemu_vhdx(tmp / "src.raw", tmp / "orig.vhdx", *opts), None


def job_env() -> dict:
    return dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}")


RANDOM_KILLS = int(os.environ.get("VHDTOOL_RANDOM_KILLS", "31"))


@pytest.mark.parametrize("sweep", SWEEPS)
@pytest.mark.parametrize("kind", ["dynamic-1M", "dynamic-32M", "fixed-log-grows", "differencing"])
def test_kill_at_every_write_and_flush(kind, sweep, tmp_path):
    old, original, parent = make_kind(kind, tmp_path)
    seed = sum(map(ord, kind))
    listing = subprocess.run([sys.executable, str(CRASH_SCRIPT), "--list", str(seed)], capture_output=True, text=True,
                             check=True, env=job_env()).stdout
    new = apply(old, [(o, bytes.fromhex(d)) for o, d in json.loads(listing)])
    probe = original.with_name("probe" + original.suffix)
    shutil.copyfile(original, probe)
    counts = syscall_counts(probe, seed)
    assert ours(probe) == new
    points = [(name, n) for name, total in counts.items() for n in range(1, total + 1)]
    assert len(points) >= 20, counts
    points = sweep_points(points, sweep)
    random_kills = sweep_count(RANDOM_KILLS, sweep)
    outcomes = {"old": 0, "new": 0}

    def judge_killed(victim: Path, why) -> None:
        content = ours(victim)
        assert content in (old, new), why
        outcomes["old" if content == old else "new"] += 1
        if parent is None:
            # qemu replays what the log holds, as Hyper-V would at open, and agrees.
            repaired = victim.with_name("repaired.vhdx")
            shutil.copyfile(victim, repaired)
            qemu_check(repaired, repair=True)
            qemu_check(repaired)
            assert qemu_bytes(repaired, tmp_path) == content, why
        else:
            buf = victim.read_bytes()
            if vc.read_header(buf, vc.current_slot(buf))["log_guid"] == uuid.UUID(int=0):
                assert pyvhdi_bytes(victim, parent)[: len(content)] == content, why
        assert parent is None or parent.read_bytes() == parent_before

    parent_before = parent.read_bytes() if parent is not None else None
    victim = original.with_name("victim" + original.suffix)
    for name, n in points:
        shutil.copyfile(original, victim)
        res = run_job(victim, seed, f"{name}:signal=KILL:when={n}")
        assert res.returncode != 0, (name, n, res.stderr)
        judge_killed(victim, (name, n))
    # Random times inside the commit: the job says when it starts committing.
    rnd = random.Random(seed)
    import time

    for i in range(random_kills):
        shutil.copyfile(original, victim)
        proc = subprocess.Popen([sys.executable, str(CRASH_SCRIPT), str(victim), str(seed)], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, env=job_env())
        assert proc.stdout.readline().strip() == b"committing"
        time.sleep(rnd.uniform(0, 0.03))
        proc.kill()
        proc.wait()
        judge_killed(victim, ("random", i))
    assert outcomes["old"] and outcomes["new"], outcomes
    print(f"\n{kind}: {len(points)} syscall kill points {counts}, {random_kills} random kills, outcomes {outcomes}")


@pytest.mark.parametrize("syscall,errno_name", [("fsync", "EIO"), ("pwrite64", "ENOSPC")])
def test_failed_write_or_flush_stops_the_commit(syscall, errno_name, tmp_path):
    """An I/O error is never ignored: the commit stops with WriteFailed, and the image is old or new."""
    old, original, _ = make_kind("dynamic-1M", tmp_path)
    seed = 5
    new = apply(old, [(o, bytes.fromhex(d)) for o, d in json.loads(subprocess.run(
        [sys.executable, str(CRASH_SCRIPT), "--list", str(seed)], capture_output=True, text=True, check=True,
        env=job_env()).stdout)])
    seen = set()
    for n in (1, 2, 3, 4, 5):
        victim = tmp_path / "victim.vhdx"
        shutil.copyfile(original, victim)
        res = run_job(victim, seed, f"{syscall}:error={errno_name}:when={n}")
        assert res.returncode == 15, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and str(victim) in lines[0] and "failed" in lines[0], res.stderr
        content = ours(victim)
        assert content in (old, new)
        seen.add(content == new)
    assert False in seen


def test_unreachable_data_is_written_before_the_log_not_through_it(source, tmp_path):
    raw, src = source
    path = vc.qemu_vhdx(src, tmp_path / "d.vhdx", "subformat=dynamic", "block_size=1M")
    data = random.Random(3).randbytes(256 * 1024)
    with open_disk(path) as disk:
        overlay = Overlay(disk)
        overlay.write_at(64 * 1024, data)  # allocated data (the pattern fills the first 512 KiB)
        logged_only = plan_commit(disk, overlay.changes())
        overlay.mark_unreachable(64 * 1024, 128 * 1024)
        plan = plan_commit(disk, overlay.changes(), overlay.unreachable())
        assert sum(len(d) for _o, d in plan.direct) == 128 * 1024
        assert sum(w.length for w in plan.logged) == sum(w.length for w in logged_only.logged) - 128 * 1024
        result = commit(disk, overlay.changes(), unreachable=overlay.unreachable())
    assert result.bytes_written < 2 * len(data)
    judge(path, apply(raw, [(64 * 1024, data)]), tmp_path)
