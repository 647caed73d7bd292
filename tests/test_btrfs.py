"""Btrfs is named and refused clearly: vhdtool neither reads nor writes it.

The disk is made by the real tools (qemu-img, sfdisk, mkfs.btrfs); the refusals must leave the
image byte-identical and name what vhdtool does read and write.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from conftest import assert_one_line_error, digest

pytestmark = pytest.mark.skipif(shutil.which("mkfs.btrfs") is None, reason="btrfs-progs is not installed")
MiB = 1024 * 1024


def btrfs_disk(tmp_path, fmt: str):
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(200 * MiB)
    subprocess.run(["sfdisk", "--no-reread", "--no-tell-kernel", str(raw)], input="label: dos\nstart=2048, type=83\n",
                   text=True, check=True, capture_output=True)
    vol = tmp_path / "vol.img"
    with open(vol, "wb") as f:
        f.truncate(200 * MiB - MiB)
    subprocess.run(["mkfs.btrfs", "-q", "-f", str(vol)], check=True, capture_output=True)
    with open(raw, "r+b") as f, open(vol, "rb") as v:
        f.seek(MiB)
        shutil.copyfileobj(v, f, 8 * MiB)
    image = tmp_path / f"disk.{'vhd' if fmt == 'vpc' else fmt}"
    subprocess.run(["qemu-img", "convert", "-O", fmt, str(raw), str(image)], check=True, capture_output=True)
    return image


@pytest.mark.parametrize("fmt", ["vhdx", "vpc"])
def test_btrfs_is_named_and_every_write_refused(fmt, cli, tmp_path):
    image = btrfs_disk(tmp_path, fmt)
    code, out, err = cli("inspect", "--json", image)
    assert code == 0, err
    assert [p["filesystem"] for p in json.loads(out)["partitions"]] == ["btrfs"]
    before = digest(image)
    local = tmp_path / "x.txt"
    local.write_bytes(b"x")
    for args in (("services", image, "--disable", "kvp"), ("copy-in", "--partition", "1", image, local, "/x"),
                 ("status", image)):
        code, out, err = cli(*args)
        assert_one_line_error(code, out, err, image)
        assert code == 5 and "btrfs" in err.lower(), (args, code, err)
        assert "ext2/3/4" in err, err
    assert digest(image) == before
