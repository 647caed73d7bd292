"""`vhdtool services`: integration services listed and set offline, judged by hivexget on the hive
ntfscat extracts from qemu-img's raw conversion, and by a test-side replay of a dirty hive's logs."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from conftest import assert_one_line_error
from fixtures import build as fb
from judges.hives import hive_typed_values
from judges.volumes import extract_partition, ntfs_tree, ntfscat, raw_image
from regf_judge import judge_replay

pytestmark = pytest.mark.fixtures
REG_DWORD = 4


def work_copy(name: str, tmp: Path) -> Path:
    src = Path(fb.build(name))
    dst = tmp / src.name
    shutil.copyfile(src, dst)
    return dst


def system_files(image: Path, tmp: Path, number: int) -> dict[str, bytes]:
    raw = raw_image(image, tmp / "disk.raw")
    part = extract_partition(raw, number, tmp / "part.img")
    raw.unlink()
    out = {}
    for name in ("SYSTEM", "SYSTEM.LOG1", "SYSTEM.LOG2"):
        try:
            out[name] = ntfscat(part, f"/Windows/System32/config/{name}")
        except Exception:  # noqa: BLE001 - a log the guest does not have
            pass
    part.unlink()
    return out


def start_values(hive: bytes, tmp: Path, control_set: int, names) -> dict[str, int]:
    path = tmp / "SYSTEM.judged"
    path.write_bytes(hive)
    out = {}
    for n in names:
        values = hive_typed_values(path, f"ControlSet{control_set:03d}\\Services\\{n}")
        assert values["Start"][0] == REG_DWORD
        out[n] = values["Start"][1]
    return out


IC = ("vmicheartbeat", "vmickvpexchange", "vmicshutdown", "vmictimesync", "vmicvss")


def volume_tree(image: Path, tmp: Path, number: int) -> dict[str, str]:
    raw = raw_image(image, tmp / "tree.raw")
    part = extract_partition(raw, number, tmp / "tree.img")
    raw.unlink()
    tree = ntfs_tree(part)
    part.unlink()
    return tree


# What a hive rewrite changes besides the hive: the MFT (and its mirror) and the cluster bitmap.
CHANGING = {"/$MFT", "/$MFTMirr", "/$Bitmap", "/$Secure", "/Windows/System32/config/SYSTEM"}


@pytest.mark.parametrize("name,part,control_set", [("ws2008r2-x64", 2, 1), ("ws2012-sysprep", 1, 2),
                                                   ("win10-gpt", 3, 1)])
def test_disable_and_enable(cli, tmp_path, name, part, control_set):
    image = work_copy(name, tmp_path)
    tree_before = volume_tree(image, tmp_path, part)
    before = start_values(system_files(image, tmp_path, part)["SYSTEM"], tmp_path, control_set, IC)
    code, out, err = cli("services", "--json", image, "--disable", "vmictimesync", "--disable", "VMICHeartbeat",
                         "--enable", "vmicvss")
    assert code == 0, err
    doc = json.loads(out)
    changed = {(r["key"].rsplit("\\", 1)[-1], r["old"], r["new"]) for r in doc["changes"]["registry"]}
    expected = {("vmictimesync", before["vmictimesync"], 4), ("vmicheartbeat", before["vmicheartbeat"], 4)}
    if before["vmicvss"] != 3:
        expected.add(("vmicvss", before["vmicvss"], 3))
    assert changed == expected and doc["committed"]
    after = start_values(system_files(image, tmp_path, part)["SYSTEM"], tmp_path, control_set, IC)
    assert after == {**before, "vmictimesync": 4, "vmicheartbeat": 4, "vmicvss": 3}
    # Every other file of the volume is as it was ($LogFile included: it is not reset).
    tree_after = volume_tree(image, tmp_path, part)
    assert set(tree_after) == set(tree_before)
    assert {p for p in tree_before if tree_before[p] != tree_after[p]} <= CHANGING
    assert tree_after["/Windows/System32/config/SYSTEM"] != tree_before["/Windows/System32/config/SYSTEM"]
    # What vhdtool inspect reads agrees, and the same change again is no change at all.
    code, out, err = cli("inspect", "--json", image)
    services = {s["name"]: s["start_value"] for s in json.loads(out)["guest"]["integration_services"]["services"]}
    assert {n: services[n] for n in IC} == after
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    code, out, err = cli("services", "--json", image, "--disable", "vmictimesync")
    assert code == 0 and json.loads(out)["changes"]["registry"] == [] and "nothing to change" in err
    assert hashlib.sha256(image.read_bytes()).hexdigest() == digest


def test_dirty_hive_is_replayed_before_the_change(cli, tmp_path):
    # ws2008r2-dirtyhive's SYSTEM lacks its last write, which is in SYSTEM.LOG1.
    image = work_copy("ws2008r2-dirtyhive", tmp_path)
    files = system_files(image, tmp_path, 2)
    recovered, applied = judge_replay(files["SYSTEM"], files.get("SYSTEM.LOG1"), files.get("SYSTEM.LOG2"))
    assert applied
    before = start_values(recovered, tmp_path, 1, IC)
    code, out, err = cli("services", image, "--disable", "vmicshutdown")
    assert code == 0, err
    files = system_files(image, tmp_path, 2)
    # The primary is now clean and up to date...
    after = start_values(files["SYSTEM"], tmp_path, 1, IC)
    assert after == {**before, "vmicshutdown": 4}
    # ...and what Windows would replay at boot from the logs left beside it changes nothing.
    replayed = judge_replay(files["SYSTEM"], files.get("SYSTEM.LOG1"), files.get("SYSTEM.LOG2"))
    if replayed is not None and replayed[1]:
        assert start_values(replayed[0], tmp_path, 1, IC) == after


def test_listing_and_refusals(cli, tmp_path):
    image = work_copy("ws2008r2-x64", tmp_path)
    code, out, err = cli("services", image)
    assert code == 0 and "vmictimesync" in out
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    result = cli("services", image, "--disable", "vmicnothing")
    assert_one_line_error(*result, image)
    assert result[0] == 5 and "vmictimesync" in result[2]
    code, out, err = cli("services", "--json", "--dry-run", image, "--disable", "vmictimesync")
    doc = json.loads(out)
    assert code == 0 and doc["dry_run"] and not doc["committed"] and doc["changes"]["registry"]
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before
    # On a Linux guest a Windows-only service is passed by with a note (a mixed fleet's one command);
    # a name known nowhere is refused (tests/test_linux_services.py has the Linux side in full).
    linux = work_copy("ubuntu-ext4", tmp_path)
    linux_before = hashlib.sha256(linux.read_bytes()).hexdigest()
    code, out, err = cli("services", linux, "--disable", "vmictimesync")
    assert code == 0 and "vmictimesync has no Linux daemon" in out and "nothing to change" in err
    result = cli("services", linux, "--disable", "vmicnothing")
    assert_one_line_error(*result, linux)
    assert result[0] == 5 and hashlib.sha256(linux.read_bytes()).hexdigest() == linux_before
    hibernated = work_copy("ws2008r2-hibernated", tmp_path)
    result = cli("services", hibernated, "--disable", "vmictimesync")
    assert_one_line_error(*result, hibernated)
    assert result[0] == 18
