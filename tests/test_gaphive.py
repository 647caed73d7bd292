"""`services` and `stage` on a real Windows 10 SYSTEM hive whose logs skip sequence numbers (fixture ws2012-gaphive).

The fixture's SYSTEM is the real Windows 10 hive left as a partial reconcile leaves it:
primary 229/228, LOG1 entries 260-263, LOG2 264-267 (fixtures/build/windows.py). What
vhdtool wrote is read back with qemu-img (check, raw conversion), ntfs-3g's ntfscat,
hivexget and hivexml (libhivex), and judged against tests/regf_judge.py's replay of the
original primary and logs (written from the specification, sharing no code with
vhdtool): the written primary must be that replay plus exactly the intended change,
clean, and numbered above every log entry so that Windows replays nothing over it.
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
import struct
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from fixtures import build as fb
from fixtures.cabs import CabSpec, build_iso
from judges.hives import hive_typed_values
from judges.tools import sh
from judges.volumes import extract_partition, ntfscat, raw_image
from regf_judge import judge_replay, xor_checksum

pytestmark = pytest.mark.fixtures
NAME, PART = "ws2012-gaphive", 3
CONFIG = "/Windows/System32/config"
SERVICES = "controlset001\\services\\"
REG_SZ, REG_DWORD = 1, 4


def work_copy(tmp: Path) -> Path:
    src = Path(fb.build(NAME))
    dst = tmp / src.name
    shutil.copyfile(src, dst)
    return dst


def hive_files(image: Path, tmp: Path) -> dict[str, bytes]:
    raw = raw_image(image, tmp / "disk.raw")
    part = extract_partition(raw, PART, tmp / "part.img")
    raw.unlink()
    files = {name: ntfscat(part, f"{CONFIG}/{name}") for name in ("SYSTEM", "SYSTEM.LOG1", "SYSTEM.LOG2")}
    part.unlink()
    return files


def hive_tree(data: bytes, tmp: Path) -> dict[str, dict[str, tuple]]:
    """Every key (lower-case path) and its values {name: (type, value, encoding)}, as hivexml reads them."""
    path = tmp / "tree.hive"
    path.write_bytes(data)
    xml = subprocess.run(["hivexml", str(path)], capture_output=True, check=True).stdout
    tree: dict[str, dict[str, tuple]] = {}
    stack: list[str] = []
    for event, el in ET.iterparse(io.BytesIO(xml), events=("start", "end")):
        if el.tag == "node":
            if event == "start":
                stack.append(el.get("name"))
                tree["\\".join(stack[1:]).lower()] = {}
            else:
                stack.pop()
                el.clear()
        elif el.tag == "value" and event == "start":
            name = "" if el.get("default") else el.get("key")
            tree["\\".join(stack[1:]).lower()][name] = (el.get("type"), el.get("value"), el.get("encoding"))
    return tree


def differences(a: dict, b: dict) -> set[tuple[str, str | None]]:
    """(key, value name) pairs that differ; (key, None) for a key only one of them has."""
    diff = {(k, None) for k in set(a) ^ set(b)}
    for key in set(a) & set(b):
        diff |= {(key, n) for n in set(a[key]) | set(b[key]) if a[key].get(n) != b[key].get(n)}
    return diff


def log_sequences(log: bytes) -> list[int]:
    """Every sequence number in a log: its base block's and each HvLE header's at a 512-byte boundary."""
    found = list(struct.unpack_from("<II", log, 4))
    found += [struct.unpack_from("<I", log, at + 12)[0] for at in range(512, len(log) - 16, 512)
              if log[at:at + 4] == b"HvLE"]
    return found


def hivexget(data: bytes, tmp: Path, key: str) -> dict:
    path = tmp / "get.hive"
    path.write_bytes(data)
    return hive_typed_values(path, key)


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> dict:
    """The fixture's SYSTEM files as built, their replay by the judge and its hivexml tree."""
    tmp = tmp_path_factory.mktemp("gap-original")
    files = hive_files(Path(fb.build(NAME)), tmp)
    replayed, applied = judge_replay(files["SYSTEM"], files["SYSTEM.LOG1"], files["SYSTEM.LOG2"])
    return {"files": files, "replayed": replayed, "applied": applied, "tree": hive_tree(replayed, tmp)}


def assert_written_over_the_replay(files: dict, original: dict, tmp: Path, intended: set) -> dict:
    """The written primary is clean, above every log entry, and the judge's replay plus exactly ``intended``."""
    primary = files["SYSTEM"]
    seq1, seq2 = struct.unpack_from("<II", primary, 4)
    assert seq1 == seq2 and xor_checksum(primary[:512]) == struct.unpack_from("<I", primary, 508)[0]
    logs = (files["SYSTEM.LOG1"], files["SYSTEM.LOG2"])
    assert logs == (original["files"]["SYSTEM.LOG1"], original["files"]["SYSTEM.LOG2"])  # left as they were
    assert seq1 > max(log_sequences(logs[0]) + log_sequences(logs[1]))
    assert judge_replay(primary, *logs) is None  # Windows finds nothing to replay over it at boot
    tree = hive_tree(primary, tmp)
    assert differences(tree, original["tree"]) == intended
    return tree


def test_the_fixture_is_a_partial_reconcile_of_the_real_hive(original, tmp_path):
    files = original["files"]
    assert struct.unpack_from("<II", files["SYSTEM"], 4) == (229, 228)
    assert log_sequences(files["SYSTEM.LOG1"])[:6] == [260, 260, 260, 261, 262, 263]
    assert log_sequences(files["SYSTEM.LOG2"])[:6] == [264, 264, 264, 265, 266, 267]
    # Remnants of older entries lie behind each run: numbered above the secondary number, never applied.
    assert {229, 230} <= set(log_sequences(files["SYSTEM.LOG1"]) + log_sequences(files["SYSTEM.LOG2"]))
    assert original["applied"] == list(range(260, 268))
    replayed = original["replayed"]
    assert len(replayed) > len(files["SYSTEM"])  # the logged writes grew the hive
    # The replay is the real Windows 10 hive plus exactly the writes the builder made, read with hivexml.
    real = hive_tree(gzip.decompress((fb.REAL / "SYSTEM-win10-x64.gz").read_bytes()), tmp_path)
    logged = "setup\\loggedwrites"
    assert differences(original["tree"], real) == {
        ("controlset001\\control\\windows", "ShellErrorMode"), ("controlset001\\control\\windows", "ShutdownTime"),
        (SERVICES + "vmickvpexchange", "Start"), (SERVICES + "vmictimesync", "Start"), (logged, None)}
    assert len(original["tree"][logged]) == 1 + 4 * 6
    assert hivexget(replayed, tmp_path, "Setup\\LoggedWrites")["Last"] == (REG_SZ, "8")
    # The primary alone holds the reconciled write but none of the logged ones.
    primary = hive_tree(files["SYSTEM"], tmp_path)
    assert differences(primary, real) == {("controlset001\\control\\windows", "ShellErrorMode")}


def test_services_writes_over_the_replayed_hive(cli, original, tmp_path):
    image = work_copy(tmp_path)
    code, out, err = cli("services", "--json", image, "--disable", "vmicshutdown", "--disable", "vmickvpexchange")
    assert code == 0, err
    doc = json.loads(out)
    # vmickvpexchange is already disabled by the logs: only vmicshutdown changes.
    assert [(r["key"].rsplit("\\", 1)[-1], r["old"], r["new"]) for r in doc["changes"]["registry"]] == [
        ("vmicshutdown", 3, 4)]
    sh("qemu-img", "check", "-f", "vhdx", image)
    files = hive_files(image, tmp_path)
    assert_written_over_the_replay(files, original, tmp_path, {(SERVICES + "vmicshutdown", "Start")})
    starts = {n: hivexget(files["SYSTEM"], tmp_path, f"ControlSet001\\Services\\{n}")["Start"]
              for n in ("vmicshutdown", "vmickvpexchange", "vmictimesync", "vmicheartbeat")}
    assert starts == {"vmicshutdown": (REG_DWORD, 4), "vmickvpexchange": (REG_DWORD, 4),
                      "vmictimesync": (REG_DWORD, 2), "vmicheartbeat": (REG_DWORD, 3)}
    # inspect and plan now read the values the logs held.
    code, out, err = cli("inspect", "--json", image)
    doc = json.loads(out)
    services = {s["name"]: s["start_value"] for s in doc["guest"]["integration_services"]["services"]}
    assert (services["vmickvpexchange"], services["vmictimesync"], services["vmicshutdown"]) == (4, 2, 4)
    assert doc["guest"]["windows"]["hives"]["SYSTEM"]["dirty"] is False
    code, out, err = cli("plan", "--json", image, "--host", "win10")
    assert code == 0 and json.loads(out)["method"] == "kb3071740-cab", out  # Data Exchange disabled


def test_stage_writes_over_the_replayed_hive(cli, original, tmp_path):
    iso = build_iso([CabSpec("6.2", "x64", "6.3.9600.16384")], tmp_path / "vmguest.iso")
    image = work_copy(tmp_path)
    code, out, err = cli("stage", "--json", image, "--host", "win8.1", "--cabs", iso)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["staged"] and doc["method"] == "integration-services-disk"
    sh("qemu-img", "check", "-f", "vhdx", image)
    files = hive_files(image, tmp_path)
    assert_written_over_the_replay(files, original, tmp_path, {("setup", "CmdLine"), ("setup", "SetupType")})
    setup = hivexget(files["SYSTEM"], tmp_path, "Setup")
    assert setup["SetupType"] == (REG_DWORD, 2) and "install.cmd" in setup["CmdLine"][1]
    assert hivexget(files["SYSTEM"], tmp_path, "Setup\\LoggedWrites")["Last"] == (REG_SZ, "8")
    code, out, err = cli("inspect", "--json", image)
    services = {s["name"]: s["start_value"] for s in json.loads(out)["guest"]["integration_services"]["services"]}
    assert (services["vmickvpexchange"], services["vmictimesync"]) == (4, 2)
    code, out, err = cli("plan", "--json", image, "--host", "win10")
    assert code == 0 and json.loads(out)["method"] == "kb3071740-cab", out
