"""`vhdtool stage` of large cabs: the cab stays in its file (or its ISO), never in vhdtool's memory.

The guest is the ws2008r2-x64 fixture's (same hives, same update.mum for it), on a disk
large enough for a cab of several hundred MiB. The cabs are made by gcab (update.mum
first, a stored random payload after it), the ISOs by genisoimage. Judges: qemu-img
(check for VHDX, a raw conversion of the partition for both containers), ntfs-3g's
ntfscat (the staged cab's SHA-256 equals the cab's), isoinfo (a cab's bytes inside an
ISO), and the kernel's account of the vhdtool process tree's peak resident memory
(wait4's ru_maxrss: the largest process of the tree, the sandbox children included).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import ROOT, assert_one_line_error
from fixtures.cabs import CabSpec, build_cab, build_iso

pytestmark = pytest.mark.fixtures
MiB = 1024 * 1024
WIN8_IC = "6.2.9200.16384"
SPEC = CabSpec("6.1", "x64", WIN8_IC)  # what a Windows 8 host offers a Server 2008 R2 guest
DISK_SIZE = 1100 * MiB
SYSTEM_START, SYSTEM_SIZE = 17 * MiB, DISK_SIZE - 18 * MiB
STAGED = f"/Windows/vhdtool/{WIN8_IC}-x64/{SPEC.name}"
OLD_CAP = 512 * MiB  # the cab size limit before streaming


# -- the guest, and measuring a run -------------------------------------------------------------

def _layout(populate):
    from fixtures.build.disks import Part, mbr_layout, ntfs_fill
    from fixtures.build.windows import WS2008R2_SIGNATURE
    from fixtures.build.windows_guest import system_reserved

    return mbr_layout(
        DISK_SIZE, WS2008R2_SIGNATURE,
        Part(start=1 * MiB, size=16 * MiB, filesystem="ntfs", bootable=True,
             fill=ntfs_fill("System Reserved", system_reserved)),
        Part(start=SYSTEM_START, size=SYSTEM_SIZE, filesystem="ntfs", fill=ntfs_fill("", populate)),
    )


@pytest.fixture(scope="module")
def guests(tmp_path_factory) -> dict[str, Path]:
    """The ws2008r2-x64 guest on a 1.1 GiB disk, as a dynamic VHDX and a dynamic VHD (built by the
    fixture builder's own steps, with a larger C:)."""
    from fixtures.build.windows import WS2008R2
    from fixtures.build.windows_guest import windows_builder

    root = tmp_path_factory.mktemp("large-guest")
    (root / "work").mkdir()
    raw = windows_builder(WS2008R2, _layout, 2)(root / "work")
    out = {"vhdx": root / "ws2008r2-x64-large.vhdx", "vhd": root / "ws2008r2-x64-large-vhd.vhd"}
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "vhdx", "-o", "subformat=dynamic", raw,
                    out["vhdx"]], check=True)
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "vpc", "-o", "subformat=dynamic,force_size=on",
                    raw, out["vhd"]], check=True)
    raw.unlink()
    return out


def copy_of(guests: dict[str, Path], kind: str, tmp: Path) -> Path:
    dst = tmp / guests[kind].name
    subprocess.run(["cp", "--sparse=always", guests[kind], dst], check=True)
    return dst


def run_measured(*args: str, tmpdir: Path | None = None) -> tuple[int, str, str, int]:
    """Run vhdtool as a child process: (exit code, stdout, stderr, peak resident bytes of its tree)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-m", "vhdtool.cli.main", *args], stdout=out, stderr=err, env=env)
        _pid, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = code = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        out.seek(0)
        err.seek(0)
        return code, out.read().decode(), err.read().decode(), usage.ru_maxrss * 1024


def stage(image: Path, cabs: Path, tmpdir: Path | None = None) -> tuple[dict, int]:
    code, out, err, peak = run_measured("stage", "--json", str(image), "--host", "win8", "--cabs", str(cabs),
                                        tmpdir=tmpdir)
    assert code == 0, err
    return json.loads(out), peak


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


def staged_sha256(image: Path, tmp: Path, fmt: str) -> str:
    """The staged cab's SHA-256 as ntfscat reads it from C:, which qemu-img converts out of the image."""
    part = tmp / "system.ntfs"
    opts = (f"driver=raw,offset={SYSTEM_START},size={SYSTEM_SIZE},file.driver={fmt},"
            f"file.file.driver=file,file.file.filename={image}")
    subprocess.run(["qemu-img", "convert", "-O", "raw", "--image-opts", opts, part], check=True, capture_output=True)
    try:
        cat = subprocess.Popen(["ntfscat", "-f", part, STAGED], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        h = hashlib.sha256()
        while chunk := cat.stdout.read(8 * MiB):
            h.update(chunk)
        assert cat.wait() == 0
        return h.hexdigest()
    finally:
        part.unlink()


def judge(image: Path, kind: str, tmp: Path, cab_sha256: str) -> None:
    if kind == "vhdx":
        check = subprocess.run(["qemu-img", "check", image], capture_output=True, text=True)
        assert check.returncode == 0 and "No errors were found" in check.stdout, check.stdout + check.stderr
    assert staged_sha256(image, tmp, "vhdx" if kind == "vhdx" else "vpc") == cab_sha256


# -- the default run: a medium cab ------------------------------------------------------------------

def test_a_60_mib_cab_is_staged_without_holding_it(guests, tmp_path):
    # 60 MiB and a few KiB: one mapping window of the child, ending inside a cluster (as a cab's end does).
    tiny = build_cab(SPEC, tmp_path / "tiny")
    medium = build_cab(SPEC, tmp_path / "medium", payload_size=60 * MiB)
    (tmp_path / "t").mkdir()
    doc_tiny, peak_tiny = stage(copy_of(guests, "vhdx", tmp_path / "t"), tiny.parent)
    image = copy_of(guests, "vhdx", tmp_path)
    doc, peak = stage(image, medium.parent)
    want = file_sha256(medium)
    assert doc["staged"] and doc["committed"] and doc["cab"]["sha256"] == want
    assert doc["files"][0] == {"path": STAGED, "size": medium.stat().st_size, "sha256": want}
    judge(image, "vhdx", tmp_path, want)
    # The cab's bytes do not pass through memory: 60 MiB more of cab is far less than 60 MiB more of memory.
    assert peak - peak_tiny < 24 * MiB, (peak_tiny, peak)
    assert doc_tiny["cab"]["sha256"] == file_sha256(tiny)


def test_a_cab_changed_after_planning_is_refused(tmp_path):
    # cab_source re-reads the chosen cab and checks it, a chunk at a time, against the plan's digest.
    from vhdtool.plan import sources as plan_sources

    cab = build_cab(SPEC, tmp_path / "cabs", payload_size=5 * MiB)
    catalog = plan_sources.load_sources([cab.parent])
    with open(cab, "r+b") as f:
        f.seek(cab.stat().st_size - 100)
        f.write(b"x")
    with pytest.raises(plan_sources.CabSourceError) as e:
        plan_sources.cab_source(catalog.candidates[0])
    assert "the cab changed since it was verified" in str(e.value) and e.value.exit_code == 12


def test_a_udf_iso_cab_goes_through_a_temporary_copy_that_is_removed(guests, tmp_path, monkeypatch):
    # pycdlib reads a UDF-only ISO's files through their allocation descriptors (no one extent to
    # give a range of): the cab is copied out a chunk at a time, and the copy goes with its Source.
    from vhdtool.iso import IsoImage, SpilledSource

    iso = build_iso([SPEC], tmp_path / "udf.iso", payload_size=3 * MiB, names="udf")
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    with IsoImage(iso) as image:
        (entry, raw), = image.support_cabs()
        with image.source(entry, raw, 1 << 32) as cab:
            assert isinstance(cab, SpilledSource) and Path(cab.path).parent == spool
            assert cab.size == entry.size
            spilled_sha256 = cab.sha256()
    assert list(spool.iterdir()) == []
    image = copy_of(guests, "vhdx", tmp_path)
    doc, _peak = stage(image, iso, tmpdir=spool)
    assert doc["staged"] and doc["cab"]["path"] == f"{iso}:/support/amd64/{SPEC.name}"
    assert doc["cab"]["sha256"] == spilled_sha256
    judge(image, "vhdx", tmp_path, spilled_sha256)
    assert list(spool.iterdir()) == []


def test_a_joliet_cab_is_a_range_of_the_iso(tmp_path):
    from vhdtool.container.source import Source
    from vhdtool.iso import IsoImage, SpilledSource

    iso = build_iso([SPEC], tmp_path / "vmguest.iso", payload_size=2 * MiB)
    inner = f"/support/amd64/{SPEC.name}"
    with IsoImage(iso) as image:
        (entry, raw), = image.support_cabs()
        with image.source(entry, raw, 1 << 32) as cab:
            assert type(cab) is Source and not isinstance(cab, SpilledSource)
            assert cab.path == str(iso) and cab.start % 2048 == 0 and cab.size == entry.size
            got = cab.sha256()
    judged = subprocess.run(["isoinfo", "-J", "-i", iso, "-x", inner], capture_output=True, check=True).stdout
    assert got == hashlib.sha256(judged).hexdigest() and len(judged) == entry.size


def test_a_cab_past_the_end_of_its_iso_is_refused(tmp_path, cli):
    from fixtures import build as fb

    iso = build_iso([SPEC], tmp_path / "vmguest.iso", payload_size=2 * MiB)
    from vhdtool.iso import IsoImage

    with IsoImage(iso) as image:
        (entry, raw), = image.support_cabs()
        with image.source(entry, raw, 1 << 32) as cab:
            end = cab.start + cab.size
    # Cut the file inside the cab, and shorten the volume size the primary descriptor gives to match.
    with open(iso, "r+b") as f:
        f.truncate(end - 4096)
        f.seek(16 * 2048 + 80)
        blocks = (end - 4096) // 2048
        f.write(blocks.to_bytes(4, "little") + blocks.to_bytes(4, "big"))
    code, out, err = cli("plan", str(fb.build("ws2008r2-x64")), "--host", "win8", "--cabs", str(iso))
    assert_one_line_error(code, out, err, f"{iso}:/support/amd64/{SPEC.name}")
    # pycdlib gives the record's length as far as the file goes; the cab's own header says it was cut.
    assert code == 10, err
    assert f"truncated: the header gives {entry.size} bytes, the file has {entry.size - 4096}" in err


# -- the slow runs: a cab larger than the old 512 MiB cap ------------------------------------------------

@pytest.fixture(scope="module")
def large_cab(tmp_path_factory) -> Path:
    cab = build_cab(SPEC, tmp_path_factory.mktemp("large-cab"), payload_size=600 * MiB)
    assert cab.stat().st_size > OLD_CAP
    return cab


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["vhdx", "vhd"])
def test_a_600_mib_cab_is_staged_in_little_memory(guests, large_cab, tmp_path, kind):
    image = copy_of(guests, kind, tmp_path)
    doc, peak = stage(image, large_cab.parent)
    want = file_sha256(large_cab)
    assert doc["committed"] and doc["cab"]["sha256"] == want
    assert doc["files"][0] == {"path": STAGED, "size": large_cab.stat().st_size, "sha256": want}
    judge(image, kind, tmp_path, want)
    assert peak < 300 * MiB, peak


@pytest.mark.slow
def test_a_600_mib_cab_inside_an_iso_is_staged_in_little_memory(guests, tmp_path):
    iso = build_iso([SPEC], tmp_path / "vmguest.iso", payload_size=600 * MiB)
    inner = f"/support/amd64/{SPEC.name}"
    h = hashlib.sha256()
    with subprocess.Popen(["isoinfo", "-J", "-i", iso, "-x", inner], stdout=subprocess.PIPE) as extract:
        while chunk := extract.stdout.read(8 * MiB):
            h.update(chunk)
    want = h.hexdigest()
    image = copy_of(guests, "vhdx", tmp_path)
    doc, peak = stage(image, iso)
    assert doc["committed"] and doc["cab"]["sha256"] == want and doc["cab"]["path"] == f"{iso}:{inner}"
    judge(image, "vhdx", tmp_path, want)
    assert peak < 300 * MiB, peak


@pytest.mark.slow
def test_plan_of_a_600_mib_cab_reads_only_its_headers_into_memory(large_cab):
    from fixtures import build as fb

    code, out, err, peak = run_measured("plan", "--json", str(fb.build("ws2008r2-x64")), "--host", "win8",
                                        "--cabs", str(large_cab.parent))
    assert code == 0, err
    doc = json.loads(out)
    doc = doc[0] if isinstance(doc, list) else doc
    assert doc["action"] == "stage" and doc["cab"]["sha256"] == file_sha256(large_cab)
    assert peak < 100 * MiB, peak


def test_a_digest_is_adopted_only_while_the_file_is_unchanged(tmp_path):
    # stage does not hash a cab twice in one process while its file is provably the one the plan hashed.
    from vhdtool.container.source import Source

    path = tmp_path / "a.cab"
    path.write_bytes(os.urandom(3 * MiB))
    with Source(path) as first:
        digest, fingerprint = first.sha256(), first.fingerprint()
    with Source(path) as again:
        assert again.adopt_sha256(digest, fingerprint) and again.sha256() == digest
    with Source(path, start=1) as other_range:
        assert not other_range.adopt_sha256(digest, fingerprint)
    # A write stamps the change time from the kernel's coarse clock (a few ms a tick): one in the same
    # tick as the file's last change would look unchanged, as it would to tar, rsync and the commit's check.
    time.sleep(0.05)
    with open(path, "r+b") as f:  # same size, one byte changed in place
        f.seek(MiB)
        f.write(b"\0" if path.read_bytes()[MiB] else b"\1")
    with Source(path) as changed:
        assert not changed.adopt_sha256(digest, fingerprint)
        assert changed.sha256() == file_sha256(path) != digest


def test_a_file_larger_than_any_cabinet_is_refused_unread(tmp_path, cli):
    # cbCabinet is a u32, and so is the size of an Authenticode blob after it: nothing longer is a cab.
    from fixtures import build as fb
    from vhdtool.cabinet.format import MAX_CAB_FILE_SIZE

    big = tmp_path / "cabs" / SPEC.name
    big.parent.mkdir()
    with open(big, "wb") as f:
        f.truncate(MAX_CAB_FILE_SIZE + 1)  # sparse: nothing is written
    code, out, err = cli("plan", str(fb.build("ws2008r2-x64")), "--host", "win8", "--cabs", str(big.parent))
    assert_one_line_error(code, out, err, big)
    assert code == 12 and f"larger than {MAX_CAB_FILE_SIZE} bytes" in err
