#!/usr/bin/env python3
"""Benchmark the write engine: `vhdtool copy-in` of a 10 MiB and a 100 MiB file into a 127 GiB dynamic VHDX.

Uses the Windows guest bench/inspect_time.py builds (NTFS by mkntfs and ntfs-3g, a
69.5 MiB SOFTWARE hive, the real Windows 10 SYSTEM hive, qemu-img's dynamic
VHDX). Each run works on a fresh sparse copy of the image and prints the whole
process's wall time, the bytes vhdtool wrote to the image file (its --json
report, cross-checked with what the file allocates) divided by the size of what was
copied, and the same for a second, identical run (which must write nothing).
Where libguestfs is installed, virt-copy-in does the same copy on another copy.

    python3 bench/write.py [--runs N] [--cache DIR]

(``bench/run.py`` runs this with the other benchmarks and prints one table.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import guestfs_setup, load, sparse_copy

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
GUEST_DIR = "C:\\Windows\\Temp"  # virt-copy-in copies into the same folder


def ensure_image(cache: Path) -> Path:
    """The 127 GiB dynamic VHDX with the Windows Server 2012 R2 guest (built once, cached)."""
    bi = load("inspect_time")
    cache.mkdir(parents=True, exist_ok=True)
    part = bi.build_partition(cache)
    return bi.build_image(cache, "127GiB", bi.SIZES["127GiB"], part)


def copy_in(image: Path, local: Path) -> tuple[float, dict]:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-I", "-m", "vhdtool.cli.main", "copy-in", "--json", str(image), str(local),
                          GUEST_DIR], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"copy-in failed: {res.stderr.strip()}")
    return wall, json.loads(res.stdout)


def virt_copy_in(image: Path, local: Path, timeout: float | None = None) -> float | None:
    """Seconds of ``virt-copy-in`` of the same file into the same folder (None: not installed or failed)."""
    if not shutil.which("virt-copy-in"):
        return None
    t0 = time.perf_counter()
    try:
        res = subprocess.run(["virt-copy-in", "--format=vhdx", "-a", str(image), str(local), "/Windows/Temp"],
                             capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        print(f"bench: virt-copy-in failed: {res.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    return wall


def measure(image: Path, local: Path, runs: int, workdir: Path, with_guestfs: bool = True,
            guestfs_timeout: float | None = None) -> dict:
    """``runs`` copy-ins of ``local``, each into a fresh sparse copy of ``image``, each followed by the same
    copy again (which must write nothing); median wall time, bytes written, and virt-copy-in's time."""
    size = local.stat().st_size
    walls, written, again_walls, again_written = [], [], [], []
    work = workdir / "work-copy-in.vhdx"
    for _ in range(runs):
        sparse_copy(image, work)
        try:
            before = work.stat().st_blocks * 512
            wall, doc = copy_in(work, local)
            again_wall, again = copy_in(work, local)
            # The file may grow by whole new blocks; what it allocates cannot exceed what was written.
            growth = work.stat().st_blocks * 512 - before
            if growth > doc["bytes_written"] + 64 * 1024:
                raise RuntimeError(f"copy-in: the file grew by {growth} bytes, {doc['bytes_written']} reported written")
        finally:
            work.unlink(missing_ok=True)
        walls.append(wall)
        written.append(doc["bytes_written"])
        again_walls.append(again_wall)
        again_written.append(again["bytes_written"])
    out = {"size": size, "walls": walls, "wall": statistics.median(walls), "written": statistics.median(written),
           "again_wall": statistics.median(again_walls), "again_written": max(again_written)}
    out["amplification"] = out["written"] / size
    out["virt_copy_in"] = None
    if with_guestfs and shutil.which("virt-copy-in"):
        sparse_copy(image, work)
        try:
            out["virt_copy_in"] = virt_copy_in(work, local, guestfs_timeout)
        finally:
            work.unlink(missing_ok=True)
    return out


def services(image: Path, workdir: Path) -> list[tuple[list[str], float, dict]]:
    """``services --disable vmictimesync`` then ``--enable`` on a fresh copy: (args, wall, report) each."""
    work = workdir / "work-services.vhdx"
    sparse_copy(image, work)
    out = []
    try:
        for args in (["--disable", "vmictimesync"], ["--enable", "vmictimesync"]):
            t0 = time.perf_counter()
            res = subprocess.run([sys.executable, "-I", "-m", "vhdtool.cli.main", "services", "--json", str(work), *args],
                                 capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if res.returncode != 0:
                raise RuntimeError(f"services failed: {res.stderr.strip()}")
            out.append((args, wall, json.loads(res.stdout)))
    finally:
        work.unlink(missing_ok=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cache", type=Path, default=ROOT / "bench" / ".cache")
    args = ap.parse_args()
    print("libguestfs:", guestfs_setup()[1])
    image = ensure_image(args.cache)
    print(f"image: {image} ({image.stat().st_size / MiB:.0f} MiB file, 127 GiB virtual)")
    print(f"{'file':>8} {'run':>4} {'wall s':>8} {'written MiB':>12} {'ratio':>7} {'overhead MiB':>13} {'again s':>8} {'again written':>14}")
    with tempfile.TemporaryDirectory(dir=args.cache) as tmp:
        tmp = Path(tmp)
        for size_mib in (10, 100):
            local = tmp / f"payload-{size_mib}M.bin"
            local.write_bytes(os.urandom(size_mib * MiB))
            m = measure(image, local, args.runs, tmp)
            for run, wall in enumerate(m["walls"]):
                print(f"{size_mib:>6}Mi {run + 1:>4} {wall:>8.2f}")
            print(f"{size_mib:>6}Mi {'med':>4} {m['wall']:>8.2f} {m['written'] / MiB:>12.1f} {m['amplification']:>7.3f} "
                  f"{(m['written'] - m['size']) / MiB:>13.2f} {m['again_wall']:>8.2f} {m['again_written']:>14}")
            if m["virt_copy_in"] is not None:
                print(f"{'':>8} virt-copy-in: {m['virt_copy_in']:.2f} s")
        # services: one REG_DWORD in the SYSTEM hive (the real Windows 10 one, 10 MiB), and back.
        for sargs, wall, doc in services(image, tmp):
            print(f"services {' '.join(sargs)}: {wall:.2f} s, {doc['bytes_written'] / 1024:.0f} KiB written, "
                  f"{len(doc['changes']['registry'])} value(s) changed")
    if not shutil.which("virt-copy-in"):
        print("virt-copy-in (libguestfs) is not installed: no comparison with it.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
