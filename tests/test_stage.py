"""`vhdtool stage` and `vhdtool status` on fixture images, judged by tools other than vhdtool.

What staging wrote is read back with qemu-img's raw conversion, ntfs-3g's
ntfscat (the cab byte-identical to its source, install.cmd as generated) and
hivexget (the Setup values); a dirty hive by a test-side replay of its logs.
Refusals leave the image byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, assert_one_line_error, digest, work_copy
from conftest import SWEEPS, sweep_count, sweep_points
from fixtures.cabs import CabSpec, build_cab, build_iso
from judges.hives import hive_typed_values
from judges.volumes import ntfs_tree, ntfscat
from judges.volumes import partition_volume as volume
from regf_judge import judge_replay

pytestmark = pytest.mark.fixtures
WIN8_IC = "6.2.9200.16384"
WIN81_IC = "6.3.9600.16384"  # newer than what the Server 2012 fixture has (6.2.9200.16384)
REG_SZ, REG_DWORD = 1, 4






@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("cabs")
    specs = [CabSpec(nt, arch, WIN8_IC) for nt in ("6.0", "6.1", "6.2") for arch in ("x64", "x86")]
    out = {"iso": build_iso(specs, root / "vmguest.iso"), "folder": root / "folder", "kb": root / "kb",
           "iso81": build_iso([CabSpec(s.nt, s.arch, WIN81_IC) for s in specs], root / "vmguest81.iso")}
    for spec in specs:
        build_cab(spec, out["folder"])
    for nt in ("6.1", "6.2"):
        build_cab(CabSpec(nt, "x64", "6.3.9600.18080", kb=True), out["kb"])
    out["single"] = out["folder"] / "Windows6.1-HyperVIntegrationServices-x64.cab"
    return out




def setup_values(part: Path, tmp: Path) -> dict:
    hive = tmp / "SYSTEM.staged"
    hive.write_bytes(ntfscat(part, "/Windows/System32/config/SYSTEM"))
    return hive_typed_values(hive, "Setup")


def stage_json(cli, *args) -> tuple[int, dict, str]:
    code, out, err = cli("stage", "--json", *args)
    return code, (json.loads(out) if out.strip() else {}), err


@pytest.mark.parametrize("source", ["iso", "folder", "single"])
def test_server_2008r2_on_win8_setup_cmdline(cli, sources, tmp_path, source):
    image = work_copy("ws2008r2-x64", tmp_path)
    code, doc, err = stage_json(cli, image, "--host", "win8", "--cabs", sources[source])
    assert code == 0, err
    assert doc["staged"] and doc["action"] == "stage" and doc["committed"]
    assert doc["id"] == f"{WIN8_IC}-x64" and doc["boot_hook"]["kind"] == "setup-cmdline"
    folder = f"/Windows/vhdtool/{WIN8_IC}-x64"
    part = volume(image, tmp_path, 2)
    cab = ntfscat(part, f"{folder}/Windows6.1-HyperVIntegrationServices-x64.cab")
    assert hashlib.sha256(cab).hexdigest() == doc["cab"]["sha256"]
    script = ntfscat(part, f"{folder}/install.cmd")
    assert b"\r\n" in script and b"\n" not in script.replace(b"\r\n", b"")
    assert b'"C:\\Windows\\System32\\dism.exe" /online /add-package /packagepath:"C:\\Windows\\vhdtool\\' in script
    setup = setup_values(part, tmp_path)
    assert setup["SetupType"] == (REG_DWORD, 2)
    assert setup["CmdLine"] == (REG_SZ, f'cmd.exe /c "C:\\Windows\\vhdtool\\{WIN8_IC}-x64\\install.cmd"')
    assert doc["boot_hook"]["command"] == setup["CmdLine"][1]
    # Staging the same cab again changes nothing, and says so.
    before = digest(image)
    code, doc, err = stage_json(cli, image, "--host", "win8", "--cabs", sources[source])
    assert code == 0 and doc["staged"] and doc["changes"] == {"files": [], "registry": []} and not doc["committed"]
    assert digest(image) == before
    code, out, err = cli("status", "--json", image)
    st = json.loads(out)
    assert code == 0 and st["state"] == "pending" and st["staged"][0]["id"] == f"{WIN8_IC}-x64"


def test_generalized_server_2012_setupcomplete(cli, sources, tmp_path):
    image = work_copy("ws2012-sysprep", tmp_path)
    part = volume(image, tmp_path, 1)
    old_complete = ntfscat(part, "/Windows/Setup/Scripts/SetupComplete.cmd")
    old_setup = setup_values(part, tmp_path)
    code, doc, err = stage_json(cli, image, "--host", "win8.1", "--cabs", sources["iso81"])
    assert code == 0, err
    assert doc["boot_hook"]["kind"] == "setupcomplete"
    part = volume(image, tmp_path, 1)
    complete = ntfscat(part, "/Windows/Setup/Scripts/SetupComplete.cmd")
    # What was there is kept, byte for byte, and runs first; our line follows.
    assert complete.startswith(old_complete) and complete.endswith(doc["boot_hook"]["command"].encode() + b"\r\n")
    assert setup_values(part, tmp_path) == old_setup  # the Setup key is not touched
    ntfscat(part, f"/Windows/vhdtool/{WIN81_IC}-x64/install.cmd")


def test_windows7_x86_on_win81_gets_the_x86_cab(cli, sources, tmp_path):
    image = work_copy("win7-x86", tmp_path)
    code, doc, err = stage_json(cli, image, "--host", "win8.1", "--cabs", sources["iso"])
    assert code == 0, err
    assert doc["cab"]["arch"] == "x86" and doc["id"] == f"{WIN8_IC}-x86"
    part = volume(image, tmp_path, 1)
    assert ntfscat(part, f"/Windows/vhdtool/{WIN8_IC}-x86/Windows6.1-HyperVIntegrationServices-x86.cab")


def test_data_exchange_disabled_on_win10_gets_kb3071740(cli, sources, tmp_path):
    image = work_copy("ws2008r2-nokvp", tmp_path)
    code, doc, err = stage_json(cli, image, "--host", "win10", "--cabs", sources["kb"])
    assert code == 0, err
    assert doc["method"] == "kb3071740-cab" and doc["staged"] and doc["id"] == "6.3.9600.18080-x64"


def test_up_to_date_and_linux_write_nothing(cli, sources, tmp_path):
    image = work_copy("ws2008r2-x64", tmp_path)
    old = tmp_path / "old"
    build_cab(CabSpec("6.1", "x64", "6.1.7601.17514"), old)
    before = digest(image)
    code, doc, err = stage_json(cli, image, "--host", "win8", "--cabs", old)
    assert code == 0 and doc["method"] == "up-to-date" and not doc["staged"] and digest(image) == before
    linux = work_copy("ubuntu-ext4", tmp_path)
    before = digest(linux)
    code, doc, err = stage_json(cli, linux, "--host", "win8", "--cabs", sources["iso"])
    assert code == 0 and doc["method"] == "up-to-date" and not doc["staged"] and digest(linux) == before


def test_refusals_leave_the_image_byte_identical(cli, sources, tmp_path):
    import vhdtool

    hibernated = work_copy("ws2008r2-hibernated", tmp_path)
    before = digest(hibernated)
    result = cli("stage", hibernated, "--host", "win8", "--cabs", sources["iso"])
    assert_one_line_error(*result, hibernated)
    assert result[0] == 18 and digest(hibernated) == before
    # Another setup command pending: refused.
    pending = work_copy("ws2008r2-x64", tmp_path)
    with vhdtool.edit(pending) as ed:
        ed.set_value("SYSTEM", "Setup", "CmdLine", "C:\\other\\setup.exe /unattend", "REG_SZ")
        ed.set_value("SYSTEM", "Setup", "SetupType", 2, "REG_DWORD")
    before = digest(pending)
    result = cli("stage", pending, "--host", "win8", "--cabs", sources["iso"])
    assert_one_line_error(*result, pending)
    assert result[0] == 20 and "setup.exe" in result[2] and digest(pending) == before


def test_dirty_hive_guest_is_staged(cli, sources, tmp_path):
    image = work_copy("ws2008r2-dirtyhive", tmp_path)
    code, doc, err = stage_json(cli, image, "--host", "win8", "--cabs", sources["iso"])
    assert code == 0 and doc["staged"], err
    part = volume(image, tmp_path, 2)
    files = {}
    for name in ("SYSTEM", "SYSTEM.LOG1", "SYSTEM.LOG2"):
        try:
            files[name] = ntfscat(part, f"/Windows/System32/config/{name}")
        except Exception:  # noqa: BLE001 - a log the guest does not have
            files[name] = None
    # As Windows would at boot: replay whatever the logs hold over the primary, then read Setup.
    replayed = judge_replay(files["SYSTEM"], files["SYSTEM.LOG1"], files["SYSTEM.LOG2"])
    hive = replayed[0] if replayed is not None and replayed[1] else files["SYSTEM"]
    path = tmp_path / "SYSTEM.boot"
    path.write_bytes(hive)
    setup = hive_typed_values(path, "Setup")
    assert setup["SetupType"] == (REG_DWORD, 2) and "install.cmd" in setup["CmdLine"][1]


def test_status_reads_results(cli, sources, tmp_path):
    import vhdtool

    image = work_copy("ws2008r2-x64", tmp_path)
    assert json.loads(cli("status", "--json", image)[1])["state"] == "none"
    code, doc, err = stage_json(cli, image, "--host", "win8", "--cabs", sources["iso"])
    folder = f"/Windows/vhdtool/{doc['id']}"
    # What install.cmd leaves behind after a boot (the Wine tests show it writing exactly this).
    with vhdtool.edit(image) as ed:
        ed.write_file(f"{folder}/attempts.txt", b"1\r\n")
    assert json.loads(cli("status", "--json", image)[1])["state"] == "running"
    with vhdtool.edit(image) as ed:
        ed.write_file(f"{folder}/result.txt", b"exit_code=1603\r\nattempts=3\r\nfinished=Mon 11/30/2026 10:00:00.00\r\n")
        ed.write_file(f"{folder}/install.log", b"[x] attempt 3\r\nError: 1603\r\n[x] exit code 1603\r\n")
    st = json.loads(cli("status", "--json", image)[1])["staged"][0]
    assert (st["state"], st["exit_code"], st["attempts"]) == ("failed", 1603, 3) and "Error: 1603" in st["log_tail"]
    with vhdtool.edit(image) as ed:
        ed.write_file(f"{folder}/result.txt", b"exit_code=3010\r\nattempts=1\r\nfinished=Mon 11/30/2026 10:00:00.00\r\n")
    code, out, err = cli("status", image)
    # A success that Windows' own record (CBS) does not bear out: tests/test_status_cbs.py has the boots that do.
    assert code == 0 and "state      inconsistent" in out and "exit code 3010" in out and "CBS absent" in out


def run_stage(image: Path, cabs: Path, inject: str | None = None, count: Path | None = None):
    cmd = [sys.executable, "-m", "vhdtool.cli.main", "stage", str(image), "--host", "win8", "--cabs", str(cabs)]
    if inject:
        cmd = ["strace", "-f", "-o", "/dev/null", "-e", f"inject={inject}"] + cmd
    elif count:
        cmd = ["strace", "-f", "-o", str(count), "-e", "trace=pwrite64,fsync,ftruncate"] + cmd
    return subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=180)


RANDOM_KILLS = int(os.environ.get("VHDTOOL_RANDOM_KILLS", "30"))


@pytest.mark.parametrize("sweep", SWEEPS)
def test_kill_stage_at_every_write_and_flush(sources, sweep, tmp_path):
    original = work_copy("ws2008r2-x64", tmp_path)
    probe = tmp_path / "probe.vhdx"
    shutil.copyfile(original, probe)
    trace = tmp_path / "trace"
    assert run_stage(probe, sources["iso"], count=trace).returncode == 0
    counts = {n: sum(1 for line in trace.read_text().splitlines() if f" {n}(" in line or line.startswith(f"{n}("))
              for n in ("pwrite64", "fsync", "ftruncate")}
    points = [(n, k) for n, total in counts.items() for k in range(1, total + 1)]
    shutil.copyfile(original, probe)
    t0 = time.monotonic()
    assert run_stage(probe, sources["iso"]).returncode == 0
    duration = time.monotonic() - t0
    old_tree = ntfs_tree(volume(original, tmp_path, 2))
    new_tree = ntfs_tree(volume(probe, tmp_path, 2))
    rnd = __import__("random").Random(3)
    points = sweep_points(points, sweep)
    kills = [("syscall", p) for p in points] + [("time", rnd.uniform(0.5, 1.0) * duration)
                                                for _ in range(sweep_count(RANDOM_KILLS, sweep))]
    outcomes = {"old": 0, "new": 0}
    victim = tmp_path / "victim.vhdx"
    for how, point in kills:
        shutil.copyfile(original, victim)
        if how == "syscall":
            assert run_stage(victim, sources["iso"], inject=f"{point[0]}:signal=KILL:when={point[1]}").returncode != 0
        else:
            proc = subprocess.Popen([sys.executable, "-m", "vhdtool.cli.main", "stage", str(victim), "--host", "win8",
                                     "--cabs", str(sources["iso"])], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(ROOT)))
            time.sleep(point)
            proc.kill()
            proc.wait()
        repaired = tmp_path / "repaired.vhdx"
        shutil.copyfile(victim, repaired)
        subprocess.run(["qemu-img", "check", "-r", "all", str(repaired)], check=True, capture_output=True)
        res = subprocess.run(["qemu-img", "check", str(repaired)], capture_output=True, text=True)
        assert res.returncode == 0 and "No errors were found" in res.stdout, (how, point)
        tree = ntfs_tree(volume(repaired, tmp_path, 2))
        if tree == old_tree:
            outcomes["old"] += 1
            continue
        # Exactly the new volume, but for the MFT's records: they hold each run's own timestamps.
        timed = {"/$MFT", "/$MFTMirr"}
        assert {k: v for k, v in tree.items() if k not in timed} == {k: v for k, v in new_tree.items() if k not in timed}, \
            (how, point)
        outcomes["new"] += 1
    assert outcomes["old"] and outcomes["new"], outcomes
    print(f"\nstage: {len(points)} syscall kill points {counts}, {len(kills) - len(points)} random kills, outcomes {outcomes}")


def test_server_2008_sp2_gets_pkgmgr(cli, sources, tmp_path):
    image = work_copy("ws2008-sp2-x64", tmp_path)
    code, doc, err = stage_json(cli, image, "--host", "win8", "--cabs", sources["iso"])
    assert code == 0, err
    assert doc["guest_key"] == "server-2008" and doc["cab"]["name"] == "Windows6.0-HyperVIntegrationServices-x64.cab"
    part = volume(image, tmp_path, 2)
    script = ntfscat(part, f"/Windows/vhdtool/{doc['id']}/install.cmd")
    cab = f"C:\\Windows\\vhdtool\\{doc['id']}\\Windows6.0-HyperVIntegrationServices-x64.cab"
    assert f'"C:\\Windows\\System32\\pkgmgr.exe" /ip /m:"{cab}" /quiet /norestart'.encode() in script
    assert b"dism.exe" not in script


def test_a_newer_cab_replaces_a_pending_older_one(cli, sources, tmp_path):
    image = work_copy("ws2008r2-x64", tmp_path)
    code, first, err = stage_json(cli, image, "--host", "win8", "--cabs", sources["iso"])
    assert code == 0 and first["staged"], err
    code, second, err = stage_json(cli, image, "--host", "win8", "--cabs", sources["iso81"])
    assert code == 0 and second["staged"] and second["id"] == f"{WIN81_IC}-x64", err
    setup = setup_values(volume(image, tmp_path, 2), tmp_path)
    assert setup["CmdLine"] == (REG_SZ, f'cmd.exe /c "C:\\Windows\\vhdtool\\{WIN81_IC}-x64\\install.cmd"')
    code, out, err = cli("status", "--json", image)
    assert json.loads(out)["staged"][-1]["id"] == f"{WIN81_IC}-x64"


def test_an_older_cab_never_replaces_a_pending_newer_one(cli, sources, tmp_path):
    image = work_copy("ws2008r2-x64", tmp_path)
    code, first, err = stage_json(cli, image, "--host", "win8.1", "--cabs", sources["iso81"])
    assert code == 0 and first["id"] == f"{WIN81_IC}-x64", err
    before = digest(image)
    result = cli("stage", image, "--host", "win8", "--cabs", sources["iso"])
    assert_one_line_error(*result, image)
    assert result[0] == 20 and f"a newer integration services package ({WIN81_IC}-x64)" in result[2]
    assert digest(image) == before
    setup = setup_values(volume(image, tmp_path, 2), tmp_path)
    assert setup["CmdLine"] == (REG_SZ, f'cmd.exe /c "C:\\Windows\\vhdtool\\{WIN81_IC}-x64\\install.cmd"')


def test_output_copy_is_made_and_named_when_there_is_nothing_to_stage(cli, sources, tmp_path):
    image = work_copy("ubuntu-ext4", tmp_path)
    out = tmp_path / "golden.vhdx"
    code, doc, err = stage_json(cli, image, "--host", "win8", "--cabs", sources["iso"], "--output", out)
    assert code == 0 and doc["action"] == "none" and doc["output"] == str(out), (doc, err)
    assert doc["image"] == str(image)  # not the temporary copy it inspected
    assert out.exists() and digest(out) == digest(image)


def test_a_rerun_after_a_crash_retires_the_pending_log(sources, tmp_path):
    """Killed after its log was written: the re-run has nothing to stage, and still leaves a clean file."""
    original = work_copy("ws2008r2-x64", tmp_path)
    victim = tmp_path / "victim.vhdx"
    for k in range(1, 12):
        shutil.copyfile(original, victim)
        assert run_stage(victim, sources["iso"], inject=f"fsync:signal=KILL:when={k}").returncode != 0
        check = subprocess.run(["qemu-img", "check", str(victim)], capture_output=True, text=True)
        if check.returncode != 0 and "-r all" in check.stderr:  # QEMU: a log to replay first
            status = json.loads(subprocess.run(
                [sys.executable, "-m", "vhdtool.cli.main", "status", "--json", str(victim)], capture_output=True,
                text=True, env=dict(os.environ, PYTHONPATH=str(ROOT))).stdout)
            if status["state"] == "pending":  # the new state is in the log: nothing left to stage
                break
    else:
        pytest.fail("no kill point left a pending log holding the staged state")
    res = run_stage(victim, sources["iso"])
    assert res.returncode == 0 and "already staged" in res.stdout, res.stdout + res.stderr
    check = subprocess.run(["qemu-img", "check", str(victim)], capture_output=True, text=True)
    assert check.returncode == 0 and "No errors were found" in check.stdout, check.stderr
    again = tmp_path / "again.vhdx"
    shutil.copyfile(victim, again)
    assert run_stage(again, sources["iso"]).returncode == 0 and digest(again) == digest(victim)  # now writes nothing
