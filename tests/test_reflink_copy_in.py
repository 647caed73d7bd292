"""A VHD copy-in on a filesystem with reflinks writes the payload once (issue 14, write amplification).

The VHD writer changes a copy of the image and renames it over the original. On a
filesystem that shares extents (XFS made with ``-m reflink=1``, btrfs) that copy is a
reflink (FICLONE), so the bytes that reach the disk are the payload's and a few
metadata blocks, not the image's data again. Each case loop-mounts a fresh filesystem
made by mkfs.xfs or mkfs.btrfs (root only; skipped with the reason otherwise), puts a
data disk built by sfdisk, mkntfs and qemu-img on it with 48 MiB of data already in
its volume, and copies in a 32 MiB file from outside the mount. What the copy-in wrote
is counted by the kernel, not by vhdtool: ``write_bytes`` of /proc/PID/io of a shell
that runs it (a waited-for child's I/O is added to its parent's, the sandbox child
included). The result is judged by ``qemu-img convert -f vpc`` and ntfscat's sha256.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from judges.volumes import extract_partition, ntfscat, raw_image
from test_stream_write import MiB, data_disk, file_sha, job_env, payload_file

PAYLOAD = 32 * MiB + 1
ALREADY = 48 * MiB  # data in the image before: what a full copy of it would write again
LIMIT = 1.1 * PAYLOAD + 8 * MiB  # the bound on write amplification
MKFS = {"xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"], "btrfs": ["mkfs.btrfs", "-q", "-f"]}


@contextlib.contextmanager
def loop_mount(fs: str, backing: Path, where: Path, size: int = 1024 * MiB):
    """A fresh ``fs`` filesystem in the sparse file ``backing``, loop-mounted at ``where``."""
    if os.geteuid() != 0:
        pytest.skip("a loop mount needs root")
    if not shutil.which(MKFS[fs][0]):
        pytest.skip(f"{MKFS[fs][0]} is not installed")
    with open(backing, "wb") as f:
        f.truncate(size)
    res = subprocess.run([*MKFS[fs], str(backing)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"{MKFS[fs][0]} failed: {res.stderr.strip()[-200:]}")
    where.mkdir()
    res = subprocess.run(["mount", "-o", "loop", str(backing), str(where)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot loop-mount {fs} here: {res.stderr.strip()[-200:]}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)
        backing.unlink()


def ntfscat_sha(volume: Path, path: str) -> str:
    return hashlib.sha256(ntfscat(volume, path)).hexdigest()


def kernel_counted(*args, io: Path) -> tuple[subprocess.CompletedProcess, dict[str, int]]:
    """``vhdtool ARGS`` run by a shell that then reads its own /proc/PID/io: the whole tree's I/O counters."""
    script = '"$@"; rc=$?; cat /proc/$$/io > "$IO_OUT"; exit $rc'
    cmd = ["sh", "-c", script, "sh", sys.executable, "-m", "vhdtool.cli.main", *map(str, args)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(job_env(), IO_OUT=str(io)), timeout=300)
    counters = dict(line.split(": ") for line in io.read_text().splitlines())
    return res, {k: int(v) for k, v in counters.items()}


@pytest.mark.parametrize("fs", ["xfs", "btrfs"])
def test_vhd_copy_in_on_a_reflink_filesystem_writes_the_payload_once(fs, tmp_path):
    with loop_mount(fs, tmp_path / f"{fs}.img", tmp_path / "mnt") as mnt:
        image = data_disk(mnt, "vhd", 160)
        already = payload_file(tmp_path / "local" / "already.bin", ALREADY, seed=11)
        res = subprocess.run([sys.executable, "-m", "vhdtool.cli.main", "copy-in", "--partition", "1", str(image),
                              str(already), "/Data"], capture_output=True, text=True, env=job_env(), timeout=300)
        assert res.returncode == 0, res.stderr
        # A copy of the image's data would by itself break the bound: the test can fail.
        assert image.stat().st_blocks * 512 + PAYLOAD > LIMIT

        local = payload_file(tmp_path / "local" / "payload.bin", PAYLOAD, seed=12)
        res, io = kernel_counted("copy-in", "--json", "--partition", "1", image, local, "/Data", io=tmp_path / "io")
        assert res.returncode == 0, res.stderr
        reported = json.loads(res.stdout)["bytes_written"]
        print(f"\n{fs}: write_bytes {io['write_bytes']} ({io['write_bytes'] / PAYLOAD:.3f}x the payload), "
              f"vhdtool's bytes_written {reported}, bound {LIMIT:.0f}")
        # The payload crossed filesystems, so it was really written: the counter is live.
        assert PAYLOAD <= io["write_bytes"] <= LIMIT
        assert reported <= LIMIT
        assert sorted(os.listdir(mnt)) == [image.name]  # no temp file left beside it

        raw = raw_image(image, tmp_path / "whole.raw", "vpc")
        volume = extract_partition(raw, 1, tmp_path / "part.raw")
        raw.unlink()
        assert ntfscat_sha(volume, "/Data/payload.bin") == file_sha(local)
        assert ntfscat_sha(volume, "/Data/already.bin") == file_sha(already)
