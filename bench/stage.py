#!/usr/bin/env python3
"""Benchmark `vhdtool stage`: a 10 MB and a 100 MB integration services cab into a 127 GiB dynamic VHDX.

The guest is built as bench/inspect.py builds its own (a ~70 MB SOFTWARE hive
made with hivexsh, the real Windows 10 SYSTEM hive, NTFS by mkntfs and ntfs-3g,
qemu-img's dynamic VHDX), but says Windows Server 2008 R2 with integration
services 6.1.7601.17514 and has C: in MountedDevices, so that a Windows 8 host's
6.1 cab (made by gcab, with an update.mum and a stored random payload) is staged. Each run stages into a fresh sparse copy and prints the whole process's wall
time and the bytes written to the image per byte of cab (write amplification);
a second, identical run must write nothing. Where libguestfs is installed,
virt-customize --upload and virt-win-reg --merge are timed on the same change.

    python3 bench/stage.py [--runs N] [--cache DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

# This folder holds inspect.py, which would shadow the standard library's inspect.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MiB = 1024 * 1024


def bench_inspect():
    spec = importlib.util.spec_from_file_location("bench_inspect", ROOT / "bench" / "inspect.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    from fixtures.cabs import CabSpec, build_cab

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cache", type=Path, default=ROOT / "bench" / ".cache")
    args = ap.parse_args()
    bi = bench_inspect()
    args.cache.mkdir(parents=True, exist_ok=True)
    part = bi.build_partition(args.cache, ("Windows Server 2008 R2 Datacenter", "6.1", "7601", "x64"),
                              "6.1.7601.17514", name="ws2008r2-ntfs.img", drive_c=True)
    image = bi.build_image(args.cache, "127GiB", bi.SIZES["127GiB"], part, prefix="ws2008r2")
    print(f"image: {image} ({image.stat().st_size / MiB:.0f} MiB file, 127 GiB virtual)")
    print(f"{'cab':>8} {'run':>4} {'wall s':>8} {'written MiB':>12} {'amplification':>14} {'again s':>8} {'again written':>14}")
    with tempfile.TemporaryDirectory(dir=args.cache) as tmp:
        tmp = Path(tmp)
        for size_mb in (10, 100):
            cabs = tmp / f"cabs-{size_mb}"
            cab = build_cab(CabSpec("6.1", "x64", "6.2.9200.16384"), cabs, payload_size=size_mb * 1000 * 1000)
            walls = []
            for run in range(args.runs):
                work = tmp / "work.vhdx"
                subprocess.run(["cp", "--sparse=always", "--reflink=auto", str(image), str(work)], check=True)
                cmd = [sys.executable, "-I", "-m", "vhdtool.cli.main", "stage", "--json", str(work), "--host", "win8",
                       "--cabs", str(cabs)]
                t0 = time.perf_counter()
                res = subprocess.run(cmd, capture_output=True, text=True)
                wall = time.perf_counter() - t0
                if res.returncode != 0 or not json.loads(res.stdout)["staged"]:
                    raise SystemExit(f"stage failed: {res.stderr.strip() or res.stdout[:400]}")
                written = json.loads(res.stdout)["bytes_written"]
                t0 = time.perf_counter()
                again = json.loads(subprocess.run(cmd, capture_output=True, text=True).stdout)
                again_wall = time.perf_counter() - t0
                walls.append(wall)
                print(f"{size_mb:>6}MB {run + 1:>4} {wall:>8.2f} {written / MiB:>12.1f} "
                      f"{written / cab.stat().st_size:>14.3f} {again_wall:>8.2f} {again['bytes_written']:>14}")
                work.unlink()
            print(f"{'':>8} median wall {statistics.median(walls):.2f} s")
    if not (shutil.which("virt-customize") and shutil.which("virt-win-reg")):
        print("virt-customize / virt-win-reg (libguestfs) are not installed: no comparison with them.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
