#!/usr/bin/env python3
"""Benchmark ``vhdtool inspect`` (issue 2): wall time and bytes read from the image.

Builds, with real tools, one Windows guest (a ~60 MB SOFTWARE hive made with
hivexsh, the real Windows 10 SYSTEM hive) on an NTFS partition made by mkntfs and
filled through ntfs-3g, and puts the same partition into dynamic VHDX images of
4 GiB, 127 GiB and 2 TiB virtual size (qemu-img). Then times the whole
``vhdtool inspect --json`` process on each, reads its byte count (counted in the
container layer, ``--stats``), and compares, in the same run, with ``python -c
pass``, with ``bench/three_facts.py`` (the least a dissect user would write for
product name, build and architecture), with in-process ``vhdtool.inspect()`` once
warm, and with virt-inspector where libguestfs is installed.

    python3 bench/inspect_time.py [--runs N] [--cache DIR]

(``bench/run.py`` runs this with the other benchmarks and prints one table.)
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

from benchlib import guestfs_setup

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


def build_software(path: Path, product: tuple = PRODUCT, ic_version: str = "6.3.9600.18692") -> None:
    shutil.copyfile(REAL / "minimal", path)
    os.chmod(path, 0o644)
    product, version, build, _ = product
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
        "setval 1", "IntegrationServicesVersion", f"string:{ic_version}",
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


DISK_SIGNATURE = 0x12345678
PARTITION_OFFSET = 1024 * 1024
# What the cached partitions hold; a change here builds them anew. 2: System32\cmd.exe, which
# libguestfs's inspection needs to call a folder a Windows system root (and reads its architecture from);
# 3: Windows\Temp, where bench/write.py copies to (virt-copy-in wants the folder to exist).
LAYOUT = 3


def pe_stub(machine: int = 0x8664) -> bytes:
    """A minimal PE32+ console executable header (no sections): what `file` calls an x86-64 Windows program."""
    dos = bytearray(64)
    dos[0:2] = b"MZ"
    dos[0x3C:0x40] = (0x40).to_bytes(4, "little")
    coff = b"PE\0\0" + machine.to_bytes(2, "little") + bytes(14) + (0xF0).to_bytes(2, "little") + (0x22).to_bytes(2, "little")
    opt = bytearray(0xF0)
    opt[0:2] = (0x20B).to_bytes(2, "little")        # PE32+
    opt[32:36] = (0x1000).to_bytes(4, "little")     # SectionAlignment
    opt[36:40] = (0x200).to_bytes(4, "little")      # FileAlignment
    opt[68:70] = (3).to_bytes(2, "little")          # IMAGE_SUBSYSTEM_WINDOWS_CUI
    opt[108:112] = (16).to_bytes(4, "little")       # NumberOfRvaAndSizes
    return bytes(dos) + coff + bytes(opt)


def build_partition(cache: Path, product: tuple = PRODUCT, ic_version: str = "6.3.9600.18692",
                    name: str = "windows-ntfs.img", drive_c: bool = False, size: int = PARTITION_SIZE) -> Path:
    """The guest's NTFS volume (``size`` bytes, sparse); ``drive_c`` records it as C: in MountedDevices
    (MBR signature + offset)."""
    part = cache / name.replace(".img", f".v{LAYOUT}.img")
    if part.exists():
        return part
    for stale in [cache / name, *cache.glob(name.replace(".img", ".v*.img"))]:
        stale.unlink(missing_ok=True)  # an earlier layout's partition (3 GiB, sparse)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        tmp = Path(tmp)
        software = tmp / "SOFTWARE"
        build_software(software, product, ic_version)
        system = tmp / "SYSTEM"
        with gzip.open(REAL / "SYSTEM-win10-x64.gz") as fi, open(system, "wb") as fo:
            shutil.copyfileobj(fi, fo)
        if drive_c:
            entry = DISK_SIGNATURE.to_bytes(4, "little") + PARTITION_OFFSET.to_bytes(8, "little")
            hivexsh_script(["cd \\MountedDevices", "setval 1", "\\DosDevices\\C:",
                            "hex:3:" + ",".join(f"{b:02x}" for b in entry)], system)
        img = tmp / "part.img"
        with open(img, "wb") as f:
            f.truncate(size)
        run("mkntfs", "-Q", "-F", "-q", "-p", "2048", "-H", "255", "-S", "63", img)
        mnt = tmp / "mnt"
        mnt.mkdir()
        run("ntfs-3g", img, mnt)
        try:
            config = mnt / "Windows" / "System32" / "config"
            config.mkdir(parents=True)
            (mnt / "Windows" / "System32" / "drivers").mkdir()
            (mnt / "Windows" / "Temp").mkdir()
            shutil.copyfile(software, config / "SOFTWARE")
            shutil.copyfile(system, config / "SYSTEM")
            (mnt / "Windows" / "System32" / "cmd.exe").write_bytes(pe_stub())
        finally:
            run("umount", mnt)
        img.replace(part)
    return part


def build_image(cache: Path, name: str, size: int, part: Path, prefix: str = "windows") -> Path:
    out = cache / f"{prefix}-{name}.vhdx"
    if out.exists() and out.stat().st_mtime >= part.stat().st_mtime:
        return out
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        raw = Path(tmp) / "disk.raw"
        with open(raw, "wb") as f:
            f.truncate(size)
        run("sfdisk", "-q", raw, input=f"label: dos\nlabel-id: 0x12345678\nstart=2048, size={part.stat().st_size // 512}, type=7, bootable\n".encode())
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


THREE_FACTS = ROOT / "bench" / "three_facts.py"
WARM_RUNS = 20


def in_process_warm(image: Path, runs: int) -> float:
    """Median seconds of ``vhdtool.inspect(image)`` in one process, after a first call has loaded everything."""
    code = (
        "import statistics, sys, time, vhdtool\n"
        "vhdtool.inspect(sys.argv[1])\n"
        "times = []\n"
        f"for _ in range({runs}):\n"
        "    t0 = time.perf_counter(); vhdtool.inspect(sys.argv[1]); times.append(time.perf_counter() - t0)\n"
        "print(statistics.median(times))\n"
    )
    res = subprocess.run([sys.executable, "-I", "-c", code, str(image)], capture_output=True, text=True, check=True)
    return float(res.stdout)


TOOLS = ("hivexsh", "mkntfs", "ntfs-3g", "sfdisk", "qemu-img")


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if not shutil.which(tool)]


def ensure_images(cache: Path) -> tuple[Path, dict[str, Path]]:
    """The guest's partition and its three VHDX images (built once, cached in ``cache``)."""
    cache.mkdir(parents=True, exist_ok=True)
    part = build_partition(cache)
    return part, {name: build_image(cache, name, size, part) for name, size in SIZES.items()}


def software_hive_size(part: Path) -> int:
    out = subprocess.run(["ntfsinfo", "-F", "/Windows/System32/config/SOFTWARE", str(part)],
                         capture_output=True, text=True).stdout
    sizes = [int(l.split()[-1].strip("()"), 16) for l in out.splitlines() if l.strip().lower().startswith("data size")]
    return max(sizes, default=0)


def vhdtool_inspect(image: Path, runs: int) -> dict:
    """Median wall time of the whole ``vhdtool inspect --json --stats`` process, and what it read."""
    cmd = [sys.executable, "-I", "-m", "vhdtool.cli.main", "inspect", "--json", "--stats", str(image)]
    wall, res = time_command(cmd, runs)
    if res.returncode != 0:
        raise RuntimeError(f"vhdtool inspect {image.name} failed: {res.stderr.strip()}")
    doc = json.loads(res.stdout)
    if doc["guest"]["windows"]["product_name"] != PRODUCT[0]:
        raise RuntimeError(f"vhdtool inspect {image.name}: unexpected guest {doc['guest']}")
    stat_line = next(l for l in res.stderr.splitlines() if "stats:" in l)
    return {"wall": wall, "bytes_read": int(stat_line.split(" read ")[1].split()[0]),
            "reads": int(stat_line.split(" in ")[-1].split()[0])}


def three_facts(image: Path, runs: int) -> dict:
    """The three-fact dissect script's median wall time and the bytes it read."""
    # -I everywhere: the script's folder is not put on sys.path, and each process starts alike.
    wall, res = time_command([sys.executable, "-I", str(THREE_FACTS), str(image)], runs)
    if res.returncode != 0:
        raise RuntimeError(f"three_facts.py {image.name} failed: {res.stderr.strip()[-300:]}")
    return {"wall": wall, "bytes_read": int(res.stdout.split()[-1])}


def virt_inspector(image: Path, timeout: float | None = None) -> float | None:
    """Seconds of one ``virt-inspector -a IMAGE`` (None: not installed or failed)."""
    if not shutil.which("virt-inspector"):
        return None
    t0 = time.perf_counter()
    try:
        res = subprocess.run(["virt-inspector", "--format=vhdx", "-a", str(image)], capture_output=True,
                             text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    wall = time.perf_counter() - t0
    if res.returncode != 0 or "<operatingsystem>" not in res.stdout:
        print(f"bench: virt-inspector {image.name} found no guest: {res.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    return wall


def measure(image: Path, runs: int, with_three_facts: bool = True, with_warm: bool = True,
            with_guestfs: bool = True, guestfs_timeout: float | None = None) -> dict:
    """All that is measured on one image: vhdtool's process, and what it is compared with."""
    out = {"image": image, "file_size": image.stat().st_size, "vhdtool": vhdtool_inspect(image, runs)}
    out["three_facts"] = three_facts(image, runs) if with_three_facts else None
    out["warm"] = in_process_warm(image, WARM_RUNS) if with_warm else None
    out["virt_inspector"] = virt_inspector(image, guestfs_timeout) if with_guestfs else None
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--cache", type=Path, default=ROOT / "bench" / ".cache")
    args = ap.parse_args()
    for tool in missing_tools():
        print(f"bench: {tool} is not installed", file=sys.stderr)
        return 2
    print("libguestfs:", guestfs_setup()[1])
    t0 = time.perf_counter()
    part, images = ensure_images(args.cache)
    print(f"images ready in {time.perf_counter() - t0:.1f} s (cached in {args.cache})")
    print(f"SOFTWARE hive: {software_hive_size(part) / MiB:.1f} MiB")
    print()
    python_wall, _ = time_command([sys.executable, "-I", "-c", "pass"], args.runs)
    print(f"python -c pass: {python_wall:.3f} s (median of {args.runs})")
    print()
    print(
        f"{'image':<10} {'file MiB':>9} {'vhdtool s':>10} {'read MiB':>9} {'reads':>6} {'3-fact s':>9} {'3-fact MiB':>10} "
        f"{'ratio':>6} {'warm ms':>8} {'virt-insp s':>11}"
    )
    ok = True
    for name, image in images.items():
        try:
            m = measure(image, args.runs)
        except RuntimeError as e:
            print(f"{name}: {e}")
            ok = False
            continue
        v, bare = m["vhdtool"], m["three_facts"]
        vi = "-"
        if shutil.which("virt-inspector"):
            vi = "failed" if m["virt_inspector"] is None else f"{m['virt_inspector']:.2f} (x{m['virt_inspector'] / v['wall']:.0f})"
        print(
            f"{name:<10} {m['file_size'] / MiB:>9.1f} {v['wall']:>10.3f} {v['bytes_read'] / MiB:>9.2f} {v['reads']:>6} "
            f"{bare['wall']:>9.3f} {bare['bytes_read'] / MiB:>10.2f} {v['wall'] / bare['wall']:>6.2f} "
            f"{m['warm'] * 1000:>8.1f} {vi:>11}"
        )
    print("\nratio: whole vhdtool process / three-fact dissect script; warm: in-process vhdtool.inspect(), "
          f"median of {WARM_RUNS} after one call")
    if not shutil.which("virt-inspector"):
        print("\nvirt-inspector (libguestfs) is not installed: no comparison with it.")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
