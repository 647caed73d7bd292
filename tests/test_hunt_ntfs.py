"""Adversarial copy-in into NTFS volumes laid out as real disks are, judged by tools we did not write.

The data disks are built here as an operator builds them (mkntfs with a chosen cluster
size, sfdisk with a chosen first sector, qemu-img convert to VHDX), and every written
image is judged by qemu-img check, ntfs-3g's ntfscat and dissect.ntfs (sha256 of the
copied file equal to the local file's).

- A partition that does not start on a 4 KiB boundary (the 63-sector MBR layout of older
  Windows disks, P2V conversions): the VHDX log's 4 KiB sectors then straddle a cluster the
  payload goes into directly and one whose change is logged.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import run_cli
from judges.volumes import extract_partition, ntfscat, raw_image

MiB = 1024 * 1024


def ntfs_disk(folder: Path, part_mib: int, *, cluster: int = 4096, start: int = 2048,
              opts: str = "subformat=fixed", name: str = "disk") -> Path:
    """A VHDX data disk of one NTFS partition of ``part_mib`` MiB at sector ``start`` (mkntfs -c ``cluster``,
    sfdisk, qemu-img convert with ``opts``)."""
    work = folder / f".{name}-build"
    work.mkdir()
    part, raw = work / "part.img", work / "raw.img"
    with open(part, "wb") as f:
        f.truncate(part_mib * MiB)
    subprocess.run(["mkntfs", "-Q", "-F", "-q", "-c", str(cluster), "-L", "Data", str(part)], check=True,
                   capture_output=True)
    with open(raw, "wb") as f:
        f.truncate((part_mib + 2) * MiB)
    subprocess.run(["sfdisk", "-q", str(raw)], input=f"label: dos\nstart={start}, size={part_mib * 2048}, type=7\n",
                   text=True, check=True, capture_output=True)
    subprocess.run(["dd", f"if={part}", f"of={raw}", "bs=512", f"seek={start}", "conv=notrunc,sparse",
                    "status=none"], check=True)
    out = folder / f"{name}.vhdx"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vhdx", "-o", opts, str(raw), str(out)], check=True)
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
            entry = NTFS(f).mft.get(guest.strip("/").replace("/", "\\"))
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
