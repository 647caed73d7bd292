"""inspect, plan and stage read a dirty hive as Windows will see it at boot, after replaying its logs.

The expected facts are derived without vhdtool: the hive files are taken out of the
image with qemu-img and ntfs-3g's ntfscat, replayed by tests/regf_judge.py (written
from the regf format description; its Marvin32, the fixture builder's, is checked
against the hashes Windows wrote in NewDirtyHive1's logs in test_fixtures.py), and
read with hivexget by tests/judges/windows.py. The judges themselves replay nothing:
they import neither vhdtool nor the builder, so the replayed hive is handed to them.

A hive whose logs cannot be replayed is made from a fixture copy by test-side NTFS
writes (ntfscp of a .LOG1 whose first entry's hash is wrong): inspect falls back to
the primary file with a warning and exits 0, plan says so, stage refuses it and leaves
the image byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest

from conftest import digest, work_copy
from fixtures import build as fb
from fixtures.cabs import CabSpec, build_cab, build_iso
from judges.hives import hive_typed_values
from judges.tools import sh
from judges.volumes import extract_partition, ntfscat, partition_table, raw_image
from judges.windows import copy_system_files, derive_windows_facts
from regf_judge import judge_replay
from test_inspect import assert_facts
from vhdtool import inspect
from vhdtool.guest import hivefiles
from vhdtool.guest.discover import inspect_measured

pytestmark = pytest.mark.fixtures
DIRTY = ("ws2008r2-dirtyhive", "ws2012-gaphive")
CONFIG = "/Windows/System32/config"
REG_SZ, REG_DWORD = 1, 4
KB_ID = "6.3.9600.18080-x64"  # the KB3071740 cab made for NT 6.2 x64 below






def system_index(name: str) -> int:
    return fb.FIXTURES[name].facts["guest"]["windows"]["system_partition"]


def take_apart(image: Path, name: str, tmp: Path) -> tuple[Path, dict[int, Path], Path]:
    """(raw disk, every NTFS volume by index, the system volume's hives and logs), taken out with qemu-img, ntfscat."""
    tmp.mkdir(parents=True, exist_ok=True)
    raw = raw_image(image, tmp / "disk.raw")
    volumes = {i: extract_partition(raw, i, tmp / f"part{i}.img")
               for i, p in enumerate(fb.FIXTURES[name].facts["partitions"], 1) if p["filesystem"] == "ntfs"}
    files = tmp / "files"
    files.mkdir()
    copy_system_files(volumes[system_index(name)], files)
    return raw, volumes, files


def system_files(files: Path) -> tuple[bytes, bytes | None, bytes | None]:
    def read(file: str) -> bytes | None:
        return (files / file).read_bytes() if (files / file).exists() else None

    return read("SYSTEM"), read("SYSTEM.LOG1"), read("SYSTEM.LOG2")


def boot_facts(image: Path, name: str, tmp: Path) -> tuple[dict, list[int]]:
    """The guest's facts as Windows sees them at boot (SYSTEM replayed by the judge), and the entries applied."""
    raw, volumes, files = take_apart(image, name, tmp)
    replayed = judge_replay(*system_files(files))
    assert replayed is not None, "the judge finds nothing to replay"
    boot = tmp / "SYSTEM.boot"
    boot.write_bytes(replayed[0])
    return derive_windows_facts(raw, volumes, files, {"SYSTEM": (boot, len(replayed[1]))}), replayed[1]


def services(doc: dict) -> dict[str, int]:
    return {s["name"]: s["start_value"] for s in doc["integration_services"]["services"]}


@pytest.mark.parametrize("name", DIRTY)
def test_inspect_reads_a_dirty_hive_as_windows_will_see_it(name, tmp_path):
    image = Path(fb.build(name))
    expected, applied = boot_facts(image, name, tmp_path)
    seq1, seq2 = struct.unpack_from("<II", (tmp_path / "files" / "SYSTEM").read_bytes(), 4)
    ins = inspect(image)
    doc = ins.to_dict()
    assert_facts(expected["guest"], doc["guest"])
    assert doc["guest"]["windows"]["hives"]["SYSTEM"] == {
        "dirty": True, "logs": ["SYSTEM.LOG1", "SYSTEM.LOG2"] if name == "ws2012-gaphive" else ["SYSTEM.LOG1"],
        "replayed": True, "entries_applied": len(applied), "replay_problem": None}
    assert doc["guest"]["windows"]["hives"]["SOFTWARE"] == {
        "dirty": False, "logs": [], "replayed": False, "entries_applied": 0, "replay_problem": None}
    logs = "LOG1, LOG2" if name == "ws2012-gaphive" else "LOG1"
    entries = f"{len(applied)} log entr{'y' if len(applied) == 1 else 'ies'}"
    assert [w for w in ins.warnings if "dirty" in w] == [
        f"SYSTEM hive is dirty (sequence {seq1} != {seq2}); read as Windows will see it after "
        f"replaying {entries} from {logs}"]


def test_the_gap_hives_logs_decide_its_services(tmp_path):
    """Only ws2012-gaphive's logs hold Data Exchange disabled and time sync automatic; its primary says manual."""
    image = Path(fb.build("ws2012-gaphive"))
    expected, applied = boot_facts(image, "ws2012-gaphive", tmp_path)
    assert applied == list(range(260, 268))
    got = services(inspect(image).to_dict()["guest"])
    assert got == services(expected["guest"])
    assert (got["vmickvpexchange"], got["vmictimesync"]) == (4, 2)
    # The primary file alone (hivexget on it) says otherwise: reading it would be the old, wrong answer.
    primary = derive_windows_facts(*take_apart(image, "ws2012-gaphive", tmp_path / "primary"))
    assert (services(primary["guest"])["vmickvpexchange"], services(primary["guest"])["vmictimesync"]) == (3, 3)


def test_plan_and_stage_follow_the_replayed_gap_hive(cli, tmp_path):
    image = work_copy("ws2012-gaphive", tmp_path)
    code, out, err = cli("plan", "--json", image, "--host", "win10")
    doc = json.loads(out)
    assert code == 0 and doc["method"] == "kb3071740-cab", out  # Data Exchange is disabled at boot
    assert any("Data Exchange" in r and "Start=4" in r for r in doc["reasons"]), doc["reasons"]
    assert "the SYSTEM hive is dirty: Windows replays its logs at boot, and this plan read it that way " \
           "(8 log entries replayed)" in doc["notes"]

    kb = tmp_path / "kb"
    build_cab(CabSpec("6.2", "x64", "6.3.9600.18080", kb=True), kb)
    code, out, err = cli("stage", "--json", image, "--host", "win10", "--cabs", kb)
    assert code == 0, err
    doc = json.loads(out)
    assert (doc["method"], doc["staged"], doc["id"]) == ("kb3071740-cab", True, KB_ID)
    assert any("stage replays its logs first" in n for n in doc["notes"]), doc["notes"]
    sh("qemu-img", "check", "-f", "vhdx", image)
    raw, volumes, files = take_apart(image, "ws2012-gaphive", tmp_path / "after")
    part = volumes[system_index("ws2012-gaphive")]
    cab = ntfscat(part, f"/Windows/vhdtool/{KB_ID}/{Path(doc['cab']['path']).name}")
    assert hashlib.sha256(cab).hexdigest() == doc["cab"]["sha256"]
    assert b"/add-package" in ntfscat(part, f"/Windows/vhdtool/{KB_ID}/install.cmd")
    primary, log1, log2 = system_files(files)
    assert judge_replay(primary, log1, log2) is None  # written clean, above every log entry: nothing to replay
    setup = hive_typed_values(files / "SYSTEM", "Setup")
    assert setup["SetupType"] == (REG_DWORD, 2) and f"{KB_ID}\\install.cmd" in setup["CmdLine"][1]
    # The stage was written over the replayed hive: the logged values are in the primary now.
    assert hive_typed_values(files / "SYSTEM", "ControlSet001\\Services\\vmickvpexchange")["Start"] == (REG_DWORD, 4)
    assert hive_typed_values(files / "SYSTEM", "Setup\\LoggedWrites")["Last"] == (REG_SZ, "8")


def unreplayable_copy(tmp: Path) -> Path:
    """ws2008r2-dirtyhive with the hash of SYSTEM.LOG1's first (and only) entry wrong, written with ntfscp."""
    name = "ws2008r2-dirtyhive"
    src = Path(fb.build(name))
    tmp.mkdir()
    raw = raw_image(src, tmp / "disk.raw")
    index = system_index(name)
    part = extract_partition(raw, index, tmp / "system.img")
    log = bytearray(ntfscat(part, f"{CONFIG}/SYSTEM.LOG1"))
    assert log[512:516] == b"HvLE"
    log[512 + 24] ^= 0x01  # hash-1 of the entry numbered like the log's base block
    (tmp / "SYSTEM.LOG1").write_bytes(log)
    sh("ntfscp", "-f", part, tmp / "SYSTEM.LOG1", f"{CONFIG}/SYSTEM.LOG1")
    assert ntfscat(part, f"{CONFIG}/SYSTEM.LOG1") == bytes(log)
    table = partition_table(raw)
    start = table["partitions"][index - 1]["start"] * table.get("sectorsize", 512)
    with open(raw, "r+b") as disk:
        disk.seek(start)
        disk.write(part.read_bytes())
    out = tmp / "unreplayable.vhdx"
    sh("qemu-img", "convert", "-f", "raw", "-O", "vhdx", "-o", "subformat=dynamic", raw, out)
    return out


def test_unreplayable_logs_fall_back_to_the_primary_and_stage_refuses(cli, tmp_path):
    image = unreplayable_copy(tmp_path / "make")
    raw, volumes, files = take_apart(image, "ws2008r2-dirtyhive", tmp_path / "judge")
    assert judge_replay(*system_files(files)) is None  # the judge cannot replay it either
    primary_facts = derive_windows_facts(raw, volumes, files)  # hivexget on the primary file

    before = digest(image)
    code, out, err = cli("inspect", "--json", image)
    assert code == 0, err
    doc = json.loads(out)
    assert_facts(primary_facts["guest"], doc["guest"])
    state = doc["guest"]["windows"]["hives"]["SYSTEM"]
    assert (state["dirty"], state["replayed"], state["entries_applied"]) == (True, False, 0)
    assert "hash" in state["replay_problem"], state
    warning = next(w for w in doc["warnings"] if "SYSTEM hive is dirty" in w)
    assert warning == (f"SYSTEM hive is dirty (sequence 258 != 257); its logs cannot be replayed "
                       f"({state['replay_problem']}): values are read from the primary file, and stage will "
                       "refuse to write it")

    iso = build_iso([CabSpec("6.1", "x64", "6.2.9200.16384")], tmp_path / "vmguest.iso")
    code, out, err = cli("plan", "--json", image, "--host", "win8", "--cabs", iso)
    doc = json.loads(out)
    assert code == 0 and doc["action"] == "stage", out
    assert any(n.startswith("stage would refuse this image: the SYSTEM hive is dirty and its logs cannot be "
                            "replayed") for n in doc["notes"]), doc["notes"]
    assert any("this plan read the primary file's values" in n for n in doc["notes"]), doc["notes"]

    code, out, err = cli("stage", image, "--host", "win8", "--cabs", iso)
    assert code == 4 and "SYSTEM hive is dirty" in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert digest(image) == before


def test_hive_files_over_the_size_limit_are_not_read(cli, tmp_path, monkeypatch):
    """Sizes come from NTFS: a hive file above the limit is never read whole. The limit is lowered to
    below the fixture's SYSTEM (256 KiB) to see it on a real image."""
    image = work_copy("ws2008r2-dirtyhive", tmp_path)
    monkeypatch.setattr(hivefiles, "MAX_HIVE_FILE", 128 * 1024)
    ins = inspect(image)
    state = dict(ins.guest.windows.hives)["SYSTEM"]
    assert state.dirty and not state.replayed and "SYSTEM is 262144 bytes" in state.replay_problem
    assert any("its logs cannot be replayed (SYSTEM is 262144 bytes" in w for w in ins.warnings)
    before = digest(image)
    code, out, err = cli("services", image, "--disable", "vmicshutdown")
    assert code == 4 and "SYSTEM is 262144 bytes" in err and digest(image) == before


def test_only_a_dirty_hive_is_read_whole(cli, tmp_path):
    """A dirty hive costs its primary and logs, read once; a clean one only what its lookups cost.
    The same real Windows 10 SYSTEM hive (11 MiB) both ways: as the fixture has it, then made
    clean by a services write."""
    image = work_copy("ws2012-gaphive", tmp_path)
    _raw, _volumes, files = take_apart(image, "ws2012-gaphive", tmp_path / "dirty")
    whole = sum(len(f) for f in system_files(files) if f)
    _ins, io = inspect_measured(image)
    assert whole <= io.bytes_read < whole + 2 * 1024 * 1024
    code, out, err = cli("services", image, "--disable", "vmicshutdown")
    assert code == 0, err
    _raw, _volumes, files = take_apart(image, "ws2012-gaphive", tmp_path / "clean")
    ins, io = inspect_measured(image)
    assert not dict(ins.guest.windows.hives)["SYSTEM"].dirty
    assert io.bytes_read < len(system_files(files)[0]) // 4
