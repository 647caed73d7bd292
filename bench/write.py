#!/usr/bin/env python3
"""Benchmark the write engine: `vhdtool copy-in` of a 10 MiB and a 100 MiB file into a 127 GiB dynamic VHDX.

Uses the Windows guest bench/inspect.py builds (NTFS by mkntfs and ntfs-3g, a
69.5 MiB SOFTWARE hive, the real Windows 10 SYSTEM hive, qemu-img's dynamic
VHDX). Each run works on a fresh sparse copy of the image and prints the whole
process's wall time, the bytes vhdtool wrote to the image file (its --json
report, cross-checked with what the file allocates) divided by the size of what was
copied, and the same for a second, identical run (which must write nothing).
Where libguestfs is installed, virt-copy-in does the same copy on another copy.

    python3 bench/write.py [--runs N] [--cache DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


def bench_inspect():
    spec = importlib.util.spec_from_file_location("bench_inspect", ROOT / "bench" / "inspect.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sparse_copy(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "--sparse=always", "--reflink=auto", str(src), str(dst)], check=True)


def copy_in(image: Path, local: Path) -> tuple[float, dict]:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-I", "-m", "vhdtool.cli.main", "copy-in", "--json", str(image), str(local),
                          "C:\\Windows\\Temp\\bench"], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"copy-in failed: {res.stderr.strip()}")
    return wall, json.loads(res.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cache", type=Path, default=ROOT / "bench" / ".cache")
    args = ap.parse_args()
    bi = bench_inspect()
    args.cache.mkdir(parents=True, exist_ok=True)
    part = bi.build_partition(args.cache)
    image = bi.build_image(args.cache, "127GiB", bi.SIZES["127GiB"], part)
    print(f"image: {image} ({image.stat().st_size / MiB:.0f} MiB file, 127 GiB virtual)")
    print(f"{'file':>8} {'run':>4} {'wall s':>8} {'written MiB':>12} {'ratio':>7} {'overhead MiB':>13} {'again s':>8} {'again written':>14}")
    with tempfile.TemporaryDirectory(dir=args.cache) as tmp:
        tmp = Path(tmp)
        for size_mib in (10, 100):
            local = tmp / f"payload-{size_mib}M.bin"
            local.write_bytes(os.urandom(size_mib * MiB))
            walls = []
            for run in range(args.runs):
                work = tmp / "work.vhdx"
                sparse_copy(image, work)
                before = work.stat().st_blocks * 512
                wall, doc = copy_in(work, local)
                again_wall, again = copy_in(work, local)
                written = doc["bytes_written"]
                # The file may grow by whole new blocks; what it allocates cannot exceed what was written.
                growth = work.stat().st_blocks * 512 - before
                assert growth <= written + 64 * 1024, (growth, written)
                walls.append(wall)
                print(f"{size_mib:>6}Mi {run + 1:>4} {wall:>8.2f} {written / MiB:>12.1f} {written / local.stat().st_size:>7.3f} "
                      f"{(written - local.stat().st_size) / MiB:>13.2f} {again_wall:>8.2f} {again['bytes_written']:>14}")
                work.unlink()
            print(f"{'':>8} median wall {statistics.median(walls):.2f} s")
            if shutil.which("virt-copy-in"):
                work = tmp / "work.vhdx"
                sparse_copy(image, work)
                t0 = time.perf_counter()
                subprocess.run(["virt-copy-in", "-a", str(work), str(local), "/Windows/Temp"], check=True)
                print(f"{'':>8} virt-copy-in: {time.perf_counter() - t0:.2f} s")
                work.unlink()
        # services: one REG_DWORD in the SYSTEM hive (the real Windows 10 one, 10 MiB), and back.
        work = tmp / "work.vhdx"
        sparse_copy(image, work)
        for args in (["--disable", "vmictimesync"], ["--enable", "vmictimesync"]):
            t0 = time.perf_counter()
            res = subprocess.run([sys.executable, "-I", "-m", "vhdtool.cli.main", "services", "--json", str(work), *args],
                                 capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if res.returncode != 0:
                raise SystemExit(f"services failed: {res.stderr.strip()}")
            doc = json.loads(res.stdout)
            print(f"services {' '.join(args)}: {wall:.2f} s, {doc['bytes_written'] / 1024:.0f} KiB written, "
                  f"{len(doc['changes']['registry'])} value(s) changed")
        work.unlink()
        if shutil.which("virt-win-reg"):
            print("virt-win-reg --merge is installed but not compared here yet")
    if not shutil.which("virt-copy-in"):
        print("virt-copy-in (libguestfs) is not installed: no comparison with it.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
