"""`vhdtool plan` on fixture images with cabs made by gcab, in folders and in a genisoimage-made vmguest.iso."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest

from conftest import assert_one_line_error
from fixtures import build as fb
from fixtures.cabs import CabSpec, build_cab, build_iso

pytestmark = pytest.mark.fixtures
WIN8_IC = "6.2.9200.16384"  # what a Windows 8 / Server 2012 host's disk carries
WIN81_IC = "6.3.9600.16384"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("cabs")
    all_cabs = [CabSpec(nt, arch, WIN8_IC) for nt in ("6.0", "6.1", "6.2") for arch in ("x64", "x86")]
    out = {
        "iso": build_iso(all_cabs, root / "vmguest.iso"),
        "iso81": build_iso([CabSpec(nt, arch, WIN81_IC) for nt in ("6.0", "6.1", "6.2") for arch in ("x64", "x86")], root / "vmguest81.iso"),
        "x86-only": root / "x86-only",
        "old": root / "old",
        "kb": root / "kb",
        "no-support": build_iso(all_cabs, root / "nosupport.iso", support=False),
    }
    for nt in ("6.0", "6.1", "6.2"):
        build_cab(CabSpec(nt, "x86", WIN8_IC), out["x86-only"])
        build_cab(CabSpec(nt, "x64", "6.1.7601.17514"), out["old"])
        for arch in ("x64", "x86"):
            build_cab(CabSpec(nt, arch, "6.3.9600.18080", kb=True), out["kb"])
    return out


def plan_json(cli, image, *args):
    code, out, err = cli("plan", "--json", image, *args)
    assert code == 0, err
    return json.loads(out)


def test_2008r2_on_win8_stages_the_61_x64_cab_from_the_iso(cli, sources):
    doc = plan_json(cli, fb.build("ws2008r2-x64"), "--host", "win8", "--cabs", sources["iso"])
    assert (doc["guest_key"], doc["arch"], doc["method"], doc["action"]) == ("server-2008r2", "x64", "integration-services-disk", "stage")
    cab = doc["cab"]
    assert cab["name"] == "Windows6.1-HyperVIntegrationServices-x64.cab"
    assert cab["path"] == f"{sources['iso']}:/support/amd64/Windows6.1-HyperVIntegrationServices-x64.cab"
    assert (cab["version"], cab["arch"], cab["source"]) == (WIN8_IC, "x64", str(sources["iso"]))
    # The digest is of the cab as stored in the ISO: compare with the extracted bytes (isoinfo is the judge).
    import subprocess

    data = subprocess.run(["isoinfo", "-J", "-i", str(sources["iso"]), "-x", "/support/amd64/Windows6.1-HyperVIntegrationServices-x64.cab"],
                          check=True, capture_output=True).stdout
    assert cab["sha256"] == hashlib.sha256(data).hexdigest()


def test_same_guest_with_an_x86_only_source_is_manual(cli, sources):
    doc = plan_json(cli, fb.build("ws2008r2-x64"), "--host", "2012", "--cabs", sources["x86-only"])
    assert (doc["method"], doc["action"], doc["cab"]) == ("integration-services-disk", "manual", None)
    assert any("x86" in r and "x64" in r for r in doc["reasons"])


def test_2008r2_on_win10_is_windows_update(cli, sources):
    doc = plan_json(cli, fb.build("ws2008r2-x64"), "--host", "win10", "--cabs", sources["kb"])
    assert (doc["method"], doc["action"], doc["cab"]) == ("windows-update", "none", None)


def test_a_cab_no_newer_than_the_guest_is_up_to_date(cli, sources):
    doc = plan_json(cli, fb.build("ws2008r2-x64"), "--host", "win8", "--cabs", sources["old"])
    assert (doc["method"], doc["action"]) == ("up-to-date", "none")
    assert doc["guest_ic_version"] == "6.1.7601.17514"


def test_ubuntu_with_the_daemons_is_up_to_date(cli, sources):
    doc = plan_json(cli, fb.build("ubuntu-ext4"), "--host", "win8.1", "--cabs", sources["iso"])
    assert (doc["guest_key"], doc["method"], doc["action"]) == ("linux", "up-to-date", "none")
    assert (doc["packages"], doc["package_manager"], doc["units"]) == ([], None, [])


def test_debian_without_the_vss_daemon_stages_hyperv_daemons(cli):
    """The Debian fixture has only /usr/sbin/hv_kvp_daemon: apt installs hyperv-daemons at next boot."""
    doc = plan_json(cli, fb.build("debian-lvm-ext4"), "--host", "win10")
    assert (doc["guest_key"], doc["method"], doc["action"], doc["cab"]) == ("linux", "package-manager", "stage", None)
    assert (doc["packages"], doc["package_manager"]) == (["hyperv-daemons"], "apt")
    assert doc["units"][:2] == ["hyperv-daemons.hv-kvp-daemon.service", "hyperv-daemons.hv-vss-daemon.service"]
    assert doc["reasons"][0].startswith("hv_vss_daemon is missing")


def test_stage_dry_run_of_a_linux_guest_names_what_it_would_write(cli, tmp_path):
    """The plan's packages become install.sh and its unit (the writes are judged in tests/test_linux_stage.py)."""
    image = tmp_path / "debian.vhdx"
    shutil.copyfile(fb.build("debian-lvm-ext4"), image)
    before = image.read_bytes()
    code, out, err = cli("stage", "--json", image, "--host", "win10", "--dry-run")
    doc = json.loads(out)
    assert code == 0, err
    assert (doc["id"], doc["dry_run"], doc["staged"], doc["committed"]) == ("hyperv-daemons", True, False, False)
    assert [f["path"] for f in doc["files"]] == ["/var/lib/vhdtool/hyperv-daemons/install.sh",
                                                 "/etc/systemd/system/vhdtool-hyperv-daemons.service"]
    assert image.read_bytes() == before


def test_windows7_x86_on_win81_stages_the_x86_cab(cli, sources):
    doc = plan_json(cli, fb.build("win7-x86"), "--host", "win8.1", "--cabs", sources["iso81"])
    assert (doc["guest_key"], doc["arch"], doc["action"]) == ("windows-7", "x86", "stage")
    assert doc["cab"]["name"] == "Windows6.1-HyperVIntegrationServices-x86.cab"
    assert doc["guest_ic_version"] == "6.1.7601.17514"  # from vmbus.sys


def test_data_exchange_disabled_on_win10_takes_kb3071740(cli, sources, tmp_path):
    doc = plan_json(cli, fb.build("ws2008r2-nokvp"), "--host", "2016", "--cabs", sources["kb"])
    assert (doc["method"], doc["action"]) == ("kb3071740-cab", "stage")
    assert doc["cab"]["name"] == "windows6.1-hypervintegrationservices-x64.cab"


def test_several_images_and_a_folder_with_other_files(cli, sources, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(sources["kb"], folder / "kb")
    (folder / "readme.txt").write_text("not a cab")
    code, out, err = cli("plan", "--json", fb.build("ws2008r2-nokvp"), fb.build("ubuntu-ext4"), "--host", "win10", "--cabs", folder)
    assert code == 0, err
    docs = json.loads(out)
    assert [d["method"] for d in docs] == ["kb3071740-cab", "up-to-date"]


def test_text_output(cli, sources):
    code, out, err = cli("plan", fb.build("ws2008r2-x64"), "--host", "win8", "--cabs", sources["iso"])
    assert code == 0, err
    assert "action     stage" in out and "Windows6.1-HyperVIntegrationServices-x64.cab" in out


# -- bad input ----------------------------------------------------------------------------------------
def test_unknown_host(cli):
    code, out, err = cli("plan", fb.build("ws2008r2-x64"), "--host", "vista")
    assert code == 11 and "unknown host 'vista'" in err and "Traceback" not in err


def test_iso_without_support_folder(cli, sources):
    code, out, err = cli("plan", fb.build("ws2008r2-x64"), "--host", "win8", "--cabs", sources["no-support"])
    assert_one_line_error(code, out, err, sources["no-support"])
    assert "support" in err


def test_truncated_iso(cli, sources, tmp_path):
    cut = tmp_path / "cut.iso"
    data = sources["iso"].read_bytes()
    for size in (40 * 1024, len(data) - 600):
        cut.write_bytes(data[:size])
        code, out, err = cli("plan", fb.build("ws2008r2-x64"), "--host", "win8", "--cabs", cut)
        assert_one_line_error(code, out, err, cut)


def test_corrupt_cab_and_cab_without_manifest(cli, sources, tmp_path):
    good = build_cab(CabSpec("6.1", "x64", WIN8_IC), tmp_path / "good")
    corrupt = tmp_path / "Windows6.1-HyperVIntegrationServices-x64.cab"
    data = bytearray(good.read_bytes())
    data[60:80] = os.urandom(20)
    corrupt.write_bytes(bytes(data[: len(data) - 50]))
    code, out, err = cli("plan", fb.build("ws2008r2-x64"), "--host", "win8", "--cabs", corrupt)
    assert_one_line_error(code, out, err, corrupt)
    nomum = build_cab(CabSpec("6.1", "x64", WIN8_IC), tmp_path / "nomum", with_mum=False)
    code, out, err = cli("plan", fb.build("ws2008r2-x64"), "--host", "win8", "--cabs", nomum)
    assert_one_line_error(code, out, err, nomum)
    assert "update.mum" in err


def test_cab_whose_manifest_disagrees_with_its_name_is_never_chosen(cli, tmp_path):
    wrong = build_cab(CabSpec("6.1", "x64", WIN8_IC), tmp_path / "wrong", parent_nt="6.2")
    doc = plan_json(cli, fb.build("ws2008r2-x64"), "--host", "win8", "--cabs", wrong)
    assert (doc["action"], doc["cab"]) == ("manual", None)
    assert any("manifest" in r for r in doc["reasons"])


def test_missing_cab_source(cli, tmp_path):
    code, out, err = cli("plan", fb.build("ws2008r2-x64"), "--host", "win8", "--cabs", tmp_path / "nope")
    assert_one_line_error(code, out, err, tmp_path / "nope")


def test_host_auto_plans_for_the_host_each_guest_last_ran_on(cli, sources):
    # ws2008r2-x64 recorded a Server 2012 host (win8); ws2008r2-hibernated a Server 2012 R2 one
    # (win8.1); ws2008r2-dirtyhive a Windows 10 one, in the other spelling of the value names.
    images = [fb.build(n) for n in ("ws2008r2-x64", "ws2008r2-hibernated", "ws2008r2-dirtyhive")]
    code, out, err = cli("plan", "--json", "--host", "auto", "--cabs", sources["iso"], *images)
    assert code == 0, err
    docs = json.loads(out)
    assert [d["host"] for d in docs] == ["win8", "win8.1", "win10"]
    assert [(d["method"], d["action"]) for d in docs] == [
        ("integration-services-disk", "stage"), ("integration-services-disk", "stage"), ("windows-update", "none")]
    for image, doc in zip(images, docs):
        code, out, err = cli("plan", "--json", "--host", doc["host"], "--cabs", sources["iso"], image)
        assert json.loads(out) == doc


@pytest.mark.parametrize("name,needle", [("win7-x86", "never recorded the host"),
                                         ("ws2008r2-nokvp", "last ran on a Windows 6.1 host (HV-OLD-07)")])
def test_host_auto_without_a_usable_host(cli, name, needle):
    image = fb.build(name)
    code, out, err = cli("plan", "--host", "auto", image)
    assert_one_line_error(code, out, err, image)
    assert code == 11 and needle in err and "--host win8, win8.1 or win10" in err
    # In a JSON list, the failed image's document has the plan's schema and the error.
    code, out, err = cli("plan", "--json", "--host", "auto", image, fb.build("ws2008r2-x64"))
    docs = json.loads(out)
    assert code == 11 and docs[0] == {"schema": 1, "image": str(image), "error": {"code": 11, "message": err.splitlines()[0][len("vhdtool: "):]}}
    assert docs[1]["host"] == "win8"


def test_plan_says_before_anything_is_written_when_stage_would_refuse(cli, sources):
    doc = plan_json(cli, fb.build("ws2008r2-hibernated"), "--host", "win8", "--cabs", sources["iso"])
    assert doc["action"] == "stage"
    assert any(n.startswith("stage would refuse this image: the guest is hibernated") for n in doc["notes"])
    doc = plan_json(cli, fb.build("ws2008r2-dirtyhive"), "--host", "win8", "--cabs", sources["iso"])
    assert any("SYSTEM hive is dirty: stage replays its logs first" in n for n in doc["notes"])
    assert not any("would refuse" in n for n in doc["notes"])
    doc = plan_json(cli, fb.build("ws2008r2-x64"), "--host", "win8", "--cabs", sources["iso"])
    assert not any("refuse" in n or "dirty" in n for n in doc["notes"])
