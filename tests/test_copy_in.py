"""`vhdtool copy-in` on fixture images, judged by tools other than vhdtool.

After each write: `qemu-img check` finds no errors; qemu-img's raw conversion,
cut at the partition sfdisk reports, gives ntfs-3g's ntfscat each copied file
byte for byte; dissect.ntfs hashes every other file of the volume (the system
files NTFS changes when files are added excepted, but $LogFile included: a clean
$LogFile must not be reset) and finds them as they were; the partition table is
unchanged. Refusals leave the image byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import ROOT, assert_one_line_error, held_by_qemu, run_cli
from conftest import SWEEPS, sweep_count, sweep_points
from fixtures import build as fb
from judges.disks import vhdi_chain_read
from judges.volumes import extract_partition, ntfs_tree, ntfscat, partition_table, raw_image

pytestmark = pytest.mark.fixtures
# What adding files changes besides the files: the MFT (and its mirror), the cluster
# bitmap, the security descriptors stream, and the folders that gain entries.
CHANGING_SYSTEM_FILES = {"/$MFT", "/$MFTMirr", "/$Bitmap", "/$Secure"}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def volume_of(image: Path, tmp: Path, number: int, fmt: str | None = None) -> tuple[Path, dict]:
    raw = raw_image(image, tmp / f"{image.name}.{time.monotonic_ns()}.raw", fmt)
    table = partition_table(raw)
    part = extract_partition(raw, number, tmp / f"{raw.name}.p{number}")
    raw.unlink()
    return part, table


def qemu_check(image: Path) -> None:
    if image.suffix != ".vhdx":
        return  # qemu-img checks no VHD (vpc) images; its raw conversion judges them below
    res = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
    assert res.returncode == 0 and "No errors were found" in res.stdout, res.stdout + res.stderr


def work_copy(name: str, tmp: Path) -> Path:
    src = fb.build(name)
    dst = tmp / Path(src).name
    shutil.copyfile(src, dst)
    return dst


@pytest.fixture
def payload(tmp_path):
    files = {
        "big.bin": os.urandom(3 * 1024 * 1024 + 123),
        "small.txt": b"integration services\r\n",
        "empty.dat": b"",
    }
    paths = []
    for name, data in files.items():
        p = tmp_path / "local" / name
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(data)
        paths.append(p)
    return files, paths


@pytest.mark.parametrize("name,part", [("ws2008r2-x64", 2), ("ws2008r2-x64-fixed", 2), ("win10-gpt", 3),
                                       ("ws2008r2-x64-vhd", 2), ("ws2008r2-x64-fixed-vhd", 2)])
def test_copy_in_is_judged_correct(name, part, cli, payload, tmp_path):
    files, paths = payload
    image = work_copy(name, tmp_path)
    before_part, before_table = volume_of(image, tmp_path, part)
    before = ntfs_tree(before_part)
    code, out, err = cli("copy-in", "--json", image, *paths, "C:\\Windows\\Temp\\vhdtool drop")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["committed"] and not doc["dry_run"] and doc["bytes_written"] > 0
    assert [(f["path"], f["action"]) for f in doc["changes"]["files"]] == [
        ("/Windows/Temp/vhdtool drop", "mkdir")] + [(f"/Windows/Temp/vhdtool drop/{n}", "add") for n in files]
    qemu_check(image)
    after_part, after_table = volume_of(image, tmp_path, part)
    assert after_table == before_table
    for n, data in files.items():
        assert ntfscat(after_part, f"/Windows/Temp/vhdtool drop/{n}") == data
    after = ntfs_tree(after_part)
    added = {"/Windows/Temp/vhdtool drop"} | {f"/Windows/Temp/vhdtool drop/{n}" for n in files}
    assert set(after) - set(before) == added
    for path, h in before.items():
        if path not in CHANGING_SYSTEM_FILES:
            assert after[path] == h, path
    # The same copy again changes nothing: no write at all.
    again = digest(image)
    code, out, err = cli("copy-in", "--json", image, *paths, "/Windows/Temp/vhdtool drop")
    assert code == 0 and json.loads(out)["changes"]["files"] == [] and not json.loads(out)["committed"]
    assert digest(image) == again


def test_replacing_a_file_and_vhdtool_reads_it_back(cli, tmp_path):
    import vhdtool

    image = work_copy("ws2008r2-x64", tmp_path)
    local = tmp_path / "notes.txt"
    for text in (b"first\r\n", b"second, longer version\r\n" * 50):
        local.write_bytes(text)
        code, out, err = cli("copy-in", image, local, "/Windows/Temp")
        assert code == 0, err
        from vhdtool.filesystem import NtfsFilesystem
        from vhdtool.volume import list_partitions, open_partition

        with vhdtool.open_disk(image) as disk:
            p = list_partitions(disk, 512, str(image))[1]
            assert NtfsFilesystem(open_partition(disk, p)).read("/Windows/Temp/notes.txt") == text
    assert "replace" in out


def test_dry_run_and_output_leave_the_image_alone(cli, payload, tmp_path):
    files, paths = payload
    image = work_copy("ws2008r2-x64", tmp_path)
    original = digest(image)
    code, out, err = cli("copy-in", "--json", "--dry-run", image, *paths, "/Windows/Temp")
    doc = json.loads(out)
    assert code == 0 and doc["dry_run"] and not doc["committed"] and len(doc["changes"]["files"]) == 3
    assert digest(image) == original
    new = tmp_path / "changed.vhdx"
    code, out, err = cli("copy-in", "--json", "--output", new, image, *paths, "/Windows/Temp")
    assert code == 0, err
    assert json.loads(out)["output"] == str(new)
    assert digest(image) == original
    qemu_check(new)
    part, _ = volume_of(new, tmp_path, 2)
    assert ntfscat(part, "/Windows/Temp/big.bin") == files["big.bin"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".vhdtool-tmp")]
    # An existing output is never overwritten.
    code, out, err = cli("copy-in", "--output", new, image, *paths, "/Windows/Temp")
    assert code != 0 and "exists" in err


def test_data_volume_by_partition(cli, tmp_path):
    # ws2008r2-x64's partition 1 is the System Reserved volume: NTFS without Windows on it.
    image = work_copy("ws2008r2-x64", tmp_path)
    local = tmp_path / "data.bin"
    local.write_bytes(os.urandom(200_000))
    code, out, err = cli("copy-in", "--partition", "1", image, local, "/Data/In")
    assert code == 0, err
    part, _ = volume_of(image, tmp_path, 1)
    assert ntfscat(part, "/Data/In/data.bin") == local.read_bytes()


@pytest.mark.parametrize(
    "name,args,code,needle",
    [
        ("ws2008r2-hibernated", (), 18, "hibernated"),
        ("rhel-xfs", (), 5, "writes ext2/3/4 and NTFS volumes only"),
        ("bitlocker", ("--partition", "1"), 8, "BitLocker"),
        ("ws2008r2-x64", ("--partition", "9"), 5, "no partition 9"),
    ],
)
def test_refusals_leave_the_image_byte_identical(cli, tmp_path, name, args, code, needle):
    image = work_copy(name, tmp_path)
    local = tmp_path / "x.txt"
    local.write_bytes(b"x")
    before = digest(image)
    result = cli("copy-in", *args, image, local, "/Windows/Temp")
    assert_one_line_error(*result, image)
    assert result[0] == code and needle in result[2], result[2]
    assert digest(image) == before


def test_refused_when_a_differencing_disk_depends_on_it(cli, tmp_path):
    import vhdx_craft as vc

    image = work_copy("ws2008r2-x64", tmp_path)
    vc.make_differencing(image, tmp_path / "child.avhdx", {}, relative_path=f".\\{image.name}")
    local = tmp_path / "x.txt"
    local.write_bytes(b"x")
    before = digest(image)
    result = cli("copy-in", image, local, "/Windows/Temp")
    assert_one_line_error(*result, image)
    assert result[0] == 19 and "child.avhdx" in result[2]
    assert digest(image) == before
    # Written through the child instead, the parent stays as it was.
    code, out, err = cli("copy-in", tmp_path / "child.avhdx", local, "/Windows/Temp")
    assert code == 0, err
    assert digest(image) == before


def test_refused_while_qemu_holds_the_image(cli, tmp_path):
    image = work_copy("ws2008r2-x64", tmp_path)
    local = tmp_path / "x.txt"
    local.write_bytes(b"x")
    before = digest(image)
    with held_by_qemu(image, "vhdx"):
        result = cli("copy-in", image, local, "/Windows/Temp")
    assert_one_line_error(*result, image)
    assert result[0] == 16
    assert digest(image) == before


# -- crash safety of the command ---------------------------------------------------------------------

def run_copy_in(image: Path, local: Path, inject: str | None = None, count: Path | None = None):
    cmd = [sys.executable, "-m", "vhdtool.cli.main", "copy-in", str(image), str(local), "/Windows/Temp/crash"]
    if inject:
        cmd = ["strace", "-f", "-o", "/dev/null", "-e", f"inject={inject}"] + cmd
    elif count:
        cmd = ["strace", "-f", "-o", str(count), "-e", "trace=pwrite64,fsync,ftruncate"] + cmd
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)


RANDOM_KILLS = int(os.environ.get("VHDTOOL_RANDOM_KILLS", "30"))


@pytest.mark.parametrize("sweep", SWEEPS)
def test_kill_copy_in_at_every_write_and_flush(sweep, tmp_path):
    original = work_copy("ws2008r2-x64", tmp_path)
    local = tmp_path / "payload.bin"
    local.write_bytes(os.urandom(1_500_000))
    probe = tmp_path / "probe.vhdx"
    shutil.copyfile(original, probe)
    trace = tmp_path / "trace"
    assert run_copy_in(probe, local, count=trace).returncode == 0
    shutil.copyfile(original, probe)
    t0 = time.monotonic()
    assert run_copy_in(probe, local).returncode == 0
    duration = time.monotonic() - t0
    counts = {n: sum(1 for line in trace.read_text().splitlines() if f" {n}(" in line or line.startswith(f"{n}("))
              for n in ("pwrite64", "fsync", "ftruncate")}
    points = [(n, k) for n, total in counts.items() for k in range(1, total + 1)]
    assert len(points) >= 10, counts
    old_part, _ = volume_of(original, tmp_path, 2)
    old_tree = ntfs_tree(old_part)
    outcomes = {"old": 0, "new": 0}
    victim = tmp_path / "victim.vhdx"
    rnd = __import__("random").Random(7)
    # Every write and flush, then random times spread over the whole run (the commit is its last part).
    points = sweep_points(points, sweep)
    kills = [("syscall", p) for p in points] + [("time", rnd.uniform(0.5, 1.0) * duration)
                                                for _ in range(sweep_count(RANDOM_KILLS, sweep))]
    for how, point in kills:
        shutil.copyfile(original, victim)
        if how == "syscall":
            name, k = point
            res = run_copy_in(victim, local, inject=f"{name}:signal=KILL:when={k}")
            assert res.returncode != 0, point
        else:
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            proc = subprocess.Popen([sys.executable, "-m", "vhdtool.cli.main", "copy-in", str(victim), str(local),
                                     "/Windows/Temp/crash"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
            time.sleep(point)
            proc.kill()
            proc.wait()
        name, k = how, point
        repaired = tmp_path / "repaired.vhdx"
        shutil.copyfile(victim, repaired)
        subprocess.run(["qemu-img", "check", "-r", "all", str(repaired)], check=True, capture_output=True)
        qemu_check(repaired)
        part, _ = volume_of(repaired, tmp_path, 2)
        tree = ntfs_tree(part)
        if "/Windows/Temp/crash/payload.bin" in tree:
            assert ntfscat(part, "/Windows/Temp/crash/payload.bin") == local.read_bytes(), (name, k)
            outcomes["new"] += 1
        else:
            assert tree == old_tree, (name, k)
            outcomes["old"] += 1
        subprocess.run(["ntfsfix", "-n", str(part)], check=True, capture_output=True)
        part.unlink()
    assert outcomes["old"] and outcomes["new"], outcomes
    print(f"\ncopy-in: {len(points)} syscall kill points {counts}, {len(kills) - len(points)} random kills, outcomes {outcomes}")


def test_new_files_and_folders_inherit_the_parents_acl_as_windows_does(cli, tmp_path):
    """MS-DTYP 2.4.4.1: a file gets each ACE its folder marks OBJECT_INHERIT, a folder each ACE marked
    CONTAINER_INHERIT (keeping the inheritance flags, to pass them on), both with INHERITED_ACE set."""
    from judges.volumes import dacl_aces, security_descriptor

    image = work_copy("ws2008r2-x64", tmp_path)
    local = tmp_path / "acl.txt"
    local.write_bytes(b"acl")
    code, out, err = cli("copy-in", image, local, "/Windows/Temp/acl test")
    assert code == 0, err
    part, _ = volume_of(image, tmp_path, 2)
    parent = dacl_aces(security_descriptor(part, "/Windows/Temp"))
    folder = dacl_aces(security_descriptor(part, "/Windows/Temp/acl test"))
    file = dacl_aces(security_descriptor(part, "/Windows/Temp/acl test/acl.txt"))
    OI, CI, NP, INHERITED = 0x01, 0x02, 0x04, 0x10
    # The fixture's folders carry ACEs inherited by both files and folders (OI|CI).
    assert parent and all(f & (OI | CI) == OI | CI for _k, f, _b in parent)
    assert folder == [(k, (f & (OI | CI)) | INHERITED, b) for k, f, b in parent if f & CI and not f & NP]
    assert file == [(k, INHERITED, b) for k, f, b in parent if f & OI]


def set_ntfs_dirty_bit(volume: Path) -> None:
    """Set VOLUME_IS_DIRTY in $Volume's VOLUME_INFORMATION (MFT record 3), as Windows does while mounted.

    Test-side surgery from the NTFS format: the boot sector gives the cluster size and
    the MFT's first cluster; record 3 lies in the MFT's first extent; the attribute
    (type 0x70) is resident and near the record's start, clear of the update
    sequence fix-ups at the end of each 512-byte sector.
    """
    import struct

    buf = bytearray(volume.read_bytes())
    sector, spc = struct.unpack_from("<HB", buf, 11)
    cluster = sector * (spc if spc < 0x80 else 1 << (256 - spc))
    (mft_lcn,) = struct.unpack_from("<Q", buf, 48)
    (raw_size,) = struct.unpack_from("<b", buf, 64)
    record_size = raw_size * cluster if raw_size > 0 else 1 << -raw_size
    record = mft_lcn * cluster + 3 * record_size
    assert buf[record : record + 4] == b"FILE"
    pos = record + struct.unpack_from("<H", buf, record + 20)[0]
    while True:
        kind, length = struct.unpack_from("<II", buf, pos)
        assert kind != 0xFFFFFFFF and length, "no VOLUME_INFORMATION attribute"
        if kind == 0x70:
            value = pos + struct.unpack_from("<H", buf, pos + 20)[0]
            assert (value + 12 - record) % 512 < 510
            flags = struct.unpack_from("<H", buf, value + 10)[0]
            struct.pack_into("<H", buf, value + 10, flags | 0x0001)
            break
        pos += length
    volume.write_bytes(bytes(buf))


def test_refused_when_the_ntfs_volume_was_not_shut_down_cleanly(cli, tmp_path):
    image = work_copy("ws2008r2-x64", tmp_path)
    raw = raw_image(image, tmp_path / "disk.raw")
    part = extract_partition(raw, 2, tmp_path / "part.img")
    set_ntfs_dirty_bit(part)
    # ntfs-3g's own tools now refuse the volume as one Windows did not shut down cleanly.
    judged = subprocess.run(["ntfsinfo", "-m", str(part)], capture_output=True, text=True)
    assert judged.returncode != 0 and "chkdsk" in judged.stdout + judged.stderr
    start = partition_table(raw)["partitions"][1]["start"] * 512
    with open(raw, "r+b") as f:
        f.seek(start)
        f.write(part.read_bytes())
    dirty = tmp_path / "dirty.vhdx"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vhdx", "-o", "subformat=dynamic", str(raw), str(dirty)],
                   check=True)
    local = tmp_path / "x.txt"
    local.write_bytes(b"x")
    before = digest(dirty)
    result = cli("copy-in", dirty, local, "/Windows/Temp")
    assert_one_line_error(*result, dirty)
    assert result[0] == 18 and "shut it down cleanly" in result[2]
    assert digest(dirty) == before


def test_refused_when_the_image_file_is_read_only(tmp_path):
    """Run as an unprivileged user (root writes any file) on an image it may read but not write."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="vhdtool-ro-"))
    try:
        os.chmod(folder, 0o755)
        image = folder / "ro.vhdx"
        shutil.copyfile(fb.build("ws2008r2-x64"), image)
        os.chmod(image, 0o644)
        local = folder / "x.txt"
        local.write_bytes(b"x")
        os.chmod(local, 0o644)
        before = digest(image)
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "vhdtool.cli.main",
               "copy-in", str(image), str(local), "/Windows/Temp"]
        res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        if "Permission denied" in res.stderr and "vhdtool" not in res.stderr:
            pytest.skip("the unprivileged user cannot run this checkout's Python")
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 17 and len(lines) == 1 and str(image) in lines[0], res.stderr
        assert digest(image) == before
        # --output still works from a read-only image.
        out = folder / "out"
        out.mkdir()
        os.chmod(out, 0o777)
        res = subprocess.run(cmd[:-3] + ["--output", str(out / "new.vhdx")] + cmd[-3:], capture_output=True, text=True,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert res.returncode == 0, res.stderr
        assert digest(image) == before
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_copy_in_through_a_differencing_child(cli, tmp_path):
    """The child gets the change (partially present blocks); the parent is never written. libvhdi,
    which reads differencing VHDX (qemu does not), reads the chain for ntfs-3g to judge."""
    import vhdx_craft as vc

    parent = work_copy("ws2008r2-x64", tmp_path)
    child = tmp_path / "child.avhdx"
    vc.make_differencing(parent, child, {}, relative_path=f".\\{parent.name}", block_size=2 * 1024 * 1024)
    parent_before = digest(parent)
    local = tmp_path / "diff.bin"
    local.write_bytes(os.urandom(700_000))
    code, out, err = cli("copy-in", child, local, "/Windows/Temp/child")
    assert code == 0, err
    assert digest(parent) == parent_before
    raw = tmp_path / "chain.raw"
    raw.write_bytes(vhdi_chain_read(child, parent, 0))
    part = extract_partition(raw, 2, tmp_path / "chain.p2")
    assert ntfscat(part, "/Windows/Temp/child/diff.bin") == local.read_bytes()
    subprocess.run(["ntfsfix", "-n", str(part)], check=True, capture_output=True)


def test_a_missing_libntfs3g_names_its_package(tmp_path, monkeypatch):
    from vhdtool.filesystem import ntfs3g

    image = tmp_path / "disk.vhdx"
    shutil.copyfile(fb.build("ws2008r2-x64"), image)
    before = image.read_bytes()
    monkeypatch.setattr(ntfs3g, "LIBRARY", replace(ntfs3g.LIBRARY, soname="libntfs-3g-not-installed.so.89"))
    monkeypatch.setattr(ntfs3g, "_library", None, raising=False)
    local = tmp_path / "hello.txt"
    local.write_text("hi")
    code, out, err = run_cli("copy-in", str(image), str(local), "C:\\Windows\\Temp")
    assert code == 14 and "ntfs-3g" in err and str(image) in err, err
    assert image.read_bytes() == before
