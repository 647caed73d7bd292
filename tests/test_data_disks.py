"""Data disks: the Windows-made 10 MiB VHDX and VHD files of fixtures/real/, one NTFS volume and no operating system.

`copy-in --partition 1` writes into them, judged by tools other than vhdtool: ntfs-3g's
ntfscat (content) and ntfsls (listing), qemu-img check (VHDX) or qemu-img's raw
conversion (VHD: qemu checks no vpc image), sfdisk (the table), dissect.ntfs (every
other file of the volume, $LogFile included, as it was) and the raw bytes outside the
partition. The per-volume refusals (dirty bit, hibernation, a partition that does not
exist or holds no NTFS) are one line with their exit code and leave the image
byte-identical; so is copy-in without --partition, which names the option. inspect
reports the disk; plan, stage, services and status need a guest and exit 9.
Every test works on copies in a temporary folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, assert_one_line_error
from judges.tools import sh
from judges.volumes import extract_partition, ntfs_tree, ntfscat, partition_table, raw_image

DISKS = ["vhdx/fixed.vhdx.gz", "vhdx/dynamic.vhdx.gz", "vhd/fixed.vhd.gz", "vhd/dynamic.vhd.gz"]
# The facts fixtures/real/PROVENANCE.md records for all four: 10 MiB virtual; MBR, one NTFS
# partition (type 0x07) at LBA 128, 14336 sectors.
VIRTUAL_SIZE = 10 * 1024 * 1024
START, SECTORS, SECTOR = 128, 14336, 512
# What adding files changes besides the files (as in test_copy_in.py).
CHANGING_SYSTEM_FILES = {"/$MFT", "/$MFTMirr", "/$Bitmap", "/$Secure"}
NO_GUEST = {"os": None, "windows": None, "integration_services": None, "linux": None}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def qemu_format(image: Path) -> str:
    return "vhdx" if image.suffix == ".vhdx" else "vpc"


def disk_copy(real, name: str, tmp: Path) -> Path:
    src = real(name)
    dst = tmp / src.name
    shutil.copyfile(src, dst)
    return dst


def container_ok(image: Path) -> None:
    if image.suffix == ".vhdx":
        res = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
        assert res.returncode == 0 and "No errors were found" in res.stdout, res.stdout + res.stderr
    # A VHD is judged by the raw conversion every look() makes (qemu-img convert -f vpc).


def look(image: Path, tmp: Path) -> dict:
    """What the judges see: sfdisk's table, the volume (cut at it), its tree, the bytes outside it."""
    raw = raw_image(image, tmp / f"{image.name}.raw", qemu_format(image))
    table = partition_table(raw)
    part = extract_partition(raw, 1, tmp / f"{image.name}.p1")
    data = raw.read_bytes()
    raw.unlink()
    outside = hashlib.sha256(data[: START * SECTOR] + data[(START + SECTORS) * SECTOR :]).hexdigest()
    return {"table": table, "part": part, "tree": ntfs_tree(part), "outside": outside, "size": len(data)}


def listing(part: Path, folder: str) -> set[str]:
    return set(sh("ntfsls", "-f", "-p", folder, part).stdout.decode().split("\n")) - {"", ".", ".."}


def put_back(image: Path, tmp: Path, change) -> None:
    """Test-side change of the virtual disk: ``change(raw)`` on qemu-img's raw conversion, which
    qemu-img then writes back into the Windows-made container (convert -n keeps the file's own
    headers, metadata and block size)."""
    fmt = qemu_format(image)
    raw = raw_image(image, tmp / f"{image.name}.edit.raw", fmt)
    change(raw)
    subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", fmt, str(raw), str(image)], check=True,
                   capture_output=True)
    raw.unlink()


def replace_volume(raw: Path, volume: Path) -> None:
    with open(raw, "r+b") as f:
        f.seek(START * SECTOR)
        f.write(volume.read_bytes())


@pytest.mark.parametrize("name", DISKS)
def test_copy_in_adds_makes_folders_and_replaces(name, real, cli, tmp_path):
    image = disk_copy(real, name, tmp_path)
    local = tmp_path / "local"
    local.mkdir()
    notes, big = local / "notes.txt", local / "big.bin"
    first, bigdata, second = b"first\r\n", os.urandom(2 * 1024 * 1024 + 77), b"second, longer version\r\n" * 2000
    steps = [  # (local files, their content now, GUESTDIR, expected changes, paths new to the volume)
        ([notes], [first], "/", [("/notes.txt", "add")], {"/notes.txt"}),
        ([big], [bigdata], "\\New Folder\\sub",
         [("/New Folder/sub", "mkdir"), ("/New Folder/sub/big.bin", "add")],
         {"/New Folder", "/New Folder/sub", "/New Folder/sub/big.bin"}),
        ([notes], [second], "/", [("/notes.txt", "replace")], set()),
    ]
    prev = look(image, tmp_path)
    assert prev["table"]["partitions"][0]["start"] == START and prev["table"]["partitions"][0]["size"] == SECTORS
    for files, contents, folder, changes, new in steps:
        for f, data in zip(files, contents):
            f.write_bytes(data)
        code, out, err = cli("copy-in", "--json", "--partition", "1", image, *files, folder)
        assert code == 0, err
        doc = json.loads(out)
        assert doc["committed"] and doc["bytes_written"] > 0
        assert [(c["path"], c["action"], c["partition"]) for c in doc["changes"]["files"]] == [
            (p, a, 1) for p, a in changes]
        container_ok(image)
        now = look(image, tmp_path)
        assert now["table"] == prev["table"] and now["outside"] == prev["outside"]
        guest_dir = "/" + folder.replace("\\", "/").strip("/")
        for f, data in zip(files, contents):
            target = f"{guest_dir.rstrip('/')}/{f.name}"
            assert ntfscat(now["part"], target) == data, target
            assert f.name in listing(now["part"], guest_dir)
        assert set(now["tree"]) - set(prev["tree"]) == new
        written = {p for p, a in changes if a != "mkdir"}
        for path, h in prev["tree"].items():
            if path not in CHANGING_SYSTEM_FILES and path not in written:
                assert now["tree"][path] == h, path
        # The same copy again changes nothing: not one byte written.
        before = digest(image)
        code, out, err = cli("copy-in", "--json", "--partition", "1", image, *files, folder)
        assert code == 0, err
        doc = json.loads(out)
        assert doc["changes"]["files"] == [] and not doc["committed"] and doc["bytes_written"] == 0
        assert digest(image) == before
        prev = now
    assert listing(prev["part"], "/") >= {"notes.txt", "New Folder"}


@pytest.mark.parametrize("name", DISKS)
def test_copy_in_through_output_leaves_the_original_alone(name, real, cli, tmp_path):
    image = disk_copy(real, name, tmp_path)
    original = digest(image)
    local = tmp_path / "report.csv"
    local.write_bytes(os.urandom(300_000))
    new = tmp_path / f"copy{image.suffix}"
    code, out, err = cli("copy-in", "--json", "--partition", "1", "--output", new, image, local, "/Reports")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["output"] == str(new) and doc["committed"]
    assert digest(image) == original
    container_ok(new)
    after = look(new, tmp_path)
    assert ntfscat(after["part"], "/Reports/report.csv") == local.read_bytes()
    before = look(image, tmp_path)
    assert set(after["tree"]) - set(before["tree"]) == {"/Reports", "/Reports/report.csv"}
    assert after["table"] == before["table"] and after["outside"] == before["outside"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".vhdtool-tmp")]


@pytest.mark.parametrize("name", DISKS)
def test_without_partition_the_error_asks_for_it(name, real, cli, tmp_path):
    image = disk_copy(real, name, tmp_path)
    local = tmp_path / "x.txt"
    local.write_bytes(b"x")
    before = digest(image)
    for args in ((), ("--output", tmp_path / f"out{image.suffix}"), ("--dry-run",)):
        code, out, err = cli("copy-in", *args, image, local, "/Data")
        assert_one_line_error(code, out, err, image)
        assert code == 9 and "no operating system" in err and "--partition N" in err, err
    assert digest(image) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("out") or p.name.endswith(".vhdtool-tmp")]


def set_ntfs_dirty_bit(volume: Path) -> None:
    from test_copy_in import set_ntfs_dirty_bit as surgery

    surgery(volume)
    # ntfs-3g's own tools now refuse the volume as one Windows did not shut down cleanly.
    judged = subprocess.run(["ntfsinfo", "-m", str(volume)], capture_output=True, text=True)
    assert judged.returncode != 0 and "chkdsk" in judged.stdout + judged.stderr


def put_hiberfil(volume: Path) -> None:
    """hiberfil.sys as a hibernated Windows leaves it (signature "hibr"), written by ntfs-3g's ntfscp."""
    page = volume.with_name("hiberfil.sys")
    page.write_bytes(b"hibr" + bytes(4092))
    sh("ntfscp", "-f", volume, page, "/hiberfil.sys")
    assert ntfscat(volume, "/hiberfil.sys")[:4] == b"hibr"


@pytest.mark.parametrize("name", DISKS)
@pytest.mark.parametrize("surgery,code,needle", [(set_ntfs_dirty_bit, 18, "not shut down cleanly"),
                                                 (put_hiberfil, 18, "hibernated")])
def test_an_unsafe_volume_is_refused(name, surgery, code, needle, real, cli, tmp_path):
    image = disk_copy(real, name, tmp_path)

    def change(raw: Path) -> None:
        volume = extract_partition(raw, 1, tmp_path / "volume")
        surgery(volume)
        replace_volume(raw, volume)

    put_back(image, tmp_path, change)
    local = tmp_path / "x.txt"
    local.write_bytes(b"x")
    before = digest(image)
    result = cli("copy-in", "--partition", "1", image, local, "/Data")
    assert_one_line_error(*result, image)
    assert result[0] == code and needle in result[2] and "partition 1" in result[2], result[2]
    assert digest(image) == before


def add_second_partition(kind: str):
    """A change that adds MBR partition 2 in the free space after the NTFS one (sfdisk), holding an ext4
    made by mkfs.ext4, or nothing at all under an NTFS type id."""

    def change(raw: Path) -> None:
        start, size = START + SECTORS, 6016
        assert (start + size) * SECTOR <= raw.stat().st_size
        ptype = "83" if kind == "ext4" else "7"
        subprocess.run(["sfdisk", "--append", "--no-reread", "--no-tell-kernel", str(raw)],
                       input=f"start={start}, size={size}, type={ptype}\n", text=True, check=True, capture_output=True)
        if kind == "ext4":
            fs = raw.with_name("ext4.img")
            with open(fs, "wb") as f:
                f.truncate(size * SECTOR)
            sh("mkfs.ext4", "-q", "-F", fs)
            with open(raw, "r+b") as f:
                f.seek(start * SECTOR)
                f.write(fs.read_bytes())

    return change


@pytest.mark.parametrize("name", ["vhdx/dynamic.vhdx.gz", "vhd/fixed.vhd.gz"])
@pytest.mark.parametrize("partition,second,needle", [
    ("2", None, "no partition 2"),
    ("2", "nothing", "partition 2 holds no NTFS volume"),
    ("0", None, "no partition 0"),
])
def test_a_partition_that_is_missing_or_not_ntfs_is_refused(name, partition, second, needle, real, cli, tmp_path):
    image = disk_copy(real, name, tmp_path)
    if second:
        put_back(image, tmp_path, add_second_partition(second))
        code, out, err = cli("inspect", "--json", image)
        assert code == 0, err
        doc = json.loads(out)
        assert [p["filesystem"] for p in doc["partitions"]] == ["ntfs", "ext4" if second == "ext4" else None]
        assert doc["guest"] == NO_GUEST
    local = tmp_path / "x.txt"
    local.write_bytes(b"x")
    before = digest(image)
    result = cli("copy-in", "--partition", partition, image, local, "/Data")
    assert_one_line_error(*result, image)
    assert result[0] == 5 and needle in result[2], result[2]
    assert digest(image) == before


@pytest.mark.parametrize("name", ["vhdx/dynamic.vhdx.gz", "vhd/fixed.vhd.gz"])
def test_copy_in_writes_an_ext4_data_partition(name, real, cli, tmp_path):
    """An ext4 partition of a data disk is written too (libext2fs): debugfs reads the file back and
    e2fsck finds the volume clean; the NTFS partition beside it is untouched."""
    image = disk_copy(real, name, tmp_path)
    put_back(image, tmp_path, add_second_partition("ext4"))
    raw_before = raw_image(image, tmp_path / "before.raw", qemu_format(image))
    ntfs_before = hashlib.sha256(extract_partition(raw_before, 1, tmp_path / "p1-before").read_bytes()).hexdigest()
    local = tmp_path / "x.txt"
    local.write_bytes(b"hello ext4\n")
    code, out, err = cli("copy-in", "--partition", "2", image, local, "/Data")
    assert code == 0, err
    raw = raw_image(image, tmp_path / "after.raw", qemu_format(image))
    volume = extract_partition(raw, 2, tmp_path / "p2")
    assert sh("debugfs", "-R", "cat /Data/x.txt", volume).stdout == b"hello ext4\n"
    fsck = subprocess.run(["e2fsck", "-fn", str(volume)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert hashlib.sha256(extract_partition(raw, 1, tmp_path / "p1").read_bytes()).hexdigest() == ntfs_before


@pytest.mark.parametrize("name", DISKS)
def test_inspect_reports_the_disk_and_no_operating_system(name, real, cli, tmp_path):
    image = disk_copy(real, name, tmp_path)
    before = digest(image)
    raw = raw_image(image, tmp_path / "disk.raw", qemu_format(image))
    (judged,) = partition_table(raw)["partitions"]
    assert raw.stat().st_size == VIRTUAL_SIZE
    code, out, err = cli("inspect", "--json", image)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["schema"] == 1 and doc["guest"] == NO_GUEST and doc["warnings"] == []
    assert doc["image"]["format"] == ("vhdx" if image.suffix == ".vhdx" else "vhd")
    assert doc["image"]["virtual_size"] == VIRTUAL_SIZE
    (p,) = doc["partitions"]
    assert (p["index"], p["table"], p["filesystem"]) == (1, "mbr", "ntfs")
    assert (judged["start"], judged["size"]) == (START, SECTORS)
    assert (p["offset"], p["size"]) == (judged["start"] * SECTOR, judged["size"] * SECTOR)
    assert int(p["type"], 16) == int(judged["type"], 16) == 0x07
    code, out, err = cli("inspect", image)
    assert code == 0, err
    assert "no operating system" in out and "partition 1" in out
    (line,) = [line for line in out.splitlines() if line.strip().startswith("part ")]
    assert line.split()[1] == "1" and "64.0 KiB" in line and "7.0 MiB" in line and line.endswith("ntfs")
    assert digest(image) == before


@pytest.mark.parametrize("name", DISKS)
def test_what_needs_a_guest_exits_9(name, real, cli, tmp_path):
    image = disk_copy(real, name, tmp_path)
    before = digest(image)
    out_copy = tmp_path / f"staged{image.suffix}"
    for args in (("plan", "--host", "win10"), ("plan", "--host", "auto"), ("stage", "--host", "win8"),
                 ("stage", "--host", "win8", "--output", out_copy), ("stage", "--host", "win8", "--dry-run"),
                 ("services",), ("services", "--disable", "vmicheartbeat"), ("status",)):
        code, out, err = cli(*args, image)
        assert_one_line_error(code, out, err, image)
        assert code == 9 and "no operating system" in err, (args, err)
    assert digest(image) == before
    assert not out_copy.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".vhdtool-tmp")]


def test_batch_inspect_records_ok_and_batch_stage_records_9(real, tmp_path):
    work = tmp_path / "disks"
    work.mkdir()
    images = [disk_copy(real, name, work) for name in DISKS]
    digests = {p.name: digest(p) for p in images}

    def batch(*args) -> list[dict]:
        report = tmp_path / f"{args[0]}.jsonl"
        subprocess.run([sys.executable, "-m", "vhdtool.cli.main", "batch", *args, f"{work}/*", "--jobs", "2",
                        "--report", str(report)], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
        return [json.loads(line) for line in report.read_text().splitlines() if line.strip()]

    inspected = batch("inspect")
    assert sorted(Path(r["image"]).name for r in inspected) == sorted(digests)
    for r in inspected:
        assert r["outcome"] == "ok" and r["exit_code"] == 0, r
        assert r["result"]["guest"] == NO_GUEST and [p["filesystem"] for p in r["result"]["partitions"]] == ["ntfs"]
    staged = batch("stage", "--host", "win8")
    assert sorted(Path(r["image"]).name for r in staged) == sorted(digests)
    for r in staged:
        assert r["outcome"] == "failed" and r["exit_code"] == 9 and "no operating system" in r["error"]["message"], r
    assert {p.name: digest(p) for p in images} == digests
