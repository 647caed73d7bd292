#!/usr/bin/env python3
"""Benchmark streamed copy-in into ext4 (issue 14): wall time against dd, and the process tree's peak memory.

A disk of one MBR partition holding ext4 (sfdisk, mkfs.ext4 -E offset on a sparse raw file) is
converted by qemu-img into a dynamic VHDX, a fixed VHDX and a dynamic VHD, each with room for the
largest payload. For each payload (random bytes beside the images) it times, in one run:

- the baseline: ``dd if=PAYLOAD of=X bs=1M conv=fsync`` onto the same filesystem;
- per container, on a fresh copy: ``vhdtool copy-in --partition 1``'s wall time, its ratio to dd and
  the peak memory of its process tree (bench/treemem.py: the sums of VmRSS and Pss every 20 ms, and
  the kernel's ru_maxrss of its largest process).

Each result is judged by tools other than vhdtool: ``qemu-img check`` (VHDX), ``e2fsck -fn`` of the
partition extracted through qemu's driver, and ``debugfs -R dump`` of the file against the payload's
sha256.

    python3 bench/ext4write.py [--sizes 100M,1G,4G] [--formats vhdx-dynamic,vhdx-fixed,vhd] [--dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from treemem import run_sampled

ROOT = Path(__file__).resolve().parent.parent
MiB, GiB = 1 << 20, 1 << 30
FORMATS = {"vhdx-dynamic": ("vhdx", "subformat=dynamic", ".vhdx"), "vhdx-fixed": ("vhdx", "subformat=fixed", ".vhdx"),
           "vhd": ("vpc", "subformat=dynamic", ".vhd")}


def run(*cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, **kw)


def make_images(work: Path, volume: int, formats: list[str]) -> dict[str, Path]:
    raw = work / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(volume + 2 * MiB)
    run("sfdisk", "-q", raw, input=b"label: dos\nunit: sectors\nstart=2048, type=83\n")
    run("mkfs.ext4", "-q", "-F", "-E", f"offset={MiB}", raw, f"{volume // 1024}k")
    out = {}
    for name in formats:
        fmt, opts, suffix = FORMATS[name]
        out[name] = work / f"ext4-{name}{suffix}"
        run("qemu-img", "convert", "-f", "raw", "-O", fmt, "-o", opts, raw, out[name])
    raw.unlink()
    return out


def make_payload(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for at in range(0, size, 16 * MiB):
            chunk = os.urandom(min(16 * MiB, size - at))
            h.update(chunk)
            f.write(chunk)
    return h.hexdigest()


def dd(payload: Path, work: Path) -> float:
    out = work / "dd.out"
    run("sync")
    t0 = time.perf_counter()
    run("dd", f"if={payload}", f"of={out}", "bs=1M", "conv=fsync", "status=none")
    took = time.perf_counter() - t0
    out.unlink()
    return took


def judge(image: Path, qfmt: str, sha: str, work: Path) -> str:
    if qfmt == "vhdx":
        run("qemu-img", "check", image)
    raw, volume, dumped = work / "judge.raw", work / "judge.vol", work / "judge.bin"
    run("qemu-img", "convert", "-f", qfmt, "-O", "raw", image, raw)
    run("dd", f"if={raw}", f"of={volume}", "bs=1M", "skip=1", "conv=sparse", "status=none")
    raw.unlink()
    try:
        if subprocess.run(["e2fsck", "-fn", str(volume)], capture_output=True).returncode != 0:
            return "e2fsck FAILED"
        run("debugfs", "-R", f"dump /payload/payload.bin {dumped}", volume)
        h = hashlib.sha256()
        with open(dumped, "rb") as f:
            for chunk in iter(lambda: f.read(16 * MiB), b""):
                h.update(chunk)
        return "e2fsck clean, sha256 ok" if h.hexdigest() == sha else "sha256 MISMATCH"
    finally:
        for p in (volume, dumped):
            p.unlink(missing_ok=True)


def parse_size(text: str) -> int:
    units = {"M": MiB, "G": GiB}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100M,1G,4G")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--dir", type=Path, default=None, help="where images and payloads go (default: a temp folder)")
    args = ap.parse_args()
    sizes, formats = [parse_size(s) for s in args.sizes.split(",")], args.formats.split(",")
    work = Path(tempfile.mkdtemp(prefix="ext4write-", dir=args.dir))
    vhdtool = [sys.executable, "-m", "vhdtool.cli.main"]
    rows = []
    try:
        images = make_images(work, max(sizes) + 512 * MiB, formats)
        for size in sizes:
            payload = work / "payload.bin"
            sha = make_payload(payload, size)
            base = dd(payload, work)
            for name, image in images.items():
                copy = work / f"copy{image.suffix}"
                shutil.copyfile(image, copy)
                run("sync")
                with open(work / "log", "w") as log:
                    wall, code, mem = run_sampled([*vhdtool, "copy-in", "--partition", "1", str(copy), str(payload),
                                                   "/payload"], stdout=log, stderr=log, cwd=ROOT)
                verdict = judge(copy, FORMATS[name][0], sha, work) if code == 0 else f"exit {code}"
                rows.append((size, name, wall, base, mem.rss, mem.pss, mem.kernel_max_single, verdict))
                print(f"{size // MiB:>6} MiB {name:<13} copy-in {wall:6.2f} s  dd {base:6.2f} s  "
                      f"ratio {wall / base:5.2f}  tree RSS {mem.rss // MiB:4} MiB  PSS {mem.pss // MiB:4} MiB  "
                      f"largest process {mem.kernel_max_single // MiB:4} MiB  {verdict}", flush=True)
                copy.unlink()
            payload.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r[-1].startswith("e2fsck clean") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
