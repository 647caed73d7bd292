"""Adversarial copy-in into NTFS volumes laid out as real disks are, judged by tools we did not write.

The data disks are built here as an operator builds them (mkntfs with a chosen cluster and sector size,
sfdisk or a 4Kn MBR with a chosen first sector, ntfscp and ntfs-3g's FUSE driver for the files on them,
qemu-img convert to VHDX or VHD, tests/vhdx_craft.py for differencing and 4Kn containers), and every
written image is judged by qemu-img check, ntfs-3g's ntfscat, ntfsls and ntfsfix -n, dissect.ntfs (by
listing: its search misses names, see below), libvhdi and dissect.hypervisor where qemu cannot read.

- A partition off the 4 KiB grid (sector 63): a logged 4 KiB sector shared with a direct write.
- Free space in a hundred pieces: libntfs-3g's allocator takes a few per call (its ENOSPC is no full volume).
- Guest paths NTFS or Windows cannot take, under a file or through a junction: exit 5, not "run chkdsk".
- Names dissect.ntfs's search misses or joins (emoji, fullwidth, ß): the editor looks up as NTFS does.
- Many local files, a local file cut short during the commit, a volume with no room for new records.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import SWEEPS, assert_one_line_error, digest, run_cli, sweep_points
from judges.disks import vhdi_chain_read
from judges.volumes import extract_partition, ntfs_tree, ntfscat, partition_volume, raw_image

MiB = 1024 * 1024


def ntfs_disk(folder: Path, part_mib: int, *, cluster: int = 4096, start: int = 2048,
              opts: str = "subformat=fixed", name: str = "disk", prepare=None, fmt: str = "vhdx") -> Path:
    """A VHDX data disk of one NTFS partition of ``part_mib`` MiB at sector ``start`` (mkntfs -c ``cluster``,
    ``prepare(volume file)`` with ntfs-3g's tools, sfdisk, qemu-img convert with ``opts``)."""
    work = folder / f".{name}-build"
    work.mkdir()
    part, raw = work / "part.img", work / "raw.img"
    with open(part, "wb") as f:
        f.truncate(part_mib * MiB)
    subprocess.run(["mkntfs", "-Q", "-F", "-q", "-c", str(cluster), "-L", "Data", str(part)], check=True,
                   capture_output=True)
    if prepare is not None:
        prepare(part)
    with open(raw, "wb") as f:
        f.truncate((part_mib + 2) * MiB)
    subprocess.run(["sfdisk", "-q", str(raw)], input=f"label: dos\nstart={start}, size={part_mib * 2048}, type=7\n",
                   text=True, check=True, capture_output=True)
    subprocess.run(["dd", f"if={part}", f"of={raw}", "bs=512", f"seek={start}", "conv=notrunc,sparse",
                    "status=none"], check=True)
    out = folder / f"{name}.{'vhd' if fmt == 'vpc' else fmt}"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", fmt, "-o", opts, str(raw), str(out)], check=True)
    shutil.rmtree(work)
    return out


def payload(path: Path, size: int, seed: int) -> Path:
    import random

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def judge(image: Path, tmp: Path, guest: str, local: Path) -> None:
    """qemu-img check is clean, and ntfscat and dissect.ntfs both read ``guest`` as ``local``'s bytes."""
    res = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
    assert res.returncode == 0 and "No errors were found" in res.stdout, res.stdout + res.stderr
    raw = raw_image(image, tmp / f"{image.name}.raw")
    volume = extract_partition(raw, 1, tmp / f"{image.name}.p1")
    raw.unlink()
    try:
        want = sha(local.read_bytes())
        assert sha(ntfscat(volume, guest)) == want, "ntfscat reads other bytes than were copied in"
        from dissect.ntfs import NTFS

        with open(volume, "rb") as f:
            entry = NTFS(f).mft.root
            for name in guest.strip("/").split("/"):  # by listing (its search misses names: see below)
                entry = entry.listdir()[name].dereference()
            assert sha(entry.open().read()) == want, "dissect.ntfs reads other bytes than were copied in"
    finally:
        volume.unlink()


@pytest.mark.parametrize("start", [63, 2049])
def test_copy_in_to_a_partition_off_the_4k_grid_keeps_every_byte(start, tmp_path):
    """A partition at sector 63 (or any start that is not a multiple of 8 sectors) puts each 4 KiB
    cluster across two 4 KiB sectors of the VHDX file. The payload goes into free clusters directly
    (before the log) and the metadata beside them through the log; a logged 4 KiB sector that also
    holds part of a direct write must carry the new bytes, not the old ones it was read with."""
    image = ntfs_disk(tmp_path, 64, start=start)
    local = payload(tmp_path / "local" / "p.bin", 8 * MiB + 1234, seed=start)
    code, out, err = run_cli("copy-in", "--partition", "1", image, local, "/")
    assert code == 0, err
    judge(image, tmp_path, "/p.bin", local)


def free_bytes(volume: Path) -> int:
    """The volume's free space as ntfs-3g's ntfscluster counts it."""
    out = subprocess.run(["ntfscluster", "-f", "-i", str(volume)], capture_output=True, text=True, check=True).stdout
    return int(next(line for line in out.splitlines() if line.startswith("bytes of free space")).split()[-1])


def fragment(volume: Path, files: int = 200, size: int = 16384) -> None:
    """Leave the volume's free space in ``files // 2`` pieces of ``size`` bytes (ntfscp): ``files`` files,
    one more that takes all but two clusters of the rest, then every other file emptied."""
    work = volume.parent
    piece, empty, filler = work / "piece", work / "empty", work / "filler"
    piece.write_bytes(b"\xa5" * size)
    empty.write_bytes(b"")
    for i in range(files):
        subprocess.run(["ntfscp", "-f", str(volume), str(piece), f"/f{i}"], check=True, capture_output=True)
    with open(filler, "wb") as f:
        f.truncate(free_bytes(volume) - 8192)
    subprocess.run(["ntfscp", "-f", str(volume), str(filler), "/filler"], check=True, capture_output=True)
    for i in range(1, files, 2):
        subprocess.run(["ntfscp", "-f", str(volume), str(empty), f"/f{i}"], check=True, capture_output=True)


@pytest.fixture(scope="module")
def fragmented(tmp_path_factory) -> tuple[Path, int]:
    """A 16 MiB NTFS data disk (dynamic VHDX) whose free space is about a hundred 16 KiB pieces, and its free bytes."""
    folder = tmp_path_factory.mktemp("fragmented")
    state = {}

    def prepare(volume: Path) -> None:
        fragment(volume)
        state["free"] = free_bytes(volume)

    image = ntfs_disk(folder, 16, opts="subformat=dynamic", prepare=prepare)
    assert 100 * 16384 <= state["free"] < 100 * 16384 + 65536, state  # the pieces, and little else
    return image, state["free"]


@pytest.mark.parametrize("size", ["1 MiB", "all of it"])
def test_copy_in_into_free_space_in_a_hundred_pieces(fragmented, size, tmp_path):
    """libntfs-3g's allocator gives up with ENOSPC when one call needs more free runs than it takes from each
    32768-cluster window of $Bitmap; the volume has the room (ntfscluster counts it, ntfs-3g's FUSE driver
    fills it), so the copy-in must not be a "volume full" (exit 26): the file takes some sixty or a hundred runs."""
    original, free = fragmented
    image = tmp_path / original.name
    shutil.copyfile(original, image)
    local = payload(tmp_path / "local" / "p.bin", MiB if size == "1 MiB" else free, seed=len(size))
    code, out, err = run_cli("copy-in", "--partition", "1", image, local, "/")
    assert code == 0, err
    judge(image, tmp_path, "/p.bin", local)


def test_one_byte_more_than_the_pieces_hold_is_refused_unchanged(fragmented, tmp_path):
    original, free = fragmented
    image = tmp_path / original.name
    shutil.copyfile(original, image)
    local = payload(tmp_path / "local" / "p.bin", free + 1, seed=1)
    before = digest(image)
    code, out, err = run_cli("copy-in", "--partition", "1", image, local, "/")
    assert code == 26, err
    assert_one_line_error(code, out, err, image)
    assert digest(image) == before


def test_bytes_written_into_free_space_in_a_hundred_pieces(fragmented, tmp_path):
    """The same for data written from memory (install.cmd, hives: EditSession.write_file with bytes), whose
    clusters libntfs-3g allocates while it fills the new file's hole."""
    import vhdtool

    original, _free = fragmented
    image = tmp_path / original.name
    shutil.copyfile(original, image)
    local = payload(tmp_path / "local" / "p.bin", MiB + 3, seed=7)
    with vhdtool.edit(image) as ed:
        ed.write_file("/p.bin", local.read_bytes(), partition=1)
    judge(image, tmp_path, "/p.bin", local)


# -- guest paths NTFS or Windows cannot take: a refusal of the path (exit 5), not "run chkdsk" ----------------

@pytest.fixture(scope="module")
def plain_disk(tmp_path_factory) -> Path:
    """A 32 MiB NTFS data disk (dynamic VHDX) holding /file.bin (ntfscp)."""
    folder = tmp_path_factory.mktemp("plain")

    def prepare(volume: Path) -> None:
        (volume.parent / "file.bin").write_bytes(b"old" * 1000)
        subprocess.run(["ntfscp", "-f", str(volume), str(volume.parent / "file.bin"), "/file.bin"], check=True,
                       capture_output=True)

    return ntfs_disk(folder, 32, opts="subformat=dynamic", prepare=prepare)


@pytest.mark.parametrize("guest_dir,needle", [
    ("/file.bin/sub", "/file.bin is a file"),
    ("/" + "a" * 256, "255"),
    ("/" + "\U0001F600" * 128, "255"),  # 128 characters, 256 UTF-16 units
    ("/a:b", "Windows"),
    ("/what?", "Windows"),
    ("/tab\there", "Windows"),
    ("/trailing.", "Windows"),
    ("/trailing ", "Windows"),
    ("/CON", "device"),
    ("/nul.txt", "device"),
    ("/Com1.log", "device"),
    ("/Windows/LPT9", "device"),
])
def test_a_guest_folder_ntfs_cannot_hold_is_refused_unchanged(plain_disk, guest_dir, needle, tmp_path):
    image = tmp_path / plain_disk.name
    shutil.copyfile(plain_disk, image)
    local = payload(tmp_path / "local" / "p.bin", 100, seed=5)
    before = digest(image)
    code, out, err = run_cli("copy-in", "--partition", "1", image, local, guest_dir)
    assert code == 5, err
    assert_one_line_error(code, out, err, image)
    assert needle in err and "chkdsk" not in err, err
    assert digest(image) == before


@pytest.mark.parametrize("name", ["\u00e9" * 255, "\U0001F600" * 127 + "a", "\u03a9mega \u00f1 \u4e2d\u6587",
                                  "CONSOLE.txt", "com10", "lpt0", "nul_", "auxiliary"])  # no device names
def test_the_longest_and_unicode_names_are_written(plain_disk, name, tmp_path):
    """255 UTF-16 units (é: one each; an emoji: two) is NTFS's limit and is written; ntfscat and dissect read it."""
    image = tmp_path / plain_disk.name
    shutil.copyfile(plain_disk, image)
    local = payload(tmp_path / "local" / "p.bin", 5000, seed=6)
    code, out, err = run_cli("copy-in", "--partition", "1", image, local, f"/{name}")
    assert code == 0, err
    judge(image, tmp_path, f"/{name}/p.bin", local)


def test_a_local_name_that_is_not_utf8_is_refused_unchanged(plain_disk, tmp_path):
    """A Linux file name is bytes; one that is not UTF-8 has no NTFS name (it crashed the libntfs-3g child: exit 4)."""
    import os

    image = tmp_path / plain_disk.name
    shutil.copyfile(plain_disk, image)
    (tmp_path / "local").mkdir()
    local = os.path.join(os.fsencode(tmp_path / "local"), b"bad\xff.bin")
    with open(local, "wb") as f:
        f.write(b"x" * 100)
    before = digest(image)
    code, out, err = run_cli("copy-in", "--partition", "1", image, os.fsdecode(local), "/")
    assert code == 5, err
    assert_one_line_error(code, out, err, image)
    assert "Unicode" in err, err
    assert digest(image) == before


@pytest.mark.parametrize("kind", ["fifo", "device", "folder"])
def test_a_local_path_that_is_no_regular_file_is_named_so(plain_disk, kind, tmp_path):
    """A FIFO (never opened: nothing blocks), /dev/zero or a folder: exit 2 saying what it is, image unchanged."""
    import os

    image = tmp_path / plain_disk.name
    shutil.copyfile(plain_disk, image)
    local = {"fifo": tmp_path / "fifo", "device": Path("/dev/zero"), "folder": tmp_path}[kind]
    if kind == "fifo":
        os.mkfifo(local)
    before = digest(image)
    code, out, err = run_cli("copy-in", "--partition", "1", image, local, "/")
    assert code == 2, err
    assert "not a regular file" in err and str(local) in err, err
    assert digest(image) == before



@pytest.mark.slow  # 12 s reduced; the default run has the off-grid copy-in above
@pytest.mark.parametrize("sweep", SWEEPS)
def test_kill_a_copy_in_off_the_4k_grid_at_every_write_and_flush(sweep, tmp_path):
    """The logged sectors that carry direct bytes (above), killed at each write and flush (strace's fault
    injection) of a copy-in whose payload is many copy pieces: the image reads as the old volume (ntfs_tree of
    dissect.ntfs) or holds the whole file (ntfscat), and running the command again gives the new state."""
    from test_stream_write import run_job, syscall_counts

    original = ntfs_disk(tmp_path, 64, start=63, name="orig")
    local = payload(tmp_path / "local" / "p.bin", 4 * MiB + 4097, seed=63)
    want = sha(local.read_bytes())
    args = ("copy-in", "--partition", "1")
    old_volume = partition_volume(original, tmp_path, 1)
    old_tree = ntfs_tree(old_volume)
    old_volume.unlink()
    probe, trace = tmp_path / "probe.vhdx", tmp_path / "trace"
    shutil.copyfile(original, probe)
    calls = ("pwrite64", "fsync", "fdatasync", "copy_file_range")
    res = run_job(*args, probe, local, "/", strace=["strace", "-f", "-o", str(trace), "-e", "trace=" + ",".join(calls)])
    assert res.returncode == 0, res.stderr
    probe.unlink()
    counts = syscall_counts(trace, calls)
    points = sweep_points([(name, n) for name, total in counts.items() for n in range(1, total + 1)], sweep)
    outcomes = {"old": 0, "new": 0}
    for name, n in points:
        victim = tmp_path / "victim.vhdx"
        shutil.copyfile(original, victim)
        res = run_job(*args, victim, local, "/",
                      strace=["strace", "-f", "-o", "/dev/null", "-e", f"inject={name}:signal=KILL:when={n}"])
        why = (name, n, res.returncode)
        seen = tmp_path / "seen.vhdx"
        shutil.copyfile(victim, seen)
        subprocess.run(["qemu-img", "check", "-r", "all", str(seen)], capture_output=True)  # replays a pending log
        check = subprocess.run(["qemu-img", "check", str(seen)], capture_output=True, text=True)
        assert check.returncode == 0, (why, check.stdout)
        volume = partition_volume(seen, tmp_path, 1)
        tree = ntfs_tree(volume)
        if "/p.bin" in tree:
            assert tree["/p.bin"] == want and sha(ntfscat(volume, "/p.bin")) == want, why
            outcomes["new"] += 1
        else:
            assert tree == old_tree, why
            outcomes["old"] += 1
        volume.unlink()
        seen.unlink()
        code, _out, err = run_cli(*args, victim, local, "/")
        assert code == 0, (why, err)
        judge(victim, tmp_path, "/p.bin", local)
        victim.unlink()
    assert outcomes["old"] and outcomes["new"], outcomes


@pytest.mark.parametrize("folder", ["/new", "/"])
def test_two_local_files_of_one_name_leave_the_last(plain_disk, folder, tmp_path):
    """copy-in a/x b/x FOLDER writes FOLDER/x twice in one session, in order: the second replaces the first (it
    failed as a damaged volume, exit 4, when FOLDER/x was not on the volume before)."""
    image = tmp_path / plain_disk.name
    shutil.copyfile(plain_disk, image)
    first = payload(tmp_path / "a" / "file.bin", 300_000, seed=1)
    second = payload(tmp_path / "b" / "file.bin", 400_000, seed=2)
    code, out, err = run_cli("copy-in", "--partition", "1", image, first, second, folder)
    assert code == 0, err
    judge(image, tmp_path, f"{folder.rstrip('/')}/file.bin", second)


# -- names dissect.ntfs's lookup misses and libntfs-3g finds ------------------------------------------------
#
# NTFS sorts a folder's index by UTF-16 code units after $UpCase; dissect.ntfs binary-searches it comparing
# Python's str.upper(), which orders a name beyond the BMP (an emoji: surrogates, 0xD83D...) after U+E000-U+FFFF
# (fullwidth forms, halfwidth katakana) where NTFS orders it before. In a folder holding both, the editor's view
# (dissect.ntfs) can call a name absent that libntfs-3g (ignoring case through $UpCase, as Windows) finds.

EMOJI = "\U0001F600"
FULLWIDTH = ("\uff21", "\uff22", "\uff23")  # Ａ Ｂ Ｃ


@pytest.fixture(scope="module")
def emoji_disk(tmp_path_factory) -> Path:
    """/sub holds the folder 😀d (with keep.txt) and the files Ａ Ｂ Ｃ; /sub2 the file 😀f and Ａ Ｂ Ｃ."""
    folder = tmp_path_factory.mktemp("emoji")
    image = ntfs_disk(folder, 32, opts="subformat=dynamic")
    local = folder / "local"
    local.mkdir()
    (local / "keep.txt").write_bytes(b"precious")
    (local / f"{EMOJI}f").write_bytes(b"a file")
    for name in FULLWIDTH:
        (local / name).write_bytes(name.encode())
    steps = [(local / "keep.txt", f"/sub/{EMOJI}d"), (local / f"{EMOJI}f", "/sub2")]
    steps += [(local / name, where) for name in FULLWIDTH for where in ("/sub", "/sub2")]
    for src, where in steps:
        code, _out, err = run_cli("copy-in", "--partition", "1", image, src, where)
        assert code == 0, err
    return image


def listing(image: Path, tmp: Path, folder: str) -> list[str]:
    raw = raw_image(image, tmp / f"{image.name}.raw")
    volume = extract_partition(raw, 1, tmp / f"{image.name}.p1")
    raw.unlink()
    try:
        out = subprocess.run(["ntfsls", "-f", str(volume), "-p", folder], capture_output=True, check=True).stdout
    finally:
        volume.unlink()
    return [name for name in out.decode("utf-8").split() if name not in (".", "..")]  # in the index's order


def test_a_file_never_replaces_a_folder_the_editor_did_not_see(emoji_disk, tmp_path):
    """A local file named as a guest folder dissect.ntfs misses: libntfs-3g found the folder, and the write
    (a replacement: written aside, the old path deleted) deleted the folder with all it held, reported as an add."""
    image = tmp_path / emoji_disk.name
    shutil.copyfile(emoji_disk, image)
    assert listing(image, tmp_path, "/sub")[0] == f"{EMOJI}d"  # NTFS's order: the emoji first
    local = payload(tmp_path / "local" / f"{EMOJI}d", 100, seed=9)
    before = digest(image)
    code, out, err = run_cli("copy-in", "--partition", "1", image, local, "/sub")
    assert code == 5, err
    assert_one_line_error(code, out, err, image)
    assert "is a folder" in err, err
    assert digest(image) == before
    assert listing(image, tmp_path, f"/sub/{EMOJI}d") == ["keep.txt"]


def test_a_folder_is_never_made_under_a_file_the_editor_did_not_see(emoji_disk, tmp_path):
    image = tmp_path / emoji_disk.name
    shutil.copyfile(emoji_disk, image)
    local = payload(tmp_path / "local" / "x.bin", 100, seed=10)
    before = digest(image)
    code, out, err = run_cli("copy-in", "--partition", "1", image, local, f"/sub2/{EMOJI}f/deeper")
    assert code == 5, err
    assert_one_line_error(code, out, err, image)
    assert "is a file" in err and "chkdsk" not in err, err
    assert digest(image) == before


def test_a_file_the_search_misses_is_reported_as_replaced_and_not_written_twice(emoji_disk, tmp_path):
    import json

    image = tmp_path / emoji_disk.name
    shutil.copyfile(emoji_disk, image)
    local = payload(tmp_path / "local" / f"{EMOJI}f", 5000, seed=11)
    code, out, err = run_cli("copy-in", "--json", "--partition", "1", image, local, "/sub2")
    assert code == 0, err
    assert [f["action"] for f in json.loads(out)["changes"]["files"]] == ["replace"], out
    judge(image, tmp_path, f"/sub2/{EMOJI}f", local)
    before = digest(image)
    code, out, err = run_cli("copy-in", "--json", "--partition", "1", image, local, "/sub2")
    assert code == 0 and json.loads(out)["bytes_written"] == 0, (out, err)
    assert digest(image) == before


def test_a_name_ntfs_keeps_apart_is_written_not_skipped(plain_disk, tmp_path):
    """str.upper() makes straße STRASSE; NTFS's $UpCase leaves ß alone, so they are two names (ntfsls, Windows).
    A straße.txt with STRASSE.txt's bytes was "nothing to change" and never written."""
    import json

    image = tmp_path / plain_disk.name
    shutil.copyfile(plain_disk, image)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    upper, sharp = tmp_path / "a" / "STRASSE.txt", tmp_path / "b" / "stra\u00dfe.txt"
    upper.write_bytes(b"same bytes")
    sharp.write_bytes(b"same bytes")
    assert run_cli("copy-in", "--partition", "1", image, upper, "/d")[0] == 0
    code, out, err = run_cli("copy-in", "--json", "--partition", "1", image, sharp, "/d")
    assert code == 0, err
    assert [f["action"] for f in json.loads(out)["changes"]["files"]] == ["add"], out
    assert sorted(listing(image, tmp_path, "/d")) == sorted(["STRASSE.txt", "stra\u00dfe.txt"])
    judge(image, tmp_path, "/d/stra\u00dfe.txt", sharp)
    judge(image, tmp_path, "/d/STRASSE.txt", upper)


# -- coverage: cluster sizes, payload sizes at cluster edges, and files of every kind replaced -----------------

@pytest.mark.parametrize("cluster", [512, 65536])
def test_payloads_at_cluster_edges_and_a_second_run_writes_nothing(cluster, tmp_path):
    import json

    image = ntfs_disk(tmp_path, 48, cluster=cluster, opts="subformat=dynamic,block_size=1M")
    for size in (0, 1, cluster, cluster + 1, 3 * cluster - 1):
        local = payload(tmp_path / f"local{size}" / f"p{size}.bin", size, seed=size)
        code, out, err = run_cli("copy-in", "--partition", "1", image, local, "/edges")
        assert code == 0, err
        judge(image, tmp_path, f"/edges/p{size}.bin", local)
        before = digest(image)
        code, out, err = run_cli("copy-in", "--json", "--partition", "1", image, local, "/edges")
        assert code == 0 and json.loads(out)["bytes_written"] == 0, (out, err)
        assert digest(image) == before


@pytest.fixture(scope="module")
def special_disk(tmp_path_factory) -> Path:
    """A 64 MiB NTFS data disk whose files ntfs-3g's FUSE driver made: a compressed folder with a compressed
    file, a sparse file, a file with an alternate data stream, a file with two hard links, a read-only file."""
    import os

    if not os.path.exists("/dev/fuse") or shutil.which("ntfs-3g") is None or os.geteuid() != 0:
        pytest.skip("ntfs-3g's FUSE driver (root, /dev/fuse) makes these files")
    folder = tmp_path_factory.mktemp("special")

    def prepare(volume: Path) -> None:
        mnt = volume.parent / "mnt"
        mnt.mkdir()
        res = subprocess.run(["ntfs-3g", "-o", "streams_interface=windows", str(volume), str(mnt)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"ntfs-3g cannot mount here: {res.stderr.strip()}")
        try:
            (mnt / "comp").mkdir()
            os.setxattr(mnt / "comp", "system.ntfs_attrib_be", (0x800).to_bytes(4, "big"))  # compressed
            (mnt / "comp" / "c.bin").write_bytes(b"compress me " * 30000)
            with open(mnt / "sparse.bin", "wb") as f:
                f.truncate(40 * MiB)
                f.seek(30 * MiB)
                f.write(b"island")
            (mnt / "ads.bin").write_bytes(b"main" * 5000)
            (mnt / "ads.bin:Zone.Identifier").write_bytes(b"[ZoneTransfer]\r\nZoneId=3\r\n")
            (mnt / "hl.bin").write_bytes(b"linked" * 5000)
            os.link(mnt / "hl.bin", mnt / "hl2.bin")
            (mnt / "ro.bin").write_bytes(b"read only" * 5000)
            os.setxattr(mnt / "ro.bin", "system.ntfs_attrib_be", (0x1).to_bytes(4, "big"))
        finally:
            subprocess.run(["fusermount", "-u", str(mnt)], check=True)

    return ntfs_disk(folder, 64, opts="subformat=dynamic", prepare=prepare)


@pytest.mark.parametrize("guest", ["/comp/c.bin", "/comp/new.bin", "/sparse.bin", "/ads.bin", "/hl.bin", "/ro.bin"])
def test_replacing_a_file_of_any_kind(special_disk, guest, tmp_path):
    """The new bytes replace the old file whatever it was (a new file in a compressed folder is compressed by
    libntfs-3g: its bytes go through libntfs-3g's buffers); the other name of a hard link keeps the old bytes."""
    image = tmp_path / special_disk.name
    shutil.copyfile(special_disk, image)
    local = payload(tmp_path / "local" / guest.rsplit("/", 1)[1], 777_777, seed=len(guest))
    code, out, err = run_cli("copy-in", "--partition", "1", image, local, guest.rsplit("/", 1)[0] or "/")
    assert code == 0, err
    judge(image, tmp_path, guest, local)
    volume = partition_volume(image, tmp_path, 1)
    try:
        res = subprocess.run(["ntfsfix", "-n", str(volume)], capture_output=True, text=True)
        assert res.returncode == 0 and "processed successfully" in res.stdout, res.stdout + res.stderr
        if guest == "/hl.bin":
            assert ntfscat(volume, "/hl2.bin") == b"linked" * 5000
        if guest.startswith("/comp/"):
            info = subprocess.run(["ntfsinfo", "-f", "-F", guest, str(volume)], capture_output=True, text=True).stdout
            assert "COMPRESSED" in info, info
    finally:
        volume.unlink()


def test_copy_in_off_the_4k_grid_through_a_differencing_child(tmp_path):
    """The same through a differencing VHDX (tests/vhdx_craft.py) whose blocks are all partially present: the
    payload written in place directly, sector bitmaps and metadata logged. libvhdi reads the chain."""
    import vhdx_craft as vc

    parent = ntfs_disk(tmp_path, 64, start=63, name="parent")
    raw = raw_image(parent, tmp_path / "parent.raw").read_bytes()
    child = tmp_path / "child.avhdx"
    own = [1 + 4096 * block for block in range(33)]  # a sector of every 2 MiB block: all partially present
    vc.make_differencing(parent, child, {lba: raw[lba * 512 : (lba + 1) * 512] for lba in own},
                         relative_path=f".\\{parent.name}", block_size=2 * MiB)
    parent_before = digest(parent)
    local = payload(tmp_path / "local" / "p.bin", 3 * MiB + 1, seed=64)
    code, out, err = run_cli("copy-in", "--partition", "1", child, local, "/")
    assert code == 0, err
    assert digest(parent) == parent_before
    volume = tmp_path / "chain.p1"
    volume.write_bytes(vhdi_chain_read(child, parent, 63 * 512, 64 * MiB))
    assert sha(ntfscat(volume, "/p.bin")) == sha(local.read_bytes())
    res = subprocess.run(["ntfsfix", "-n", str(volume)], capture_output=True, text=True)
    assert res.returncode == 0 and "processed successfully" in res.stdout, res.stdout


@pytest.mark.parametrize("opts", ["subformat=fixed,block_size=1M", "subformat=dynamic,block_size=32M"])
def test_copy_in_to_a_vhdx_of_4096_byte_logical_sectors(opts, tmp_path):
    """A 4Kn disk: qemu-img makes the VHDX (512-byte sectors, which it alone writes), vhdx_craft sets its
    logical and physical sector sizes to 4096 (metadata items, MS-VHDX 2.6.2.4/5), the MBR counts 4 KiB sectors
    and mkntfs -s 4096 formats the volume. qemu does not read 4Kn VHDX: dissect.hypervisor does, for ntfscat."""
    import struct

    import vhdx_craft as vc
    from dissect.hypervisor.disk.vhdx import VHDX

    part, raw = tmp_path / "part.img", tmp_path / "raw.img"
    with open(part, "wb") as f:
        f.truncate(64 * MiB)
    subprocess.run(["mkntfs", "-Q", "-F", "-q", "-s", "4096", "-c", "4096", str(part)], check=True, capture_output=True)
    mbr = bytearray(512)
    mbr[446:462] = struct.pack("<B3sB3sII", 0, b"\xfe\xff\xff", 7, b"\xfe\xff\xff", 256, 16384)  # 1 MiB, 64 MiB
    mbr[510:512] = b"\x55\xaa"
    with open(raw, "wb") as f:
        f.truncate(66 * MiB)
        f.write(mbr)
        f.seek(MiB)
        f.write(part.read_bytes())
    image = tmp_path / "disk4k.vhdx"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vhdx", "-o", opts, str(raw), str(image)], check=True)
    buf = bytearray(image.read_bytes())
    for item in (vc.LOGICAL_SECTOR, vc.PHYSICAL_SECTOR):
        struct.pack_into("<I", buf, vc.metadata_items(buf)[item][1], 4096)
    image.write_bytes(buf)
    local = payload(tmp_path / "local" / "p.bin", 5 * MiB + 1, seed=4096)
    code, out, err = run_cli("copy-in", "--partition", "1", image, local, "/4k")
    assert code == 0, err
    volume = tmp_path / "p1"
    with open(image, "rb") as f:
        disk = VHDX(f)
        assert disk.sector_size == 4096
        disk.seek(MiB)
        volume.write_bytes(disk.read(64 * MiB))
    assert sha(ntfscat(volume, "/4k/p.bin")) == sha(local.read_bytes())
    res = subprocess.run(["ntfsfix", "-n", str(volume)], capture_output=True, text=True)
    assert res.returncode == 0 and "processed successfully" in res.stdout, res.stdout


# -- many local files in one copy-in ------------------------------------------------------------------------

def test_more_local_files_than_the_soft_limit_of_open_descriptors(plain_disk, tmp_path):
    """Each local file stays open until the commit; with the soft RLIMIT_NOFILE at 256 (often 1024), a copy-in
    of 300 files failed with 'Too many open files' (exit 2). vhdtool raises the soft limit to the hard one."""
    import os
    import resource
    import sys

    image = tmp_path / plain_disk.name
    shutil.copyfile(plain_disk, image)
    folder = tmp_path / "many"
    folder.mkdir()
    files = [folder / f"f{i:03d}.txt" for i in range(300)]
    for i, f in enumerate(files):
        f.write_bytes(f"file {i}\n".encode() * (i + 1))
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 400:
        pytest.skip(f"the hard limit of open descriptors is {hard}")

    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    res = subprocess.run([sys.executable, "-m", "vhdtool.cli.main", "copy-in", "--partition", "1", str(image),
                          *map(str, files), "/many"], capture_output=True, text=True, preexec_fn=low_soft_limit,
                         env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent)))
    assert res.returncode == 0, res.stderr
    assert sorted(listing(image, tmp_path, "/many")) == [f.name for f in files]
    judge(image, tmp_path, "/many/f299.txt", files[299])


def test_background_hashers_are_bounded(tmp_path):
    """Each large local file was hashed in a forked process of its own, all at once: a copy-in of 40 files of
    17 MB ran 40 processes, each with its 4 MiB read buffer. At most 4 run; the others hash when asked."""
    import hashlib
    import os

    from vhdtool.container.source import Source

    bound = 4  # vhdtool.container.source.MAX_HASHERS

    def children() -> int:
        me, n = str(os.getpid()), 0
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            n += any(line.split() == ["PPid:", me] for line in status.splitlines())
        return n

    paths = [payload(tmp_path / f"big{i}.bin", 16 * MiB + i, seed=i) for i in range(bound + 3)]
    sources = [Source(p) for p in paths]
    try:
        before = children()
        for s in sources:
            s.start_sha256()
        assert children() - before <= bound
        for s, p in zip(sources, paths):
            assert s.sha256() == hashlib.sha256(p.read_bytes()).hexdigest()
    finally:
        for s in sources:
            s.close()


@pytest.mark.parametrize("fmt,opts", [("vhdx", "subformat=dynamic,block_size=1M"), ("vpc", "subformat=dynamic")],
                         ids=["vhdx", "vhd"])
def test_a_local_file_cut_short_during_the_commit_is_named_as_changed(fmt, opts, tmp_path):
    """The local file truncated while the commit copies it (the 5th copy_file_range held up 3 s by strace): the
    copy finds its end early. That is the file changing (SourceChanged: exit 15 naming the local file), not the
    image's disk failing ('check the disk holding the image'); the volume reads as before."""
    import os
    import sys
    import time

    from test_stream_write import JOB, job_env

    (tmp_path / "img").mkdir()
    image = ntfs_disk(tmp_path / "img", 64, opts=opts, fmt=fmt)
    before = digest(image)
    old_volume = partition_volume(image, tmp_path, 1)
    old_tree = ntfs_tree(old_volume)
    old_volume.unlink()
    local = payload(tmp_path / "local" / "p.bin", 24 * MiB + 1, seed=15)
    size = image.stat().st_size
    cmd = ["strace", "-f", "-o", "/dev/null", "-e", "inject=copy_file_range:delay_enter=3000000:when=5",
           sys.executable, str(JOB), str(MiB), "copy-in", "--partition", "1", str(image), str(local), "/"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=job_env())
    deadline = time.monotonic() + 60
    while image.stat().st_size == size and os.listdir(image.parent) == [image.name] and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.5)
    os.truncate(local, MiB)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 15, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"vhdtool: {local}: ") and "changed" in lines[0], err
    assert os.listdir(image.parent) == [image.name]
    if fmt == "vpc":
        assert digest(image) == before  # the VHD writer changed only its copy
    else:
        res = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
        assert res.returncode == 0, res.stdout
    volume = partition_volume(image, tmp_path, 1)
    assert ntfs_tree(volume) == old_tree


@pytest.fixture(scope="module")
def junction_disk(tmp_path_factory) -> Path:
    """/Users/Public, and /Documents and Settings a junction to C:\\Users as Windows has it (a mount-point
    reparse point set through ntfs-3g's FUSE driver, system.ntfs_reparse_data)."""
    import os
    import struct

    if not os.path.exists("/dev/fuse") or shutil.which("ntfs-3g") is None or os.geteuid() != 0:
        pytest.skip("ntfs-3g's FUSE driver (root, /dev/fuse) makes the junction")
    folder = tmp_path_factory.mktemp("junction")

    def prepare(volume: Path) -> None:
        mnt = volume.parent / "mnt"
        mnt.mkdir()
        res = subprocess.run(["ntfs-3g", str(volume), str(mnt)], capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"ntfs-3g cannot mount here: {res.stderr.strip()}")
        try:
            (mnt / "Users" / "Public").mkdir(parents=True)
            (mnt / "Documents and Settings").mkdir()
            sub, shown = "\\??\\C:\\Users".encode("utf-16-le"), "C:\\Users".encode("utf-16-le")
            body = struct.pack("<HHHH", 0, len(sub), len(sub) + 2, len(shown)) + sub + b"\0\0" + shown + b"\0\0"
            os.setxattr(mnt / "Documents and Settings", "system.ntfs_reparse_data",
                        struct.pack("<IHH", 0xA0000003, len(body), 0) + body)  # IO_REPARSE_TAG_MOUNT_POINT
        finally:
            subprocess.run(["fusermount", "-u", str(mnt)], check=True)

    return ntfs_disk(folder, 32, opts="subformat=dynamic", prepare=prepare)


@pytest.mark.parametrize("guest_dir", ["/Documents and Settings/Public", "/Documents and Settings"])
def test_a_path_through_a_junction_is_refused_unchanged(junction_disk, guest_dir, tmp_path):
    """Windows follows a junction; libntfs-3g does not: the file went into the junction's own folder (ntfsls
    lists it there), where Windows never looks. Refused as a path (exit 5); the target itself is written."""
    image = tmp_path / junction_disk.name
    shutil.copyfile(junction_disk, image)
    local = payload(tmp_path / "local" / "f.txt", 100, seed=12)
    before = digest(image)
    code, out, err = run_cli("copy-in", "--partition", "1", image, local, guest_dir)
    assert code == 5, err
    assert_one_line_error(code, out, err, image)
    assert "junction" in err, err
    assert digest(image) == before
    code, out, err = run_cli("copy-in", "--partition", "1", image, local, "/Users/Public")
    assert code == 0, err
    judge(image, tmp_path, "/Users/Public/f.txt", local)


def test_no_room_for_new_records_is_a_full_volume(tmp_path):
    """Empty files need no clusters, only MFT records; on a volume ntfscp filled, the $MFT cannot grow and
    libntfs-3g's ntfs_create fails with ENOSPC. That is a full volume (exit 26), not a damaged one (exit 4)."""
    def prepare(volume: Path) -> None:
        filler, n, size = volume.parent / "filler", 0, free_bytes(volume)
        while size > 8192:  # files as large as ntfscp can allocate, until less than two clusters are free
            with open(filler, "wb") as f:
                f.truncate(size - 8192)
            if subprocess.run(["ntfscp", "-f", str(volume), str(filler), f"/filler{n}"],
                              capture_output=True).returncode == 0:
                n, size = n + 1, free_bytes(volume)
            else:
                size //= 2

    image = ntfs_disk(tmp_path, 8, opts="subformat=dynamic", prepare=prepare)
    folder = tmp_path / "empty"
    folder.mkdir()
    files = [folder / f"e{i:03d}" for i in range(400)]
    for f in files:
        f.write_bytes(b"")
    before = digest(image)
    code, out, err = run_cli("copy-in", "--partition", "1", image, *files, "/many")
    assert code == 26, err
    assert_one_line_error(code, out, err, image)
    assert "full" in err and "chkdsk" not in err, err
    assert digest(image) == before
