"""Judging a disk image's volumes with tools other than vhdtool: qemu-img for the container, sfdisk for
the partition table, ntfs-3g's ntfscat for files, dissect.ntfs to hash a whole volume tree."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path

from judges.tools import sh


def raw_image(image: Path, out: Path, fmt: str | None = None) -> Path:
    cmd = ["qemu-img", "convert"] + (["-f", fmt] if fmt else []) + ["-O", "raw", str(image), str(out)]
    subprocess.run(cmd, check=True, capture_output=True)
    return out


def partition_table(raw: Path) -> dict:
    """sfdisk's JSON dump of the table (type, start, size, ids): what must stay the same, file names left out."""
    table = json.loads(sh("sfdisk", "-J", raw).stdout)["partitiontable"]
    table.pop("device", None)
    for p in table["partitions"]:
        p.pop("node", None)
    return table


def extract_partition(raw: Path, number: int, out: Path) -> Path:
    table = partition_table(raw)
    part = table["partitions"][number - 1]
    sector = table.get("sectorsize", 512)
    with open(raw, "rb") as fi, open(out, "wb") as fo:
        fi.seek(part["start"] * sector)
        left = part["size"] * sector
        while left:
            chunk = fi.read(min(left, 8 << 20))
            if not chunk:
                break
            fo.write(chunk)
            left -= len(chunk)
    return out


def partition_volume(image: Path, tmp: Path, number: int) -> Path:
    """Partition ``number`` of ``image`` as a volume file in ``tmp`` (through a raw conversion by qemu-img)."""
    raw = raw_image(image, tmp / f"{image.name}.{time.monotonic_ns()}.raw")
    part = extract_partition(raw, number, tmp / f"{raw.name}.p{number}")
    raw.unlink()
    return part


def ntfs_names(volume: Path, folder: str) -> list[str]:
    """The names in a folder of an NTFS volume file, as ntfsls lists them (sorted, no . and ..)."""
    out = sh("ntfsls", "-f", "-a", volume, "-p", folder).stdout.decode()
    return sorted(n for n in out.splitlines() if n not in (".", ".."))


def mft_record(volume: Path, path: str) -> int:
    """The MFT record number of ``path``, as ntfsinfo gives it."""
    return int(sh("ntfsinfo", "-f", "-F", path, volume).stdout.decode().split("Dumping Inode ", 1)[1].split()[0])


def record_in_use(volume: Path, record: int) -> bool:
    res = sh("ntfsinfo", "-f", "-i", record, volume, check=False)
    return res.returncode == 0 and b"Dumping Inode" in res.stdout  # a free record: "Error loading node", exit 0


def ntfscat(volume: Path, path: str) -> bytes:
    return sh("ntfscat", "-f", volume, path).stdout


def ntfs_tree(volume: Path) -> dict[str, str]:
    """Every directory and file of an NTFS volume image (system files included): path -> sha256 of its data,
    or "dir"; read with dissect.ntfs."""
    from dissect.ntfs import NTFS
    from dissect.ntfs.exceptions import FileNotFoundError

    out: dict[str, str] = {}
    with open(volume, "rb") as f:
        fs = NTFS(f)

        def walk(record, prefix: str) -> None:
            for name, index_entry in sorted(record.listdir(ignore_dos=True).items()):
                if name in (".", ".."):
                    continue
                path = f"{prefix}/{name}"
                entry = index_entry.dereference()
                if entry.is_dir():
                    out[path] = "dir"
                    if len(out) < 100_000:
                        walk(entry, path)
                else:
                    try:
                        out[path] = hashlib.sha256(entry.open().read()).hexdigest()
                    except FileNotFoundError:
                        out[path] = "no data stream"  # $Extend\$Quota and the like

        walk(fs.mft.root, "")
    return out


def security_descriptor(volume: Path, path: str) -> bytes:
    """The self-relative security descriptor of ``path``, as ntfs-3g's ntfssecaudit dumps it."""
    out = sh("ntfssecaudit", "-v", volume, path).stdout.decode()
    data = bytearray()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and len(parts[0]) == 6 and all(c in "0123456789abcdef" for c in parts[0]):
            for word in parts[1:]:
                data += bytes.fromhex(word)
    return bytes(data)


def dacl_aces(sd: bytes) -> list[tuple[int, int, bytes]]:
    """(type, flags, body) of each ACE of the DACL of a self-relative descriptor (MS-DTYP 2.4.6, 2.4.5)."""
    import struct

    dacl = struct.unpack_from("<I", sd, 16)[0]
    _rev, _sbz, _size, count, _sbz2 = struct.unpack_from("<BBHHH", sd, dacl)
    out, pos = [], dacl + 8
    for _ in range(count):
        kind, flags, size = struct.unpack_from("<BBH", sd, pos)
        out.append((kind, flags, sd[pos + 4 : pos + size]))
        pos += size
    return out
