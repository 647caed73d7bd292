""".msu files as cab sources: built with gcab as Microsoft lays them out, planned and staged.

An .msu is a cab holding the package cab (Windows6.1-KB3071740-x64.cab), WSUSSCAN.cab,
a UTF-16LE <KB>-pkgProperties.txt with a byte order mark and an unattend <KB>.xml.
What stage wrote is read back with ntfscat (the package cab byte-identical to the one
put in the .msu) and qemu-img check; the package cab is taken out of the .msu by
gcab itself, not by vhdtool, to know what it should be.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import assert_one_line_error, digest, work_copy
from fixtures.cabs import CabSpec, build_cab
from judges.volumes import ntfscat
from judges.volumes import partition_volume as volume

pytestmark = pytest.mark.fixtures
KB_VERSION = "6.3.9600.18080"
KB_ID = f"{KB_VERSION}-x64"
MSU = "Windows6.1-KB3071740-x64.msu"
INNER = "Windows6.1-KB3071740-x64.cab"
PROPERTIES = (
    'ApplicabilityInfo="Windows 7.0 Client SP1;Windows 7.0 Server Core SP1;"\r\n'
    'Applies to="Update for Windows"\r\n'
    'Build Date="2015/09/16"\r\n'
    'Company="Microsoft Corporation"\r\n'
    'File Version="6.1.7601.23200"\r\n'
    'Installation Type="Update"\r\n'
    'Installer Engine="Component Based Servicing"\r\n'
    'Installer Version="6.1.7601.17514"\r\n'
    'KB Article Number="{kb}"\r\n'
    'Language="ALL"\r\n'
    'Package Type="Update"\r\n'
    'Processor Architecture="amd64"\r\n'
    'Product Name="Windows 7.0"\r\n'
    'Support Link="http://support.microsoft.com?kbid={kb}"\r\n'
)
UNATTEND = """<?xml version="1.0" encoding="UTF-8"?>
<unattend xmlns="urn:schemas-microsoft-com:unattend">
  <servicing>
    <package action="install">
      <assemblyIdentity name="Package_for_KB{kb}" version="6.1.1.1" language="neutral" processorArchitecture="amd64" publicKeyToken="31bf3856ad364e35"/>
      <source location="%configsetroot%\\{inner}" />
    </package>
  </servicing>
</unattend>
"""


def gcab(out: Path, folder: Path, names: list[str], compress: bool = True) -> Path:
    subprocess.run(["gcab", "-c", *(["-z"] if compress else []), "-n", str(out), *names],
                   cwd=folder, check=True, capture_output=True)
    return out


def build_msu(out_dir: Path, nt: str = "6.1", kb: str = "3071740", properties_kb: str | None = None,
              compress: bool = True, wim: bool = False, name: str | None = None) -> tuple[Path, Path]:
    """(the .msu, the package cab put in it), laid out as the Microsoft Update Catalog ships them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"Windows{nt}-KB{kb}-x64"
    parts = out_dir.parent / f".{out_dir.name}.parts"  # beside, not in, the folder given to --cabs
    parts.mkdir()
    inner = parts / f"{stem}.cab"
    if not wim:
        build_cab(CabSpec(nt, "x64", KB_VERSION, kb=True), parts / "build").rename(inner)
    scan = parts / "scan"
    scan.mkdir()
    (scan / "package.xml").write_text('<?xml version="1.0"?><OfflineSyncPackage xmlns="http://schemas.microsoft.com/'
                                      'msus/2004/02/OfflineSync" MinimumClientVersion="5.8.0.2678"/>')
    gcab(parts / "WSUSSCAN.cab", scan, ["package.xml"])
    (parts / f"{stem}-pkgProperties.txt").write_bytes(
        b"\xff\xfe" + PROPERTIES.format(kb=properties_kb or kb).encode("utf-16-le"))
    (parts / f"{stem}.xml").write_text(UNATTEND.format(kb=kb, inner=inner.name))
    members = ["WSUSSCAN.cab", f"{stem}-pkgProperties.txt", f"{stem}.xml"]
    if wim:
        (parts / f"{stem}.wim").write_bytes(b"MSWIM\0\0\0" + os.urandom(4096))
        gcab(parts / "SSU-26100.1738-x64.cab", scan, ["package.xml"])
        members += [f"{stem}.wim", "SSU-26100.1738-x64.cab"]
    else:
        members.insert(0, inner.name)
    msu = gcab(out_dir / (name or f"{stem}.msu"), parts, members, compress)
    return msu, inner


@pytest.fixture(scope="module")
def msu(tmp_path_factory):
    root = tmp_path_factory.mktemp("msu")
    path, inner = build_msu(root / "file")
    # The package cab as gcab itself takes it out of the .msu: what stage must write.
    out = root / "extracted"
    out.mkdir()
    subprocess.run(["gcab", "-x", "-C", str(out), str(path)], check=True, capture_output=True)
    assert hashlib.sha256((out / INNER).read_bytes()).digest() == hashlib.sha256(inner.read_bytes()).digest()
    return {"msu": path, "inner": inner, "sha256": hashlib.sha256(inner.read_bytes()).hexdigest(), "root": root}


@pytest.fixture
def clean_tmp(tmp_path, monkeypatch):
    """A TMPDIR of the test's own, to see that the extracted package cab is removed."""
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    return spool


def plan_json(cli, image, cabs) -> tuple[int, dict, str]:
    code, out, err = cli("plan", "--json", image, "--host", "win10", "--cabs", cabs)
    return code, (json.loads(out) if out.strip() else {}), err


def iso_of(files: list[Path], out: Path) -> Path:
    root = out.parent / (out.name + ".root")
    folder = root / "support" / "amd64"
    folder.mkdir(parents=True)
    for f in files:
        shutil.copy(f, folder / f.name)
    subprocess.run(["genisoimage", "-quiet", "-J", "-joliet-long", "-V", "VMGUEST", "-o", str(out), str(root)],
                   check=True, capture_output=True)
    return out


@pytest.mark.parametrize("given", ["file", "folder", "iso"])
def test_plan_chooses_the_package_cab_of_an_msu_and_shows_its_kb(cli, msu, tmp_path, clean_tmp, given):
    image = work_copy("ws2008r2-nokvp", tmp_path)
    cabs = {"file": msu["msu"], "folder": msu["msu"].parent,
            "iso": iso_of([msu["msu"]], tmp_path / "updates.iso")}[given]
    code, doc, err = plan_json(cli, image, cabs)
    assert code == 0, err
    cab = doc["cab"]
    assert (doc["method"], doc["action"]) == ("kb3071740-cab", "stage"), doc
    assert (cab["kb"], cab["name"], cab["sha256"]) == ("3071740", INNER, msu["sha256"])
    assert (cab["version"], cab["arch"], cab["nt"]) == (KB_VERSION, "x64", "6.1")
    shown = msu["msu"] if given != "iso" else f"{cabs}:/support/amd64/{MSU}"
    assert cab["msu"] == str(shown) and cab["path"] == f"{shown}:{INNER}"
    code, out, err = cli("plan", image, "--host", "win10", "--cabs", cabs)
    assert code == 0 and f"{shown}:{INNER} (KB3071740, {KB_VERSION}" in out, out
    assert list(clean_tmp.iterdir()) == []


@pytest.mark.parametrize("compress,given", [(True, "file"), (False, "file"), (True, "iso")],
                         ids=["mszip", "stored", "iso"])
def test_stage_writes_the_package_cab_not_the_msu(cli, tmp_path, clean_tmp, compress, given):
    msu, inner = build_msu(tmp_path / "updates", compress=compress)
    cabs = msu if given == "file" else iso_of([msu], tmp_path / "updates.iso")
    image = work_copy("ws2008r2-nokvp", tmp_path)
    code, out, err = cli("stage", "--json", image, "--host", "win10", "--cabs", cabs)
    assert code == 0, err
    doc = json.loads(out)
    assert (doc["method"], doc["staged"], doc["id"]) == ("kb3071740-cab", True, KB_ID)
    assert doc["cab"]["kb"] == "3071740"
    subprocess.run(["qemu-img", "check", "-f", "vhdx", str(image)], check=True, capture_output=True)
    part = volume(image, tmp_path, 2)
    staged = ntfscat(part, f"/Windows/vhdtool/{KB_ID}/{INNER}")
    assert hashlib.sha256(staged).hexdigest() == hashlib.sha256(inner.read_bytes()).hexdigest()
    assert f"{INNER}".encode() in ntfscat(part, f"/Windows/vhdtool/{KB_ID}/install.cmd")
    assert list(clean_tmp.iterdir()) == []


def test_a_wim_based_msu_is_refused_naming_it(cli, tmp_path):
    msu, _ = build_msu(tmp_path / "w11", nt="11.0", kb="5043080", wim=True,
                       name="windows11.0-kb5043080-x64_953449672073f8fb99badb4cc6d5d7849b9c83e8.msu")
    image = work_copy("ws2008r2-nokvp", tmp_path)
    before = digest(image)
    for cabs in (msu, msu.parent):
        code, out, err = cli("stage", image, "--host", "win10", "--cabs", cabs)
        assert_one_line_error(code, out, err, msu)
        assert code == 12 and "WIM-based" in err, err
    assert digest(image) == before


def test_kb_in_the_name_and_in_pkgproperties_must_agree(cli, tmp_path):
    msu, _ = build_msu(tmp_path / "u", properties_kb="3999999")
    image = work_copy("ws2008r2-nokvp", tmp_path)
    code, doc, err = plan_json(cli, image, msu)
    assert code == 0 and doc["action"] == "manual" and doc["cab"] is None, doc
    assert any("KB3071740 but its pkgProperties.txt says KB3999999" in r for r in doc["reasons"]), doc["reasons"]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "no-package-cab"])
def test_a_damaged_msu_is_a_one_line_error(cli, msu, tmp_path, damage):
    bad = tmp_path / MSU
    data = msu["msu"].read_bytes()
    if damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        bad.write_bytes(os.urandom(len(data)))
    else:
        gcab(bad, msu["inner"].parent, [f"{Path(MSU).stem}-pkgProperties.txt", "WSUSSCAN.cab"])
    image = work_copy("ws2008r2-nokvp", tmp_path)
    code, out, err = cli("plan", image, "--host", "win10", "--cabs", bad)
    assert_one_line_error(code, out, err, bad)
    assert code in (10, 12), err
