"""The whole read path on fixture images built with real tools, judged field by field.

Each fixture records the facts it was built with (fixtures/build/); inspect must
report every one of them. Bytes read through open_disk must equal qemu-img's and
libvhdi's reading of the same file, and inspecting must not change the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import assert_one_line_error
from fixtures import build as fb
from vhdtool import inspect, open_disk
from vhdtool.errors import EncryptedVolume, NoGuestFound, NoPartitionTable

pytestmark = pytest.mark.fixtures
# ws2012-gaphive's recorded facts are its primary file's, but its SYSTEM logs change two service
# Start values, and inspect reads what Windows sees after replaying them: test_dirty_read.py judges
# it against a test-side replay. (ws2008r2-dirtyhive's log changes no recorded fact: it stays here.)
READ_AFTER_REPLAY = {"ws2012-gaphive"}
GUESTS = sorted(n for n, f in fb.FIXTURES.items() if "guest" in f.facts and n not in READ_AFTER_REPLAY)
ALL = sorted(fb.FIXTURES)


@pytest.fixture(scope="session")
def image():
    return lambda name: fb.build(name)


def assert_facts(expected, actual, where="") -> None:
    """Every expected fact is in ``actual`` with the same value (extra keys allowed)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{where}: expected a mapping, got {actual!r}"
        for key, value in expected.items():
            assert key in actual, f"{where}.{key} missing"
            assert_facts(value, actual[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), f"{where}: {actual!r} != {expected!r}"
        for i, (e, a) in enumerate(zip(expected, actual)):
            assert_facts(e, a, f"{where}[{i}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


@pytest.mark.parametrize("name", GUESTS)
def test_inspect_reports_the_facts_the_fixture_was_built_with(name, image):
    doc = inspect(image(name)).to_dict()
    assert doc["schema"] == 1
    assert_facts(fb.FIXTURES[name].facts, doc)


def test_facts_read_after_replay_differ_from_the_recorded_ones_only_where_the_logs_write(image):
    """Why ws2012-gaphive is judged elsewhere: exactly the two services its logs change differ."""
    doc = inspect(image("ws2012-gaphive")).to_dict()
    recorded = fb.FIXTURES["ws2012-gaphive"].facts
    assert_facts(recorded["guest"]["windows"], doc["guest"]["windows"])
    read = {s["name"]: s["start_value"] for s in doc["guest"]["integration_services"]["services"]}
    built = {s["name"]: s["start_value"] for s in recorded["guest"]["integration_services"]["services"]}
    assert {n for n in built if read[n] != built[n]} == {"vmickvpexchange", "vmictimesync"}


@pytest.mark.parametrize("name", ALL)
def test_open_disk_reads_what_qemu_and_libvhdi_read(name, image, tmp_path):
    import pyvhdi

    path = image(name)
    fixture = fb.FIXTURES[name]
    fmt = "vhdx" if fixture.container == "vhdx" else "vpc"
    subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(path), str(tmp_path / "q.raw")], check=True)
    qemu = (tmp_path / "q.raw").read_bytes()
    with open_disk(path) as d:
        assert d.format == fixture.container
        assert d.size == fixture.virtual_size
        ours = d.read()
    assert hashlib.sha256(ours).hexdigest() == hashlib.sha256(qemu).hexdigest()
    v = pyvhdi.file()
    v.open(str(path))
    assert v.read_buffer_at_offset(len(ours), 0) == ours
    v.close()


@pytest.mark.parametrize("name", ALL)
def test_inspect_never_writes(name, image):
    path = image(name)
    before = (hashlib.sha256(path.read_bytes()).hexdigest(), os.stat(path).st_mtime_ns)
    try:
        inspect(path)
    except Exception:
        pass
    assert (hashlib.sha256(path.read_bytes()).hexdigest(), os.stat(path).st_mtime_ns) == before


def test_cli_json_is_to_dict(image, cli):
    path = image("win10-gpt")
    code, out, err = cli("inspect", "--json", path)
    assert code == 0, err
    assert json.loads(out) == inspect(path).to_dict()


def test_cli_several_images_give_a_list(image, cli):
    a, b = image("ws2008r2-x64"), image("ubuntu-ext4")
    code, out, err = cli("inspect", "--json", a, b)
    assert code == 0, err
    docs = json.loads(out)
    assert [d["guest"]["os"] for d in docs] == ["windows", "linux"]


def test_cli_text_summary(image, cli):
    code, out, err = cli("inspect", image("ws2008r2-x64"))
    assert code == 0, err
    assert "Windows Server 2008 R2 Standard Service Pack 1" in out
    assert "vmickvpexchange      manual (3)" in out
    code, out, err = cli("inspect", image("ws2008r2-nokvp"))
    assert "vmickvpexchange      disabled (4)" in out


def test_cli_one_bad_image_among_good(image, cli, tmp_path):
    good = image("ws2008r2-x64")
    code, out, err = cli("inspect", "--json", good, tmp_path / "missing.vhdx")
    assert code == 2
    docs = json.loads(out)
    assert docs[0]["guest"]["os"] == "windows"
    assert docs[1]["error"]["code"] == 2
    assert "missing.vhdx" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "name,error,code",
    [("no-partition-table", NoPartitionTable, 7), ("bitlocker", EncryptedVolume, 8)],
)
def test_images_without_a_readable_guest(name, error, code, image, cli):
    path = image(name)
    with pytest.raises(error):
        inspect(path)
    c, out, err = cli("inspect", path)
    assert c == code
    assert_one_line_error(c, out, err, path)


def test_a_disk_without_an_operating_system_is_reported_not_refused(image, cli):
    """no-windows is an empty NTFS volume (mkntfs): a data disk. inspect reports it; plan needs a guest."""
    path = image("no-windows")
    ins = inspect(path)
    assert ins.guest.os is None and [p.filesystem for p in ins.partitions] == ["ntfs"]
    c, out, err = cli("inspect", "--json", path)
    assert c == 0, err
    assert json.loads(out)["guest"] == {"os": None, "windows": None, "integration_services": None, "linux": None}
    c, out, err = cli("plan", "--host", "win10", path)
    assert c == NoGuestFound.exit_code == 9
    assert_one_line_error(c, out, err, path)


def test_vhd_variants_report_the_same_guest(image):
    base = inspect(image("ws2008r2-x64")).to_dict()["guest"]
    for name in ("ws2008r2-x64-fixed", "ws2008r2-x64-vhd", "ws2008r2-x64-fixed-vhd"):
        assert inspect(image(name)).to_dict()["guest"] == base


def test_differencing_child_of_a_fixture_reports_its_change(image, tmp_path):
    """A differencing VHDX over a Windows fixture: unchanged sectors come from the parent."""
    import shutil

    import vhdx_craft as vc

    parent = tmp_path / "base.vhdx"
    shutil.copyfile(image("ws2008r2-x64"), parent)
    child = tmp_path / "child.avhdx"
    vc.make_differencing(parent, child, {0: (parent_mbr := _mbr(parent))})
    ins = inspect(child)
    assert ins.image.differencing and ins.image.parent == str(parent)
    assert ins.guest.windows.product_name == "Windows Server 2008 R2 Standard"
    assert ins.to_dict()["image"]["chain"] == [str(child), str(parent)]
    assert parent_mbr[510:512] == b"\x55\xaa"


def _mbr(path: Path) -> bytes:
    with open_disk(path) as d:
        return d.read(512)


def test_truncated_fixture_fails_cleanly(image, tmp_path, cli):
    path = tmp_path / "cut.vhdx"
    data = image("ws2008r2-x64").read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    c, out, err = cli("inspect", path)
    assert_one_line_error(c, out, err, path)
