#!/usr/bin/env python3
"""Benchmark `vhdtool stage`: a 10 MB and a 100 MB integration services cab into a 127 GiB dynamic VHDX.

The guest is built as bench/inspect_time.py builds its own (a ~70 MB SOFTWARE hive
made with hivexsh, the real Windows 10 SYSTEM hive, NTFS by mkntfs and ntfs-3g,
qemu-img's dynamic VHDX), but says Windows Server 2008 R2 with integration
services 6.1.7601.17514 and has C: in MountedDevices, so that a Windows 8 host's
6.1 cab (made by gcab, with an update.mum and a stored random payload) is staged.
Each run stages into a fresh sparse copy and prints the whole process's wall
time and the bytes written to the image per byte of cab (write amplification);
a second, identical run must write nothing. Where libguestfs is installed, the
same change is made on another copy with virt-customize (the folder, the cab and
a file of install.cmd's size) and virt-win-reg --merge (SetupType and CmdLine),
and their wall times added up.

    python3 bench/stage.py [--runs N] [--cache DIR]
    python3 bench/stage.py --large [MIB ...]    # default 100 1024

``--large`` stages cabs of the given sizes (MiB of stored random payload) instead, each
beside ``dd if=CAB of=X bs=1M conv=fsync`` of the same cab on the same filesystem, and
prints the wall times, their ratio and the peak resident memory: of the whole process
tree, summed and sampled every 20 ms from /proc, and the largest single process
(wait4's ru_maxrss).

(``bench/run.py`` runs this with the other benchmarks and prints one table.)
"""

from __future__ import annotations

import argparse
import json
import shutil
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchlib import guestfs_setup, load, sparse_copy, precompile

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
MiB = 1024 * 1024
PRODUCT = ("Windows Server 2008 R2 Datacenter", "6.1", "7601", "x64")
GUEST_IC = "6.1.7601.17514"
CAB_VERSION = "6.2.9200.16384"  # what a Windows 8 host offers
HOST = "win8"


def ensure_image(cache: Path) -> Path:
    """The 127 GiB dynamic VHDX with the Server 2008 R2 guest (built once, cached)."""
    bi = load("inspect_time")
    cache.mkdir(parents=True, exist_ok=True)
    part = bi.build_partition(cache, PRODUCT, GUEST_IC, name="ws2008r2-ntfs.img", drive_c=True)
    return bi.build_image(cache, "127GiB", bi.SIZES["127GiB"], part, prefix="ws2008r2")


def make_cab(folder: Path, payload_bytes: int) -> Path:
    """The 6.1 x64 integration services cab of a Windows 8 host, with ``payload_bytes`` of stored random data."""
    from fixtures.cabs import CabSpec, build_cab

    return build_cab(CabSpec("6.1", "x64", CAB_VERSION), folder, payload_size=payload_bytes)


def stage_cmd(image: Path, cabs: Path) -> list[str]:
    return [sys.executable, "-I", "-m", "vhdtool.cli.main", "stage", "--json", str(image), "--host", HOST,
            "--cabs", str(cabs)]


def stage_once(image: Path, cabs: Path) -> tuple[float, dict]:
    t0 = time.perf_counter()
    res = subprocess.run(stage_cmd(image, cabs), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    doc = json.loads(res.stdout) if res.stdout.strip() else {}
    if res.returncode != 0 or not doc.get("staged"):
        raise RuntimeError(f"stage failed: {res.stderr.strip() or res.stdout[:400]}")
    return wall, doc


def guestfs_stage(image: Path, cab: Path, doc: dict, workdir: Path, timeout: float | None = None) -> float | None:
    """The same change through libguestfs: virt-customize writes the folder, the cab and an install.cmd of
    the same size, virt-win-reg --merge sets SYSTEM\\Setup's SetupType and CmdLine. Seconds of both
    processes added up (None: not installed or failed)."""
    if not (shutil.which("virt-customize") and shutil.which("virt-win-reg")):
        return None
    folder = "/Windows/vhdtool/" + doc["id"]
    script_size = next(f["size"] for f in doc["files"] if f["path"].endswith("/install.cmd"))
    script = workdir / "install.cmd"
    line = b"rem the script vhdtool generates, here only its size\r\n"
    script.write_bytes((line * (script_size // len(line) + 1))[:script_size])
    command = doc["boot_hook"]["command"].replace("\\", "\\\\").replace('"', '\\"')
    reg = workdir / "setup.reg"
    reg.write_text("Windows Registry Editor Version 5.00\r\n\r\n[HKEY_LOCAL_MACHINE\\SYSTEM\\Setup]\r\n"
                   f'"SetupType"=dword:00000002\r\n"CmdLine"="{command}"\r\n', encoding="utf-8")
    cmds = [
        ["virt-customize", "--format=vhdx", "-a", str(image), "--mkdir", folder,
         "--upload", f"{cab}:{folder}", "--upload", f"{script}:{folder}"],
        ["virt-win-reg", "--format=vhdx", "--merge", str(image), str(reg)],
    ]
    total = 0.0
    for cmd in cmds:
        t0 = time.perf_counter()
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        total += time.perf_counter() - t0
        if res.returncode != 0:
            print(f"bench: {cmd[0]} failed: {res.stderr.strip()[-300:]}", file=sys.stderr)
            return None
    return total


def measure(image: Path, cabs: Path, runs: int, workdir: Path, with_guestfs: bool = True,
            guestfs_timeout: float | None = None) -> dict:
    """``runs`` stages of the cab in ``cabs``, each into a fresh sparse copy of ``image`` and followed by the same
    stage again (which must write nothing): median wall time, bytes written, and libguestfs's time."""
    cab = next(cabs.glob("*.cab"))
    walls, written, again_walls, again_written = [], [], [], []
    work = workdir / "work-stage.vhdx"
    doc = None
    for _ in range(runs):
        sparse_copy(image, work)
        try:
            wall, doc = stage_once(work, cabs)
            again_wall, again = stage_once(work, cabs)
        finally:
            work.unlink(missing_ok=True)
        walls.append(wall)
        written.append(doc["bytes_written"])
        again_walls.append(again_wall)
        again_written.append(again["bytes_written"])
    size = cab.stat().st_size
    out = {"size": size, "walls": walls, "wall": statistics.median(walls), "written": statistics.median(written),
           "again_wall": statistics.median(again_walls), "again_written": max(again_written)}
    out["amplification"] = out["written"] / size
    out["guestfs"] = None
    if with_guestfs and shutil.which("virt-customize"):
        sparse_copy(image, work)
        try:
            out["guestfs"] = guestfs_stage(work, cab, doc, workdir, guestfs_timeout)
        finally:
            work.unlink(missing_ok=True)
    return out


# -- large cabs: wall time against dd, and memory -------------------------------------------------

def tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and all its descendants, from /proc (0 once it is gone)."""
    parent, rss = {}, {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(entry)] = int(fields[1])
        rss[int(entry)] = int(fields[21]) * page
    total = 0
    for pid in rss:
        p = pid
        while p in parent and p != root and p > 1:
            p = parent[p]
        if p == root:
            total += rss[pid]
    return total


def run_sampled(cmd: list[str]) -> tuple[float, int, int, subprocess.CompletedProcess]:
    """(wall seconds, peak summed RSS of the process tree, peak RSS of its largest process, result)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        peak = [0]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.02):
                peak[0] = max(peak[0], tree_rss(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _pid, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        res = subprocess.CompletedProcess(cmd, proc.returncode, out.read().decode(), err.read().decode())
    return wall, peak[0], usage.ru_maxrss * 1024, res


def dd_seconds(src: Path, dst: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(["dd", f"if={src}", f"of={dst}", "bs=1M", "conv=fsync", "status=none"], check=True)
    wall = time.perf_counter() - t0
    dst.unlink()
    return wall


def large(image: Path, sizes_mib: list[int], workdir: Path) -> None:
    """The first row, a cab with no payload, is stage's fixed cost on this image (inspection, hives,
    commit); "net ratio" is the rest of each row's time to dd's."""
    print(f"{'cab MiB':>8} {'dd s':>7} {'stage s':>8} {'ratio':>6} {'net ratio':>9} {'tree peak MiB':>14} "
          f"{'largest MiB':>12}")
    fixed = None
    for size_mib in [0, *sizes_mib]:
        cabs = workdir / f"cabs-{size_mib}M"
        cab = make_cab(cabs, size_mib * MiB)
        work = workdir / "work-large.vhdx"
        dd = dd_seconds(cab, workdir / "dd.out")
        sparse_copy(image, work)
        try:
            wall, tree, largest, res = run_sampled(stage_cmd(work, cabs))
        finally:
            work.unlink(missing_ok=True)
        doc = json.loads(res.stdout) if res.stdout.strip() else {}
        if res.returncode != 0 or not doc.get("staged"):
            raise RuntimeError(f"stage failed: {res.stderr.strip() or res.stdout[:400]}")
        fixed = wall if fixed is None else fixed
        net = f"{(wall - fixed) / dd:>9.2f}" if size_mib else f"{'':>9}"
        print(f"{cab.stat().st_size / MiB:>8.1f} {dd:>7.2f} {wall:>8.2f} {wall / dd:>6.2f} {net} {tree / MiB:>14.0f} "
              f"{largest / MiB:>12.0f}")
        cab.unlink()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cache", type=Path, default=ROOT / "bench" / ".cache")
    ap.add_argument("--large", type=int, nargs="*", metavar="MIB",
                    help="stage cabs of these sizes beside dd, with peak memory (default 100 1024)")
    args = ap.parse_args()
    precompile()
    if args.large is not None:
        image = ensure_image(args.cache)
        with tempfile.TemporaryDirectory(dir=args.cache) as tmp:
            large(image, args.large or [100, 1024], Path(tmp))
        return 0
    print("libguestfs:", guestfs_setup()[1])
    image = ensure_image(args.cache)
    print(f"image: {image} ({image.stat().st_size / MiB:.0f} MiB file, 127 GiB virtual)")
    print(f"{'cab':>8} {'run':>4} {'wall s':>8} {'written MiB':>12} {'amplification':>14} {'again s':>8} {'again written':>14}")
    with tempfile.TemporaryDirectory(dir=args.cache) as tmp:
        tmp = Path(tmp)
        for size_mb in (10, 100):
            cabs = tmp / f"cabs-{size_mb}"
            make_cab(cabs, size_mb * 1000 * 1000)
            m = measure(image, cabs, args.runs, tmp)
            for run, wall in enumerate(m["walls"]):
                print(f"{size_mb:>6}MB {run + 1:>4} {wall:>8.2f}")
            print(f"{size_mb:>6}MB {'med':>4} {m['wall']:>8.2f} {m['written'] / MiB:>12.1f} {m['amplification']:>14.3f} "
                  f"{m['again_wall']:>8.2f} {m['again_written']:>14}")
            if m["guestfs"] is not None:
                print(f"{'':>8} virt-customize + virt-win-reg: {m['guestfs']:.2f} s")
    if not (shutil.which("virt-customize") and shutil.which("virt-win-reg")):
        print("virt-customize / virt-win-reg (libguestfs) are not installed: no comparison with them.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
