"""A local file copied into ext2/3/4 streams (issue 14): its bytes go file to file, never through memory or the sandbox.

Images are made here by mkfs.ext4/mkfs.ext3 -d, sfdisk and qemu-img (tests/test_ext4_write.py's ``ext_image``),
with room for payloads of hundreds of MiB. Judges we did not write: ``e2fsck -fn`` clean, ``debugfs -R dump``
and dissect.extfs give the payload's sha256, ``debugfs -R blocks`` where the data went, ``qemu-img check``,
GNU time's peak RSS. A full volume is exit 26 with the image byte-identical. A crash sweep kills a streamed
copy-in (SIGKILL through strace's fault injection) at its writes, flushes, copies and renames (a dynamic VHD's
also at the unlink of a stale temp): the guest is the old one or the new one, e2fsck clean either way.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FULL, REDUCED, assert_one_line_error, digest, run_cli, sweep_points
from judges.linux import ext_tree
from judges.tools import sh
from judges.volumes import partition_volume
from test_ext4_write import FEATURES, debugfs, e2fsck_clean, ext_image, free_blocks, image_ok
from test_stream_write import (KILL_SYSCALLS, differing_clusters, file_sha, job_env, measured, payload_file, run_job,
                               syscall_counts)
from vhdtool.errors import VolumeFull

MiB = 1 << 20
GUEST = "/opt/payload/payload.bin"


def patterned(path: Path, size: int) -> Path:
    """``size`` bytes, each 1 MiB different (a counter's hash repeated), written a piece at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for at in range(0, size, MiB):
            f.write((hashlib.sha256(str(at).encode()).digest() * (MiB // 32))[: min(MiB, size - at)])
    return path


def dumped_sha(volume: Path, guest: str, tmp: Path) -> str:
    out = tmp / "dumped.bin"
    sh("debugfs", "-R", f"dump {guest} {out}", volume)
    try:
        return file_sha(out)
    finally:
        out.unlink()


def dissect_sha(volume: Path, guest: str) -> str:
    from dissect.extfs import ExtFS

    with open(volume, "rb") as f:
        stream, h = ExtFS(f).get(guest).open(), hashlib.sha256()
        for chunk in iter(lambda: stream.read(4 * MiB), b""):
            h.update(chunk)
    return h.hexdigest()


def data_blocks(volume: Path, guest: str) -> set[int]:
    return {int(b) for b in debugfs(volume, f"blocks {guest}").split()}


def copy_in(image: Path, local: Path, folder: str = "/opt/payload") -> tuple[int, str, str]:
    return run_cli("copy-in", "--json", image, local, folder)


# -- the payload where it belongs, as independent readers see it ---------------------------------------------

LAYOUTS = {  # name: (mkfs, image MiB, payload bytes): the payload ends inside a block
    "ext4": (FEATURES["ext4"], 300, 200 * MiB + 5),
    "ext4-1k": (FEATURES["ext4-1k-linear-dirs"], 120, 48 * MiB + 1000),  # 1 KiB blocks: an extent tree of depth 1
    "ext4-no-csum": (FEATURES["ext4-no-csum"], 120, 48 * MiB + 4095),
    "ext3": (FEATURES["ext3"], 120, 48 * MiB + 1),  # block-mapped: indirect, double indirect blocks
    "ext2": (FEATURES["ext2"], 80, 20 * MiB + 17),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_streamed_copy_in_judged_by_independent_readers(layout, tmp_path):
    mkfs, image_mib, size = LAYOUTS[layout]
    image = ext_image(tmp_path, layout, mkfs, size=image_mib * MiB)
    volume = partition_volume(image, tmp_path, 1)
    before, free_before = ext_tree(volume), free_blocks(volume)
    volume.unlink()
    local = patterned(tmp_path / "local" / "payload.bin", size)
    want = file_sha(local)
    code, out, err = copy_in(image, local)
    assert code == 0, err
    change = next(f for f in json.loads(out)["changes"]["files"] if f["path"] == GUEST)
    assert (change["action"], change["size"], change["sha256"]) == ("add", size, want)
    image_ok(image)
    volume = partition_volume(image, tmp_path, 1)
    e2fsck_clean(volume)
    assert dumped_sha(volume, GUEST, tmp_path) == want
    assert dissect_sha(volume, GUEST) == want
    after = ext_tree(volume)
    assert {p: v for p, v in after.items() if not p.startswith("/opt")} == before
    stat = debugfs(volume, f"stat {GUEST}")
    assert int(re.search(r"Size: (\d+)", stat).group(1)) == size
    block = int(re.search(r"Block size:\s+(\d+)", sh("dumpe2fs", "-h", volume).stdout.decode()).group(1))
    used = free_before - free_blocks(volume)
    assert -(-size // block) < used < -(-size // block) * 1.01 + 16, used  # the data and a little map, no more
    # A second copy-in of the same file changes nothing (compared a chunk at a time, not read whole).
    was = digest(image)
    code, out, err = run_cli("copy-in", image, local, "/opt/payload")
    assert code == 0 and "nothing to change" in err + out
    assert digest(image) == was


def test_the_last_block_is_zero_past_the_end(tmp_path):
    """The bytes of the last block past the file's end are zeros on disk, whatever the free block held."""
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\xa5" * (40 * MiB))
    # A file written and removed by debugfs leaves its bytes in the free blocks a new file then takes.
    image = ext_image(tmp_path, "tail", FEATURES["ext4"], size=64 * MiB,
                      dirty=(f"write {garbage} garbage.bin", "rm garbage.bin"))
    local = tmp_path / "local" / "payload.bin"
    patterned(local, 3 * MiB + 123)
    code, _out, err = copy_in(image, local)
    assert code == 0, err
    volume = partition_volume(image, tmp_path, 1)
    e2fsck_clean(volume)
    last = max(data_blocks(volume, GUEST))
    with open(volume, "rb") as f:
        f.seek(last * 4096)
        block = f.read(4096)
    tail = (3 * MiB + 123) % 4096
    assert block[:tail] == local.read_bytes()[-tail:]
    assert block[tail:] == bytes(4096 - tail)


def test_small_files_and_a_hard_linked_file_replaced(tmp_path):
    """An empty file, a one-byte file, a file of a block exactly, and /etc/hostname (hard-linked as
    /etc/hostname.bak) replaced from local files: the replaced file keeps its inode, so its other name sees the
    new bytes."""
    image = ext_image(tmp_path, "small", FEATURES["ext4"], size=64 * MiB)
    local = tmp_path / "local"
    local.mkdir()
    files = {"empty": b"", "one": b"x", "block": os.urandom(4096), "hostname": b"streamed-host\n" * 400}
    for name, data in files.items():
        (local / name).write_bytes(data)
    for name in ("empty", "one", "block"):
        assert run_cli("copy-in", image, local / name, "/opt/small")[0] == 0
    code, _out, err = run_cli("copy-in", image, local / "hostname", "/etc")
    assert code == 0, err
    image_ok(image)
    volume = partition_volume(image, tmp_path, 1)
    e2fsck_clean(volume)
    tree = ext_tree(volume)
    for name in ("empty", "one", "block"):
        assert tree[f"/opt/small/{name}"][4] == hashlib.sha256(files[name]).hexdigest(), name
    want = hashlib.sha256(files["hostname"]).hexdigest()
    assert tree["/etc/hostname"][4] == tree["/etc/hostname.bak"][4] == want
    assert re.search(r"Links: 2", debugfs(volume, "stat /etc/hostname"))


# -- replacing a file ----------------------------------------------------------------------------------------

def test_a_replaced_file_takes_blocks_the_old_one_did_not_use(tmp_path):
    """With room for both, the new content goes where the old state had nothing (so the VHDX writer puts it in
    place before its log): its blocks and the old file's are disjoint, and the old ones are free afterwards."""
    image = ext_image(tmp_path, "replace", FEATURES["ext4"], size=160 * MiB)
    first = patterned(tmp_path / "a" / "payload.bin", 40 * MiB + 7)
    assert copy_in(image, first)[0] == 0
    volume = partition_volume(image, tmp_path, 1)
    old_blocks, free_then = data_blocks(volume, GUEST), free_blocks(volume)
    second = payload_file(tmp_path / "b" / "payload.bin", 30 * MiB + 4096 * 3 + 1, seed=5)
    code, out, err = copy_in(image, second)
    assert code == 0, err
    assert next(f for f in json.loads(out)["changes"]["files"] if f["path"] == GUEST)["action"] == "replace"
    image_ok(image)
    volume = partition_volume(image, tmp_path, 1)
    e2fsck_clean(volume)
    assert dumped_sha(volume, GUEST, tmp_path) == dissect_sha(volume, GUEST) == file_sha(second)
    assert not data_blocks(volume, GUEST) & old_blocks
    assert free_blocks(volume) > free_then + 9 * MiB // 4096


def test_a_replaced_file_that_leaves_no_room_for_both_reuses_its_blocks(tmp_path):
    """60% of the volume replaced by another 60%: the old blocks are freed first after all (that part goes
    through the VHDX log), and the result is as sound."""
    image = ext_image(tmp_path, "tight", FEATURES["ext4"], size=100 * MiB)
    volume = partition_volume(image, tmp_path, 1)
    room = free_blocks(volume) * 4096
    first = payload_file(tmp_path / "a" / "payload.bin", int(room * 0.6), seed=1)
    assert copy_in(image, first)[0] == 0
    second = payload_file(tmp_path / "b" / "payload.bin", int(room * 0.6) + 12345, seed=2)
    code, _out, err = copy_in(image, second)
    assert code == 0, err
    image_ok(image)
    volume = partition_volume(image, tmp_path, 1)
    e2fsck_clean(volume)
    assert dumped_sha(volume, GUEST, tmp_path) == dissect_sha(volume, GUEST) == file_sha(second)


# -- a full volume -------------------------------------------------------------------------------------------

def test_a_payload_larger_than_the_free_space_is_exit_26_byte_identical(tmp_path):
    image = ext_image(tmp_path, "full", FEATURES["ext4"], size=64 * MiB)
    volume = partition_volume(image, tmp_path, 1)
    room = free_blocks(volume) * 4096
    local = tmp_path / "local" / "payload.bin"
    local.parent.mkdir()
    with open(local, "wb") as f:
        f.truncate(room + MiB)  # sparse: nothing of it is read before the refusal
    was = digest(image)
    code, out, err = run_cli("copy-in", image, local, "/opt/payload")
    assert code == VolumeFull.exit_code == 26
    assert_one_line_error(code, out, err, image)
    assert digest(image) == was


def test_libext2fs_children_refuse_a_file_the_volume_cannot_hold(tmp_path):
    """The child checks the room itself (the parent's check is not the only one): VolumeFull, nothing written."""
    from vhdtool.container.chain import open_image
    from vhdtool.container.overlay import Overlay
    from vhdtool.container.source import Source
    from vhdtool.filesystem import ext2fs
    from vhdtool.volume.mapping import VolumeMap

    image = ext_image(tmp_path, "child-full", FEATURES["ext4"], size=64 * MiB)
    volume = partition_volume(image, tmp_path, 1)
    room = free_blocks(volume) * 4096
    local = tmp_path / "payload.bin"
    with open(local, "wb") as f:
        f.truncate(room - 4096)  # the data alone fits; with its map it does not
    disk = open_image(str(image))
    try:
        overlay = Overlay(disk)
        with Source(local) as src, pytest.raises(VolumeFull, match="needs"):
            ext2fs.apply(overlay, VolumeMap.whole(MiB, 62 * MiB), [ext2fs.WriteFile("/big.bin", src)], str(image),
                         "ext4 on partition 1")
        assert not overlay.touched
    finally:
        disk.close()


def test_libext2fs_running_out_of_blocks_is_volume_full(tmp_path):
    """Past every check of ours: libext2fs's own EXT2_ET_BLOCK_ALLOC_FAIL (bytes written by ext2fs_file_write
    into a volume too small) is VolumeFull, with nothing put into the overlay."""
    from vhdtool.container.chain import open_image
    from vhdtool.container.overlay import Overlay
    from vhdtool.filesystem import ext2fs
    from vhdtool.volume.mapping import VolumeMap

    image = ext_image(tmp_path, "enospc", FEATURES["ext4"], size=16 * MiB)
    disk = open_image(str(image))
    try:
        overlay = Overlay(disk)
        with pytest.raises(VolumeFull, match="full"):
            ext2fs.apply(overlay, VolumeMap.whole(MiB, 14 * MiB), [ext2fs.WriteFile("/big.bin", bytes(20 * MiB))],
                         str(image), "ext4 on partition 1")
        assert not overlay.touched
    finally:
        disk.close()


# -- memory --------------------------------------------------------------------------------------------------

RSS_LIMIT = 160 * MiB


def test_memory_does_not_grow_with_the_payload(tmp_path):
    """A 256 MiB copy-in and its --dry-run: the peak RSS of every process (parent, hasher, libext2fs child) is far
    below the payload's size, and the image file grows by the payload once."""
    image = ext_image(tmp_path, "memory", FEATURES["ext4"], size=320 * MiB)
    local = payload_file(tmp_path / "local" / "payload.bin", 256 * MiB - 1, seed=256)
    want = file_sha(local)
    before, grown_from = digest(image), image.stat().st_blocks * 512
    res, dry_peak = measured("copy-in", "--dry-run", "--json", image, local, "/opt/payload")
    assert res.returncode == 0, res.stderr
    assert digest(image) == before
    t0 = time.monotonic()
    res, peak = measured("copy-in", "--json", image, local, "/opt/payload")
    took = time.monotonic() - t0
    assert res.returncode == 0, res.stderr
    grown = image.stat().st_blocks * 512 - grown_from
    print(f"\next4 256 MiB copy-in: {took:.1f} s, peak RSS {peak // MiB} MiB (dry-run {dry_peak // MiB} MiB), "
          f"image grew {grown // MiB} MiB")
    assert peak < RSS_LIMIT and dry_peak < RSS_LIMIT, (peak, dry_peak)
    assert grown < 256 * MiB * 1.1 + 8 * MiB
    volume = partition_volume(image, tmp_path, 1)
    e2fsck_clean(volume)
    assert dumped_sha(volume, GUEST, tmp_path) == want


# -- LVM: a volume in two runs of its physical volume ----------------------------------------------------------

def test_a_streamed_file_on_the_lvm_fixture(tmp_path):
    from conftest import work_copy
    from judges.linux import logical_volumes as judged_lvs

    image = work_copy("debian-lvm-ext4", tmp_path)
    pv = partition_volume(image, tmp_path, 1)
    _size, volumes = judged_lvs(pv, tmp_path / "before")
    room = free_blocks(volumes["vg0/root"][1]) * 4096
    local = patterned(tmp_path / "local" / "payload.bin", min(room // 2, 24 * MiB) + 333)
    code, _out, err = run_cli("copy-in", image, local, "/opt/payload")
    assert code == 0, err
    image_ok(image)
    pv = partition_volume(image, tmp_path, 1)
    _size, volumes = judged_lvs(pv, tmp_path / "after")
    root = volumes["vg0/root"][1]
    e2fsck_clean(root)
    assert dumped_sha(root, GUEST, tmp_path) == dissect_sha(root, GUEST) == file_sha(local)


# -- crash safety --------------------------------------------------------------------------------------------

# The fixed VHDX by default: its payload goes in place, before the log, into blocks the old state leaves free
# (the parent's check of them, extbitmap, decides that). The dynamic VHDX appends new blocks instead.
SWEPT = [pytest.param("fixed", REDUCED, id=f"fixed-{REDUCED}"),
         pytest.param("dynamic", REDUCED, id=f"dynamic-{REDUCED}", marks=pytest.mark.slow)] + [
    pytest.param(kind, FULL, id=f"{kind}-{FULL}", marks=pytest.mark.slow) for kind in ("fixed", "dynamic")]
RANDOM_KILLS = 10
PIECE = 256 * 1024  # the writers' copy piece in the crash runs: many copy_file_range calls from a small payload


def guest_state(image: Path, tmp: Path) -> tuple[dict, str | None]:
    """(tree but the payload's folder, payload sha256 or None) after qemu-img replays the log, e2fsck clean."""
    seen = tmp / "seen.vhdx"
    shutil.copyfile(image, seen)
    sh("qemu-img", "check", "-r", "all", seen, check=False)
    image_ok(seen)
    volume = partition_volume(seen, tmp, 1)
    try:
        e2fsck_clean(volume)
        tree = ext_tree(volume)
        return {p: v for p, v in tree.items() if not p.startswith("/opt")}, tree.get(GUEST, (None,) * 5)[4]
    finally:
        volume.unlink()
        seen.unlink()


@pytest.mark.parametrize("kind,sweep", SWEPT)
def test_kill_a_streamed_copy_in_at_every_write_flush_copy_and_rename(kind, sweep, tmp_path):
    """A 4 MiB file replaced by an 8 MiB one, copied 256 KiB per copy_file_range: SIGKILL at each counted call
    (the first, middle and last of each kind by default) and at random times; the guest is the old one or the
    new one, e2fsck clean, and a re-run gives the new one (after every kill in the full sweep)."""
    original = ext_image(tmp_path, "crash", FEATURES["ext4"], size=64 * MiB)
    if kind == "fixed":
        fixed = tmp_path / "fixed.vhdx"
        sh("qemu-img", "convert", "-O", "vhdx", "-o", "subformat=fixed", original, fixed)
        original = fixed
    old_local = payload_file(tmp_path / "old" / "payload.bin", 4 * MiB + 99, seed=1)
    assert copy_in(original, old_local)[0] == 0
    local = payload_file(tmp_path / "local" / "payload.bin", 8 * MiB + 4097, seed=14)
    args = ("copy-in", original, local, "/opt/payload")
    old_tree, old_sha = guest_state(original, tmp_path)
    assert old_sha == file_sha(old_local)
    want = file_sha(local)
    probe, trace = tmp_path / "probe.vhdx", tmp_path / "trace"
    shutil.copyfile(original, probe)
    res = run_job(args[0], probe, *args[2:], piece=PIECE, strace=["strace", "-f", "-o", str(trace), "-e",
                                                     "trace=" + ",".join(KILL_SYSCALLS)])
    assert res.returncode == 0, res.stderr
    counts = syscall_counts(trace)
    assert counts.get("copy_file_range", 0) >= 24, counts  # the payload went from its file, in many pieces
    assert guest_state(probe, tmp_path) == (old_tree, want)
    # Random kills fall inside a run without strace (which slows the run several times: kills timed by
    # the straced run mostly landed after the commit).
    shutil.copyfile(original, probe)
    t0 = time.monotonic()
    assert run_job(args[0], probe, *args[2:], piece=PIECE).returncode == 0
    counted = time.monotonic() - t0
    points = [(name, n) for name, total in counts.items() for n in range(1, total + 1)]
    assert len(points) >= 50, counts
    rnd = random.Random(1414)
    kills = [("syscall", p) for p in sweep_points(points, sweep)]
    kills += [("time", rnd.uniform(0.3, 1.0) * counted) for _ in range(RANDOM_KILLS if sweep == FULL else 2)]
    outcomes = {"old": 0, "new": 0}
    victim = tmp_path / "victim.vhdx"
    for how, point in kills:
        shutil.copyfile(original, victim)
        if how == "syscall":
            name, n = point
            res = run_job(args[0], victim, *args[2:], piece=PIECE,
                          strace=["strace", "-f", "-o", "/dev/null", "-e", f"inject={name}:signal=KILL:when={n}"])
            assert res.returncode != 0 or (name == "copy_file_range" and n >= counts[name] - 1), (point, res.stderr)
        else:
            proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "stream_job.py"), str(PIECE), args[0],
                                     str(victim), str(local), "/opt/payload"], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, env=job_env())
            time.sleep(point)
            proc.kill()
            proc.wait()
        tree, sha = guest_state(victim, tmp_path)
        assert tree == old_tree and sha in (old_sha, want), (how, point, sha)
        outcome = "old" if sha == old_sha else "new"
        outcomes[outcome] += 1
        if sweep == FULL or outcomes[outcome] == 1:  # the reduced sweep re-runs after the first of each outcome
            code, _out, err = run_cli(*args[:1], victim, *args[2:])
            assert code == 0, (how, point, err)
            assert guest_state(victim, tmp_path) == (old_tree, want), (how, point)
    assert outcomes["old"] and outcomes["new"], outcomes
    print(f"\next4 streamed copy-in, {kind} VHDX, {sweep}: {len(kills)} kills of {counts}, outcomes {outcomes}")


# A dynamic VHD commits through a copy of the image renamed over it (vhdtool/container/vhd/writer.py): its kill
# points are the copy, the writes into it, its fsync, the rename, the folder's fsync, and the unlink of a temp an
# earlier killed commit left (one is planted beside the image). Slow even reduced: each kill copies the image
# (measured: the reduced sweep takes well over the default run's few seconds a test).
VHD_KILL_SYSCALLS = KILL_SYSCALLS + ("unlink", "unlinkat")
VHD_SWEPT = [pytest.param(sweep, id=sweep, marks=pytest.mark.slow) for sweep in (REDUCED, FULL)]


def vhd_state(image: Path, tmp: Path) -> tuple[dict, str | None, Path]:
    """(tree but the payload's folder, payload sha256 or None, the volume file) as qemu-img's raw conversion of
    the VHD gives the volume (the caller removes it); e2fsck clean."""
    volume = partition_volume(image, tmp, 1)
    e2fsck_clean(volume)
    tree = ext_tree(volume)
    return {p: v for p, v in tree.items() if not p.startswith("/opt")}, tree.get(GUEST, (None,) * 5)[4], volume


def superblock_and_inode_tables(volume: Path) -> set[int]:
    """The blocks where two runs of the same change may differ by the time they ran (dumpe2fs says where)."""
    out = {0}
    for lo, hi in re.findall(r"Inode table at (\d+)-(\d+)", sh("dumpe2fs", volume).stdout.decode()):
        out.update(range(int(lo), int(hi) + 1))
    return out


def plant_stale_temp(image: Path) -> Path:
    """What a commit of ``image`` killed after step 3 leaves: a temp beside it, named as the writer names them."""
    stale = image.parent / f".{image.name}.vhdtool-{'0123456789abcdef'}.tmp"
    shutil.copyfile(image, stale)
    os.utime(stale, (time.time() - 3600,) * 2)
    return stale


def beside(image: Path) -> list[str]:
    return sorted(n for n in os.listdir(image.parent) if n != image.name)


@pytest.mark.parametrize("sweep", VHD_SWEPT)
def test_kill_a_streamed_copy_in_into_a_dynamic_vhd(sweep, tmp_path):
    """The 4 MiB file replaced by an 8 MiB one in a dynamic VHD (made by qemu-img), 256 KiB per copy_file_range,
    a stale temp beside it: SIGKILL at each counted call and at random times. The image is the old file byte
    for byte or the new state (qemu-img's raw volume e2fsck clean, the payload's sha256 right, the rest of the
    tree as it was); only temps of ours are left beside it, and a re-run removes them and gives the new state."""
    vhdx = ext_image(tmp_path, "crash", FEATURES["ext4"], size=64 * MiB)
    original = tmp_path / "orig.vhd"
    sh("qemu-img", "convert", "-f", "vhdx", "-O", "vpc", "-o", "subformat=dynamic", vhdx, original)
    old_local = payload_file(tmp_path / "old" / "payload.bin", 4 * MiB + 99, seed=1)
    assert copy_in(original, old_local)[0] == 0
    assert not [n for n in beside(original) if n.startswith(f".{original.name}")]
    local = payload_file(tmp_path / "local" / "payload.bin", 8 * MiB + 4097, seed=14)
    want, was = file_sha(local), digest(original)
    old_tree, old_sha, volume = vhd_state(original, tmp_path)
    volume.unlink()
    assert old_sha == file_sha(old_local)
    case = tmp_path / "case"
    case.mkdir()
    victim, trace = case / "disk.vhd", tmp_path / "trace"
    shutil.copyfile(original, victim)
    plant_stale_temp(victim)
    res = run_job("copy-in", victim, local, "/opt/payload", piece=PIECE,
                  strace=["strace", "-f", "-o", str(trace), "-e", "trace=" + ",".join(VHD_KILL_SYSCALLS)])
    assert res.returncode == 0, res.stderr
    counts = syscall_counts(trace, VHD_KILL_SYSCALLS)
    assert counts.get("copy_file_range", 0) >= 32, counts  # the payload went from its file, in many pieces
    assert counts.get("rename", 0) + counts.get("renameat", 0) + counts.get("renameat2", 0) >= 1, counts
    assert counts.get("unlink", 0) + counts.get("unlinkat", 0) >= 1, counts  # the stale temp went
    assert beside(victim) == []
    new_tree, new_sha, reference = vhd_state(victim, tmp_path)
    assert (new_tree, new_sha) == (old_tree, want)
    timed = superblock_and_inode_tables(reference)
    # How long a run takes without strace (which slows it down several times): random kills fall inside it.
    shutil.copyfile(original, victim)
    t0 = time.monotonic()
    assert run_job("copy-in", victim, local, "/opt/payload", piece=PIECE).returncode == 0
    plain = time.monotonic() - t0
    points = [(name, n) for name, total in counts.items() for n in range(1, total + 1)]
    rnd = random.Random(1415)
    kills = [("syscall", p) for p in sweep_points(points, sweep)]
    kills += [("time", rnd.uniform(0.3, 1.05) * plain) for _ in range(RANDOM_KILLS if sweep == FULL else 2)]
    outcomes = {"old": 0, "new": 0, "new byte-identical": 0, "new identical but times": 0, "temps left": 0,
                "own temp left": 0}
    new_at: list = []
    for how, point in kills:
        shutil.copyfile(original, victim)
        stale = plant_stale_temp(victim)
        if how == "syscall":
            name, n = point
            res = run_job("copy-in", victim, local, "/opt/payload", piece=PIECE,
                          strace=["strace", "-f", "-o", "/dev/null", "-e", f"inject={name}:signal=KILL:when={n}"])
            assert res.returncode != 0 or (name == "copy_file_range" and n >= counts[name] - 1), (point, res.stderr)
        else:
            proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "stream_job.py"), str(PIECE),
                                     "copy-in", str(victim), str(local), "/opt/payload"], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, env=job_env())
            time.sleep(point)
            proc.kill()
            proc.wait()
        why = (how, point)
        left = beside(victim)
        assert all(re.fullmatch(rf"\.{re.escape(victim.name)}\.vhdtool-[0-9a-f]{{16}}\.tmp", n) for n in left), \
            (why, left)
        tree, sha, volume = vhd_state(victim, tmp_path)
        assert tree == old_tree and sha in (old_sha, want), (why, sha)
        if sha == old_sha:
            assert digest(victim) == was, why  # the writer changed only its copy
            outcomes["old"] += 1
        else:
            assert left == [], why  # the stale temp went in step 2, this commit's own by the rename
            outcomes["new"] += 1
            new_at.append(point)
            # Against the uninterrupted run's volume: the same blocks but the superblock's and inodes' times.
            differ = set(differing_clusters(reference, volume))
            outcomes["new byte-identical"] += not differ
            outcomes["new identical but times"] += differ <= timed
        volume.unlink()
        outcomes["temps left"] += bool(left)
        outcomes["own temp left"] += bool(set(left) - {stale.name})  # killed between steps 3 and 6
        if sweep == FULL or outcomes["old" if sha == old_sha else "new"] == 1 or left:
            code, _out, err = copy_in(victim, local)
            assert code == 0, (why, err)
            tree, sha, volume = vhd_state(victim, tmp_path)
            volume.unlink()
            assert (tree, sha) == (old_tree, want), why
            assert beside(victim) == [], why
        for n in beside(victim):
            (case / n).unlink()
    assert outcomes["old"] and outcomes["new"], outcomes
    print(f"\next4 streamed copy-in, dynamic VHD, {sweep}: {len(kills)} kills of {counts}, outcomes {outcomes}, "
          f"new after {new_at}; a run takes {plain:.2f} s without strace")


# -- the child's answer is not trusted ---------------------------------------------------------------------

@pytest.mark.parametrize("ranges,needle", [
    ([[MiB, 4096, 0, 0]], None),
    ([[MiB - 512, 4096, 0, 0]], "outside the volume"),  # starts before the volume
    ([[63 * MiB - 512, 4096, 0, 0]], "outside the volume"),  # runs past its end
    ([[MiB + 1, 4096, 0, 0]], "outside the volume"),  # not on a sector
    ([[MiB, 4096, 0, 8 * MiB - 1024]], "does not have"),  # past the source's end
    ([[MiB, 4096, 1, 0]], "does not have"),  # no such source
    ([[MiB, 0, 0, 0]], "does not have"),
    ([[MiB, 4096, 0]], "malformed"),
    ([[MiB, -1, 0, 0]], "malformed"),
    ([[MiB, 4096, 0, True]], "malformed"),
    ({"a": 1}, "malformed"),
], ids=["sound", "before", "past-end", "unaligned", "past-source", "no-source", "empty", "short", "negative", "bool",
        "not-a-list"])
def test_source_ranges_from_the_child_are_checked(ranges, needle, tmp_path):
    from vhdtool.container.source import Source
    from vhdtool.errors import CorruptFilesystem
    from vhdtool.filesystem.answer import decode_runs, decode_sources
    from vhdtool.volume.mapping import VolumeMap

    local = tmp_path / "src.bin"
    local.write_bytes(bytes(8 * MiB))
    vmap = VolumeMap.whole(MiB, 62 * MiB)
    with Source(local) as src:
        if needle is None:
            (extent,) = decode_sources(ranges, [src], vmap.holds, 512, "img", "libext2fs")
            assert (extent.offset, len(extent.data), extent.data.offset) == (MiB, 4096, 0)
        else:
            with pytest.raises(CorruptFilesystem, match=needle):
                decode_sources(ranges, [src], vmap.holds, 512, "img", "libext2fs")
    assert decode_runs([[MiB, 4096]], "img", "libext2fs") == [(MiB, MiB + 4096)]
    for bad in ([[MiB]], [[MiB, -5]], [["1", 2]], "x"):
        with pytest.raises(CorruptFilesystem, match="malformed"):
            decode_runs(bad, "img", "libext2fs")


# -- the parent's own reading of the old free blocks --------------------------------------------------------

def dumpe2fs_free(volume: Path) -> set[int]:
    out = set()
    for m in re.finditer(r"^\s+Free blocks: (.*)$", sh("dumpe2fs", volume).stdout.decode(), re.M):
        for part in filter(None, (p.strip() for p in m.group(1).split(","))):
            lo, _, hi = part.partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    return out


@pytest.mark.parametrize("layout", ["ext4", "ext4-1k-linear-dirs", "ext4-no-csum", "ext3", "ext4-meta-bg"])
def test_old_free_blocks_never_call_a_used_block_free(layout, tmp_path):
    """OldFreeBlocks against dumpe2fs's per-group free lists: every block it calls free is free (BLOCK_UNINIT
    groups included), and it finds most of them (meta_bg: none, on purpose)."""
    from vhdtool.filesystem.extbitmap import OldFreeBlocks

    image = ext_image(tmp_path, layout, FEATURES[layout], size=96 * MiB)
    volume = partition_volume(image, tmp_path, 1)
    data = volume.read_bytes()
    old = OldFreeBlocks(lambda at, n: data[at : at + n], data[1024:2048])
    found = {b for first, n in old.free_runs(old.first, old.count - old.first) for b in range(first, first + n)}
    truth = dumpe2fs_free(volume)
    assert found <= truth, sorted(found - truth)[:10]
    if layout == "ext4-meta-bg":
        assert not found
    else:
        assert len(found) > 0.95 * len(truth), (len(found), len(truth))
