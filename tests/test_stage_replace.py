"""`vhdtool stage` of a newer cab over a pending older one: the older folder goes in the same commit.

Judged by ntfs-3g's ntfsls (one staged folder), ntfscat (the newer cab and its
install.cmd), ntfsinfo (the older folder's MFT records free, no orphan), ntfsfix -n,
hivexget (the Setup CmdLine names the newer folder) and qemu-img check. The crash
sweep kills the real process at every write, flush and truncation of the commit and
at random instants, and finds exactly the old state or exactly the new one after
QEMU's own log replay.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, SWEEPS, digest, sweep_count, sweep_points, work_copy
from fixtures.cabs import CabSpec, build_iso
from judges.hives import hive_typed_values
from judges.volumes import mft_record as record_of
from judges.volumes import ntfs_names as ntfsls
from judges.volumes import ntfs_tree, ntfscat, record_in_use
from judges.volumes import partition_volume as volume

pytestmark = pytest.mark.fixtures
OLD_IC, NEW_IC, NEWER_IC = "6.2.9200.16384", "6.3.9600.16384", "6.3.9600.18000"
STAGED = "/Windows/vhdtool"
REG_SZ = 1
RANDOM_KILLS = int(os.environ.get("VHDTOOL_RANDOM_KILLS", "30"))




@pytest.fixture(scope="module")
def isos(tmp_path_factory):
    root = tmp_path_factory.mktemp("isos")
    archs = [(nt, arch) for nt in ("6.1", "6.2") for arch in ("x64", "x86")]
    return {v: build_iso([CabSpec(nt, arch, v) for nt, arch in archs], root / f"vmguest-{v}.iso")
            for v in (OLD_IC, NEW_IC, NEWER_IC)}












def cmdline(part: Path, tmp: Path) -> str:
    hive = tmp / f"SYSTEM.{time.monotonic_ns()}"
    hive.write_bytes(ntfscat(part, "/Windows/System32/config/SYSTEM"))
    value = hive_typed_values(hive, "Setup")["CmdLine"]
    hive.unlink()
    assert value[0] == REG_SZ
    return value[1]


def qemu_clean(image: Path) -> None:
    res = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
    assert res.returncode == 0 and "No errors were found" in res.stdout, res.stdout + res.stderr


def ntfsfix_clean(part: Path) -> None:
    res = subprocess.run(["ntfsfix", "-n", str(part)], capture_output=True, text=True)
    assert res.returncode == 0 and "processed successfully" in res.stdout, res.stdout + res.stderr


def stage(cli, image: Path, iso: Path, host: str = "win8") -> dict:
    code, out, err = cli("stage", "--json", image, "--host", host, "--cabs", iso)
    assert code == 0, err
    return json.loads(out)


def test_a_newer_cab_replaces_a_pending_older_one(cli, isos, tmp_path):
    image = work_copy("ws2008r2-x64", tmp_path)
    assert stage(cli, image, isos[OLD_IC])["id"] == f"{OLD_IC}-x64"
    before = volume(image, tmp_path, 2)
    old_records = [record_of(before, f"{STAGED}/{OLD_IC}-x64" + p) for p in ("", "/install.cmd")]
    doc = stage(cli, image, isos[NEW_IC])
    new_id = f"{NEW_IC}-x64"
    assert doc["staged"] and doc["committed"] and doc["id"] == new_id
    assert {"path": f"{STAGED}/{OLD_IC}-x64", "action": "delete", "size": None, "sha256": None,
            "partition": 2} in doc["changes"]["files"]
    qemu_clean(image)
    part = volume(image, tmp_path, 2)
    ntfsfix_clean(part)
    assert ntfsls(part, STAGED) == [new_id]
    assert ntfsls(part, f"{STAGED}/{new_id}") == ["Windows6.1-HyperVIntegrationServices-x64.cab", "install.cmd",
                                                  "package.txt"]
    assert ntfscat(part, f"{STAGED}/{new_id}/package.txt") == \
        f"identity=Microsoft-Hyper-V-Guest-Integration-Drivers-Package~31bf3856ad364e35~amd64~~{NEW_IC}\r\n".encode()
    cab = ntfscat(part, f"{STAGED}/{new_id}/Windows6.1-HyperVIntegrationServices-x64.cab")
    assert hashlib.sha256(cab).hexdigest() == doc["cab"]["sha256"]
    assert f"{STAGED}/{new_id}".replace("/", "\\").encode() in ntfscat(part, f"{STAGED}/{new_id}/install.cmd")
    assert cmdline(part, tmp_path) == f'cmd.exe /c "C:\\Windows\\vhdtool\\{new_id}\\install.cmd"'
    assert not any(record_in_use(part, r) for r in old_records)  # no orphaned record
    code, out, err = cli("status", "--json", image)
    st = json.loads(out)
    assert code == 0 and [s["id"] for s in st["staged"]] == [new_id] and st["state"] == "pending"
    # A second identical run writes nothing.
    before = digest(image)
    again = stage(cli, image, isos[NEW_IC])
    assert again["staged"] and again["changes"] == {"files": [], "registry": []} and again["bytes_written"] == 0
    assert digest(image) == before


def test_a_package_that_ran_is_history_and_kept(cli, isos, tmp_path):
    """A folder with result.txt (installed or failed for good) stays for `status`; the pending one is replaced."""
    import vhdtool

    image = work_copy("ws2008r2-x64", tmp_path)
    stage(cli, image, isos[OLD_IC])
    old_id = f"{OLD_IC}-x64"
    with vhdtool.edit(image) as ed:  # what install.cmd leaves after its last failed attempt
        ed.write_file(f"{STAGED}/{old_id}/result.txt", b"exit_code=1603\r\nattempts=3\r\nfinished=x\r\n")
    stage(cli, image, isos[NEW_IC])
    doc = stage(cli, image, isos[NEWER_IC])
    assert [f["path"] for f in doc["changes"]["files"] if f["action"] == "delete"] == [f"{STAGED}/{NEW_IC}-x64"]
    part = volume(image, tmp_path, 2)
    ntfsfix_clean(part)
    assert ntfsls(part, STAGED) == [old_id, f"{NEWER_IC}-x64"]
    assert ntfscat(part, f"{STAGED}/{old_id}/result.txt").startswith(b"exit_code=1603")
    st = json.loads(cli("status", "--json", image)[1])
    assert [(s["id"], s["state"]) for s in st["staged"]] == [(old_id, "failed"), (f"{NEWER_IC}-x64", "pending")]


def test_generalized_image_loses_the_older_setupcomplete_line_too(cli, isos, tmp_path):
    image = work_copy("ws2012-sysprep", tmp_path)
    original = ntfscat(volume(image, tmp_path, 1), "/Windows/Setup/Scripts/SetupComplete.cmd")
    first = stage(cli, image, isos[NEW_IC], host="win8.1")
    second = stage(cli, image, isos[NEWER_IC], host="win8.1")
    assert first["boot_hook"]["kind"] == second["boot_hook"]["kind"] == "setupcomplete"
    part = volume(image, tmp_path, 1)
    ntfsfix_clean(part)
    assert ntfsls(part, STAGED) == [f"{NEWER_IC}-x64"]
    # What the image had is kept byte for byte; only the newer package's line follows it.
    assert ntfscat(part, "/Windows/Setup/Scripts/SetupComplete.cmd") == \
        original + second["boot_hook"]["command"].encode() + b"\r\n"
    # And the older cab over the newer pending one is refused, as with the Setup CmdLine hook.
    before = digest(image)
    code, out, err = cli("stage", image, "--host", "win8.1", "--cabs", isos[NEW_IC])
    assert code == 20 and f"({NEWER_IC}-x64)" in err and digest(image) == before


def run_stage(image: Path, iso: Path, inject: str | None = None, count: Path | None = None):
    cmd = [sys.executable, "-m", "vhdtool.cli.main", "stage", str(image), "--host", "win8", "--cabs", str(iso)]
    if inject:
        cmd = ["strace", "-f", "-o", "/dev/null", "-e", f"inject={inject}"] + cmd
    elif count:
        cmd = ["strace", "-f", "-o", str(count), "-e", "trace=pwrite64,fsync,ftruncate"] + cmd
    return subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=180)


@pytest.mark.parametrize("sweep", SWEEPS)
def test_kill_the_replacing_stage_at_every_write_and_flush(sweep, isos, tmp_path):
    original = work_copy("ws2008r2-x64", tmp_path)
    assert run_stage(original, isos[OLD_IC]).returncode == 0  # the older package, pending
    old_id, new_id = f"{OLD_IC}-x64", f"{NEW_IC}-x64"
    probe = tmp_path / "probe.vhdx"
    shutil.copyfile(original, probe)
    trace = tmp_path / "trace"
    assert run_stage(probe, isos[NEW_IC], count=trace).returncode == 0
    counts = {n: sum(1 for line in trace.read_text().splitlines() if f" {n}(" in line or line.startswith(f"{n}("))
              for n in ("pwrite64", "fsync", "ftruncate")}
    points = sweep_points([(n, k) for n, total in counts.items() for k in range(1, total + 1)], sweep)
    shutil.copyfile(original, probe)
    t0 = time.monotonic()
    assert run_stage(probe, isos[NEW_IC]).returncode == 0
    duration = time.monotonic() - t0
    old_tree = ntfs_tree(volume(original, tmp_path, 2))
    new_tree = ntfs_tree(volume(probe, tmp_path, 2))
    assert any(p.startswith(f"{STAGED}/{old_id}") for p in old_tree)
    assert not any(p.startswith(f"{STAGED}/{old_id}") for p in new_tree)
    timed = {"/$MFT", "/$MFTMirr"}  # the MFT's records hold each run's own timestamps
    rnd = random.Random(5)
    kills = [("syscall", p) for p in points] + [("time", rnd.uniform(0.3, 1.0) * duration) for _ in range(sweep_count(RANDOM_KILLS, sweep))]
    outcomes = {"old": 0, "new": 0}
    victim, repaired = tmp_path / "victim.vhdx", tmp_path / "repaired.vhdx"
    for how, point in kills:
        shutil.copyfile(original, victim)
        if how == "syscall":
            assert run_stage(victim, isos[NEW_IC], inject=f"{point[0]}:signal=KILL:when={point[1]}").returncode != 0
        else:
            proc = subprocess.Popen([sys.executable, "-m", "vhdtool.cli.main", "stage", str(victim), "--host", "win8",
                                     "--cabs", str(isos[NEW_IC])], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(ROOT)))
            time.sleep(point)
            proc.kill()
            proc.wait()
        shutil.copyfile(victim, repaired)
        subprocess.run(["qemu-img", "check", "-r", "all", str(repaired)], check=True, capture_output=True)
        qemu_clean(repaired)
        part = volume(repaired, tmp_path, 2)
        tree = ntfs_tree(part)
        state = "old" if tree == old_tree else "new"
        if state == "new":
            assert {k: v for k, v in tree.items() if k not in timed} == \
                {k: v for k, v in new_tree.items() if k not in timed}, (how, point)
        staged = old_id if state == "old" else new_id
        assert ntfsls(part, STAGED) == [staged], (how, point)
        assert cmdline(part, tmp_path) == f'cmd.exe /c "C:\\Windows\\vhdtool\\{staged}\\install.cmd"', (how, point)
        part.unlink()
        outcomes[state] += 1
    assert outcomes["old"] and outcomes["new"], outcomes
    print(f"\nreplace: {len(points)} syscall kill points {counts}, {sweep_count(RANDOM_KILLS, sweep)} random kills, outcomes {outcomes}")
