#!/usr/bin/env python3
"""Benchmark ``vhdtool inspect`` (issue 2): wall time and bytes read from the image.

Builds, with real tools, one Windows guest (a ~60 MB SOFTWARE hive made with
hivexsh, the real Windows 10 SYSTEM hive) on an NTFS partition made by mkntfs and
filled through ntfs-3g, and puts the same partition into dynamic VHDX images of
4 GiB, 127 GiB and 2 TiB virtual size (qemu-img). Then times the whole
``vhdtool inspect --json`` process on each, reads its byte count (counted in the
container layer, ``--stats``), and compares with a bare script that chains the
dissect libraries, and with virt-inspector where libguestfs is installed.

    python3 bench/inspect.py [--runs N] [--cache DIR]
"""

from __future__ import annotations

import argparse
import gzip
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
REAL = ROOT / "fixtures" / "real"
GiB = 1024**3
MiB = 1024**2
PARTITION_SIZE = 3 * GiB
SIZES = {"4GiB": 4 * GiB, "127GiB": 127 * GiB, "2TiB": 2048 * GiB}
PRODUCT = ("Windows Server 2012 R2 Datacenter", "6.3", "9600", "x64")


def run(*cmd, **kw):
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, **kw)


def hivexsh_script(lines: list[str], hive: Path) -> None:
    script = hive.with_suffix(".script")
    script.write_text("\n".join(lines + ["commit"]) + "\n")
    run("hivexsh", "-w", "-f", script, hive)


def build_software(path: Path) -> None:
    shutil.copyfile(REAL / "minimal", path)
    os.chmod(path, 0o644)
    product, version, build, _ = PRODUCT
    lines = ["cd \\"]
    for key in ("Microsoft", "Windows NT", "CurrentVersion"):
        lines += [f"add {key}", f"cd {key}"]
    lines += [
        "setval 6",
        "ProductName", f"string:{product}",
        "CurrentVersion", f"string:{version}",
        "CurrentBuildNumber", f"string:{build}",
        "EditionID", "string:ServerDatacenter",
        "InstallationType", "string:Server",
        "UBR", "dword:0x00004e20",
        "cd \\", "cd Microsoft",
        "add Virtual Machine", "cd Virtual Machine", "add Auto", "cd Auto",
        "setval 1", "IntegrationServicesVersion", "string:6.3.9600.18692",
        "cd \\", "cd Microsoft",
    ]
    # Component Based Servicing\Packages: thousands of package keys, as on a serviced system.
    for key in ("Windows", "CurrentVersion", "Component Based Servicing", "Packages"):
        lines += [f"add {key}", f"cd {key}"]
    for g in range(3000):
        name = f"Package_{g}_for_KB{3000000 + g}~31bf3856ad364e35~amd64~~6.3.1.{g}"
        lines += [f"add {name}", f"cd {name}", "setval 1", "CurrentState", "dword:0x00000070", "cd .."]
    # Filler to bring the hive to about 60 MB, in a tree (hivex grows flat lists quadratically).
    lines += ["cd \\", "add Classes", "cd Classes"]
    for g in range(150):
        lines += [f"add G{g:04d}", f"cd G{g:04d}"]
        for i in range(50):
            lines += [f"add K{i:03d}", f"cd K{i:03d}", "setval 2", "Data", "string:" + "x" * 200,
                      "Blob", "hex:3:" + ",".join(["5a"] * 2600), "cd .."]
        lines.append("cd ..")
    hivexsh_script(lines, path)


def build_partition(cache: Path) -> Path:
    part = cache / "windows-ntfs.img"
    if part.exists():
        return part
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        tmp = Path(tmp)
        software = tmp / "SOFTWARE"
        build_software(software)
        system = tmp / "SYSTEM"
        with gzip.open(REAL / "SYSTEM-win10-x64.gz") as fi, open(system, "wb") as fo:
            shutil.copyfileobj(fi, fo)
        img = tmp / "part.img"
        with open(img, "wb") as f:
            f.truncate(PARTITION_SIZE)
        run("mkntfs", "-Q", "-F", "-q", "-p", "2048", "-H", "255", "-S", "63", img)
        mnt = tmp / "mnt"
        mnt.mkdir()
        run("ntfs-3g", img, mnt)
        try:
            config = mnt / "Windows" / "System32" / "config"
            config.mkdir(parents=True)
            (mnt / "Windows" / "System32" / "drivers").mkdir()
            shutil.copyfile(software, config / "SOFTWARE")
            shutil.copyfile(system, config / "SYSTEM")
        finally:
            run("umount", mnt)
        img.replace(part)
    return part


def build_image(cache: Path, name: str, size: int, part: Path) -> Path:
    out = cache / f"windows-{name}.vhdx"
    if out.exists() and out.stat().st_mtime >= part.stat().st_mtime:
        return out
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        raw = Path(tmp) / "disk.raw"
        with open(raw, "wb") as f:
            f.truncate(size)
        run("sfdisk", "-q", raw, input=f"label: dos\nlabel-id: 0x12345678\nstart=2048, size={PARTITION_SIZE // 512}, type=7, bootable\n".encode())
        run("dd", f"if={part}", f"of={raw}", "bs=1M", "seek=1", "conv=notrunc,sparse", "status=none")
        tmp_out = Path(tmp) / "out.vhdx"
        run("qemu-img", "convert", "-f", "raw", "-O", "vhdx", "-o", "subformat=dynamic", raw, tmp_out)
        tmp_out.replace(out)
    return out


def time_command(cmd: list[str], runs: int) -> tuple[float, subprocess.CompletedProcess]:
    times, last = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        last = subprocess.run(cmd, capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), last


BARE = r"""
import sys, time
from dissect.hypervisor.disk.vhdx import VHDX
from dissect.volume.disk import Disk
from dissect.ntfs import NTFS
from dissect.regf import RegistryHive

class Counting:
    def __init__(self, f): self.f, self.n = f, 0
    def read(self, n=-1):
        b = self.f.read(n); self.n += len(b); return b
    def seek(self, *a): return self.f.seek(*a)
    def tell(self): return self.f.tell()

fh = Counting(open(sys.argv[1], "rb"))
disk = VHDX(fh)
part = Disk(disk).partitions[0]
fs = NTFS(part.open())
sw = RegistryHive(fs.mft.get("Windows/System32/config/SOFTWARE").open())
cv = sw.open("Microsoft\\Windows NT\\CurrentVersion")
sy = RegistryHive(fs.mft.get("Windows/System32/config/SYSTEM").open())
cs = sy.open("Select").value("Current").value
arch = sy.open(f"ControlSet{cs:03d}\\Control\\Session Manager\\Environment").value("PROCESSOR_ARCHITECTURE").value
print(cv.value("ProductName").value, cv.value("CurrentBuildNumber").value, arch, fh.n)
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--cache", type=Path, default=ROOT / "bench" / ".cache")
    args = ap.parse_args()
    for tool in ("hivexsh", "mkntfs", "ntfs-3g", "sfdisk", "qemu-img"):
        if not shutil.which(tool):
            print(f"bench: {tool} is not installed", file=sys.stderr)
            return 2
    args.cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    part = build_partition(args.cache)
    images = {name: build_image(args.cache, name, size, part) for name, size in SIZES.items()}
    print(f"images ready in {time.perf_counter() - t0:.1f} s (cached in {args.cache})")

    software_size = subprocess.run(
        ["ntfsinfo", "-F", "/Windows/System32/config/SOFTWARE", str(part)], capture_output=True, text=True
    ).stdout
    sizes = [int(l.split()[-1].strip("()"), 16) for l in software_size.splitlines() if l.strip().lower().startswith("data size")]
    print(f"SOFTWARE hive: {max(sizes, default=0) / MiB:.1f} MiB")
    print()
    print(f"{'image':<10} {'file MiB':>9} {'vhdtool s':>10} {'read MiB':>9} {'reads':>6} {'bare s':>8} {'bare MiB':>9} {'virt-insp s':>11}")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    ok = True
    for name, image in images.items():
        wall, res = time_command([sys.executable, "-m", "vhdtool.cli.main", "inspect", "--json", "--stats", str(image)], args.runs)
        if res.returncode != 0:
            print(f"{name}: vhdtool failed: {res.stderr.strip()}")
            ok = False
            continue
        doc = json.loads(res.stdout)
        assert doc["guest"]["windows"]["product_name"] == PRODUCT[0], doc
        stat_line = next(l for l in res.stderr.splitlines() if "stats:" in l)
        nbytes = int(stat_line.split(" read ")[1].split()[0])
        nreads = int(stat_line.split(" in ")[-1].split()[0])
        bare_wall, bare = time_command([sys.executable, "-c", BARE, str(image)], args.runs)
        bare_bytes = int(bare.stdout.split()[-1]) if bare.returncode == 0 else -1
        vi = "-"
        if shutil.which("virt-inspector"):
            vi_wall, vres = time_command(["virt-inspector", "-a", str(image)], 1)
            vi = f"{vi_wall:.2f}" if vres.returncode == 0 else "failed"
            if vres.returncode == 0:
                vi += f" (x{vi_wall / wall:.0f})"
        print(
            f"{name:<10} {image.stat().st_size / MiB:>9.1f} {wall:>10.3f} {nbytes / MiB:>9.2f} {nreads:>6} "
            f"{bare_wall:>8.3f} {bare_bytes / MiB:>9.2f} {vi:>11}"
        )
    if not shutil.which("virt-inspector"):
        print("\nvirt-inspector (libguestfs) is not installed: no comparison with it.")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
