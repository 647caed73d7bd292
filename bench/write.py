#!/usr/bin/env python3
"""Benchmark the write engine (issue 14): `vhdtool copy-in` of 100 MiB, 1 GiB and 4 GiB into a 127 GiB image.

The guest is the one bench/inspect_time.py builds (NTFS by mkntfs and ntfs-3g, a
69.5 MiB SOFTWARE hive, the real Windows 10 SYSTEM hive), on an 8 GiB system
partition (the 3 GiB one of the inspect images cannot hold a 4 GiB file) of a
127 GiB disk, in three containers made by qemu-img: a dynamic VHDX, a fixed VHDX
(sparse on the host) and a dynamic VHD. All are cached in ``--cache``.

For each payload (random bytes, in a folder under ``--cache``, so on the images'
filesystem) it times, in one run:

- the baseline: ``dd if=PAYLOAD of=X bs=1M conv=fsync`` onto the same filesystem;
- per container, on a fresh sparse copy of the image: the whole ``vhdtool copy-in
  --json`` process's wall time and its ratio to dd; the peak memory of its process tree
  (the CLI and the sandbox child it forks), sampled from /proc every 20 ms (bench/treemem.py):
  the sum of VmRSS, of RssAnon and of Pss; the bytes it wrote to the image file (its --json
  report, cross-checked with what the file allocates) and that divided by the payload
  (amplification); then the same copy-in again, which must write nothing;
- virt-copy-in of the same file into another copy, where libguestfs is installed.

Each result is judged by tools other than vhdtool: ``qemu-img check`` (VHDX) or a whole
``qemu-img convert -f vpc`` (VHD), then the system partition (found by sfdisk in the MBR
read through qemu) is extracted through qemu's own format driver and ntfscat's copy of the
file must have the payload's sha256. The end prints one table, the issue's targets
(at most 3x dd at 100 MiB and 1 GiB; at most 256 MiB peak RSS at 1 and 4 GiB;
amplification at most 1.1 x payload + 8 MiB) and the machine's facts.

    python3 bench/write.py [--sizes 100M,1G,4G] [--formats vhdx-dynamic,vhdx-fixed,vhd] [--runs N]
                           [--cache DIR] [--dir DIR] [--quick] [--no-check]

``--dir DIR``: the payloads, the dd baseline and the copies of the images that are written live
in DIR (default: a folder under ``--cache``), e.g. a loop-mounted XFS made with ``mkfs.xfs -m
reflink=1`` to measure the VHD writer's reflinked copy; the images themselves stay cached in
``--cache``. ``--quick``: 100 MiB into the dynamic VHDX only. (``bench/run.py`` uses ``ensure_image``
and ``measure`` with its own sizes and prints one table with the other benchmarks.)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import guestfs_setup, load, sparse_copy, precompile
from treemem import TreeMemory, run_sampled

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
GiB = 1024 * MiB
GUEST_DIR = "C:\\Windows\\Temp"  # virt-copy-in copies into the same folder
SYSTEM_PARTITION = 8 * GiB
TARGET_RATIO, RATIO_SIZES = 3.0, (100 * MiB, GiB)
TARGET_RSS, RSS_SIZES = 256 * MiB, (GiB, 4 * GiB)
# Container formats: (file suffix, qemu-img's name, qemu-img convert options from the dynamic VHDX).
FORMATS = {
    "vhdx-dynamic": (".vhdx", "vhdx", None),
    "vhdx-fixed": ("-fixed.vhdx", "vhdx", ["-O", "vhdx", "-o", "subformat=fixed"]),
    "vhd": (".vhd", "vpc", ["-O", "vpc"]),
}


def ensure_image(cache: Path) -> Path:
    """The 127 GiB dynamic VHDX with the Windows Server 2012 R2 guest on an 8 GiB partition (built once, cached)."""
    bi = load("inspect_time")
    cache.mkdir(parents=True, exist_ok=True)
    part = bi.build_partition(cache, name="windows-ntfs-8GiB.img", size=SYSTEM_PARTITION)
    return bi.build_image(cache, "127GiB", bi.SIZES["127GiB"], part, prefix="windows-sys8GiB")


def ensure_images(cache: Path, formats: list[str]) -> dict[str, Path]:
    """The same disk in each of ``formats``, converted by qemu-img from the dynamic VHDX (sparse, cached)."""
    dynamic = ensure_image(cache)
    out = {}
    for fmt in formats:
        suffix, _, convert = FORMATS[fmt]
        image = dynamic.with_name(dynamic.name.removesuffix(".vhdx") + suffix)
        if convert and not (image.exists() and image.stat().st_mtime >= dynamic.stat().st_mtime):
            tmp = image.with_name(image.name + ".part")
            subprocess.run(["qemu-img", "convert", "-f", "vhdx", *convert, str(dynamic), str(tmp)], check=True,
                           capture_output=True)
            tmp.replace(image)
        out[fmt] = image
    return out


# ---------------------------------------------------------------------------------------------- timed commands

def make_payload(path: Path, size: int) -> str:
    """``size`` random bytes at ``path``, written in 8 MiB pieces; their sha256."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 8 * MiB))
            h.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return h.hexdigest()


def dd_baseline(payload: Path, workdir: Path) -> float:
    """Seconds of ``dd if=PAYLOAD of=X bs=1M conv=fsync`` onto ``workdir`` (after a sync, as before each copy-in)."""
    out = workdir / "dd.out"
    os.sync()
    t0 = time.perf_counter()
    subprocess.run(["dd", f"if={payload}", f"of={out}", "bs=1M", "conv=fsync", "status=none"], check=True)
    wall = time.perf_counter() - t0
    out.unlink()
    return wall


def copy_in(image: Path, local: Path, workdir: Path) -> tuple[float, dict, TreeMemory]:
    """One ``vhdtool copy-in --json`` process: wall time, its report, its process tree's memory peaks."""
    os.sync()  # dirty pages of the copy just made are not this run's to flush
    out, err = workdir / "copy-in.stdout", workdir / "copy-in.stderr"
    with open(out, "wb") as fo, open(err, "wb") as fe:
        wall, code, mem = run_sampled([sys.executable, "-I", "-m", "vhdtool.cli.main", "copy-in", "--json", str(image),
                                       str(local), GUEST_DIR], stdout=fo, stderr=fe)
    if code != 0:
        raise RuntimeError(f"copy-in failed (exit {code}): {err.read_text().strip()[-400:]}")
    return wall, json.loads(out.read_text()), mem


def virt_copy_in(image: Path, local: Path, timeout: float | None = None, fmt: str = "vhdx") -> float | None:
    """Seconds of ``virt-copy-in`` of the same file into the same folder (None: not installed or failed)."""
    if not shutil.which("virt-copy-in"):
        return None
    t0 = time.perf_counter()
    try:
        res = subprocess.run(["virt-copy-in", f"--format={fmt}", "-a", str(image), str(local), "/Windows/Temp"],
                             capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        print(f"bench: virt-copy-in failed: {res.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    return wall


# ---------------------------------------------------------------------------------------------- judges

def qemu(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True)


def region(image: Path, qfmt: str, offset: int, size: int, out: Path) -> Path:
    """Bytes ``offset`` to ``offset + size`` of the disk in ``image``, read by qemu's ``qfmt`` driver (sparse raw)."""
    name = str(image).replace(",", ",,")  # qemu's option syntax doubles a comma
    opts = f"driver=raw,offset={offset},size={size},file.driver={qfmt},file.file.driver=file,file.file.filename={name}"
    res = qemu("convert", "--image-opts", opts, "-O", "raw", str(out))
    if res.returncode != 0:
        raise RuntimeError(f"qemu-img convert of {image.name} at {offset}: {res.stderr.strip()[-300:]}")
    return out


def ntfscat_sha256(volume: Path, path: str) -> tuple[str, int]:
    """sha256 and length of ``path`` in an NTFS volume file as ntfscat reads it (streamed)."""
    h, n = hashlib.sha256(), 0
    with subprocess.Popen(["ntfscat", "-f", str(volume), path], stdout=subprocess.PIPE, stderr=subprocess.PIPE) as p:
        while chunk := p.stdout.read(8 * MiB):
            h.update(chunk)
            n += len(chunk)
        err = p.stderr.read().decode(errors="replace")
    if p.returncode != 0:
        raise RuntimeError(f"ntfscat {path}: exit {p.returncode}: {err.strip()[-200:]}")
    return h.hexdigest(), n


def judge(image: Path, qfmt: str, guest_path: str, sha: str, size: int, workdir: Path) -> list[str]:
    """What tools other than vhdtool find wrong with ``image`` after the copy-in (empty: nothing)."""
    problems = []
    src, src_fmt = image, qfmt
    if qfmt == "vhdx":
        res = qemu("check", "-f", "vhdx", str(image))
        if res.returncode != 0 or "No errors were found" not in res.stdout:
            problems.append(f"qemu-img check: exit {res.returncode}: {(res.stdout + res.stderr).strip()[-200:]}")
    else:
        src, src_fmt = workdir / "judge-whole.raw", "raw"  # the whole disk through qemu's vpc driver
        res = qemu("convert", "-f", qfmt, "-O", "raw", str(image), str(src))
        if res.returncode != 0:
            return [f"qemu-img convert -f {qfmt}: exit {res.returncode}: {res.stderr.strip()[-200:]}"]
    try:
        head = region(src, src_fmt, 0, MiB, workdir / "judge-head.raw")
        table = json.loads(subprocess.run(["sfdisk", "-J", str(head)], capture_output=True, text=True,
                                          check=True).stdout)["partitiontable"]
        head.unlink()
        part = next(p for p in table["partitions"] if p.get("bootable")) if len(table["partitions"]) > 1 \
            else table["partitions"][0]
        sector = table.get("sectorsize", 512)
        volume = region(src, src_fmt, part["start"] * sector, part["size"] * sector, workdir / "judge-part.raw")
        try:
            got, n = ntfscat_sha256(volume, guest_path)
        finally:
            volume.unlink()
        if (got, n) != (sha, size):
            problems.append(f"ntfscat {guest_path}: {n} bytes, sha256 {got[:16]}..., not the payload's")
    except (RuntimeError, subprocess.CalledProcessError, StopIteration, KeyError, ValueError) as e:
        problems.append(f"ntfs judge: {e}")
    finally:
        if src != image:
            src.unlink(missing_ok=True)
    return problems


# ---------------------------------------------------------------------------------------------- one case

def measure(image: Path, local: Path, runs: int, workdir: Path, with_guestfs: bool = True,
            guestfs_timeout: float | None = None, qfmt: str = "vhdx", sha: str | None = None) -> dict:
    """``runs`` copy-ins of ``local``, each into a fresh sparse copy of ``image``, each followed by the same
    copy again (which must write nothing) and, given the payload's ``sha``, by the judges; median wall time,
    bytes written, peak memory of the process tree (the most of any run), and virt-copy-in's time."""
    size = local.stat().st_size
    walls, written, again_walls, again_written, mems, problems = [], [], [], [], [], []
    work = workdir / f"work-copy-in{''.join(image.suffixes[-1:])}"
    for _ in range(runs):
        sparse_copy(image, work)
        try:
            before = work.stat().st_blocks * 512
            wall, doc, mem = copy_in(work, local, workdir)
            # The file may grow by whole new blocks; what it allocates cannot exceed what was written (but for
            # XFS's speculative preallocation past the end of a file written by appends: up to a few MiB).
            growth = work.stat().st_blocks * 512 - before
            again_wall, again, _ = copy_in(work, local, workdir)
            if growth > doc["bytes_written"] + 4 * MiB:
                raise RuntimeError(f"copy-in: the file grew by {growth} bytes, {doc['bytes_written']} reported written")
            if sha is not None:
                problems += judge(work, qfmt, f"/Windows/Temp/{local.name}", sha, size, workdir)
        finally:
            work.unlink(missing_ok=True)
        walls.append(wall)
        written.append(doc["bytes_written"])
        again_walls.append(again_wall)
        again_written.append(again["bytes_written"])
        mems.append(mem)
    out = {"size": size, "walls": walls, "wall": statistics.median(walls), "written": statistics.median(written),
           "again_wall": statistics.median(again_walls), "again_written": max(again_written),
           "rss": max(m.rss for m in mems), "anon": max(m.anon for m in mems), "pss": max(m.pss for m in mems),
           "kernel_max_single": max(m.kernel_max_single for m in mems), "processes": max(m.processes for m in mems),
           "samples": min(m.samples for m in mems), "problems": problems, "judged": sha is not None}
    out["amplification"] = out["written"] / size
    out["virt_copy_in"] = None
    if with_guestfs and shutil.which("virt-copy-in"):
        sparse_copy(image, work)
        try:
            out["virt_copy_in"] = virt_copy_in(work, local, guestfs_timeout, qfmt)
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


# ---------------------------------------------------------------------------------------------- the run

def parse_size(text: str) -> int:
    units = {"K": 1024, "M": MiB, "G": GiB}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    return int(float(text[:-1]) * units[text[-1]]) if text[-1:] in units else int(text)


def human(n: float) -> str:
    return f"{n / GiB:g} GiB" if n >= GiB else f"{n / MiB:g} MiB"


def sh(*cmd: str) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def filesystem(folder: Path) -> str:
    return sh("findmnt", "-n", "-o", "FSTYPE,SOURCE,TARGET", "--target", str(folder)) or sh("stat", "-f", "-c", "%T",
                                                                                            str(folder)) or "?"


def facts(cache: Path, work_dir: Path) -> list[tuple[str, str]]:
    commit = sh("git", "-C", str(ROOT), "log", "-1", "--format=%h %s")[:70]
    dirty = sh("git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no")
    return [("CPUs", f"{os.cpu_count()} ({len(os.sched_getaffinity(0))} usable)"),
            ("memory", sh("free", "-h").splitlines()[1].split()[1] if sh("free", "-h") else "?"),
            ("kernel", platform.release()),
            ("cache dir", f"{cache} on {filesystem(cache)}, {shutil.disk_usage(cache).free / GiB:.0f} GiB free"),
            ("work dir", f"{work_dir} on {filesystem(work_dir)}, {shutil.disk_usage(work_dir).free / GiB:.0f} GiB free"),
            ("qemu-img", sh("qemu-img", "--version").splitlines()[0] if sh("qemu-img", "--version") else "?"),
            ("Python", f"{platform.python_version()} ({sys.executable})"),
            ("vhdtool", f"commit {commit}{' (with uncommitted changes)' if dirty else ''}"),
            ("load average", " ".join(Path("/proc/loadavg").read_text().split()[:3]))]


COLUMNS = ("payload", "format", "dd s", "copy-in s", "x dd", "RSS MiB", "Pss MiB", "anon MiB", "1 proc MiB",
           "written MiB", "amp", "again s", "again B", "virt-copy-in", "judges")


def row(size: int, fmt: str, dd: float, m: dict) -> tuple:
    vci = "-" if m["virt_copy_in"] is None else f"{m['virt_copy_in']:.2f} s"
    judged = ("FAILED" if m["problems"] else "ok") if m["judged"] else "not run"
    return (human(size), fmt, f"{dd:.2f}", f"{m['wall']:.2f}", f"{m['wall'] / dd:.2f}", f"{m['rss'] / MiB:.0f}",
            f"{m['pss'] / MiB:.0f}", f"{m['anon'] / MiB:.0f}", f"{m['kernel_max_single'] / MiB:.0f}",
            f"{m['written'] / MiB:.1f}", f"{m['amplification']:.3f}", f"{m['again_wall']:.2f}", str(m["again_written"]),
            vci, judged)


def table(rows: list[tuple]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(COLUMNS)]
    line = lambda cells: "  ".join(c.rjust(w) if 2 <= i <= 12 else c.ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(COLUMNS), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def verdicts(results: list[tuple[int, str, float, dict]]) -> list[str]:
    """The issue's targets, one line per figure that falls under one, and each judge's complaint."""
    out = []
    for size, fmt, dd, m in results:
        where = f"{human(size)} {fmt}"
        ratio = m["wall"] / dd
        if size in RATIO_SIZES:
            out.append(f"{where}: time {ratio:.2f}x dd (target <= {TARGET_RATIO:g}x): "
                       f"{'ok' if ratio <= TARGET_RATIO else 'MISSED'}")
        if size in RSS_SIZES:
            out.append(f"{where}: peak RSS of the tree {m['rss'] / MiB:.0f} MiB (Pss {m['pss'] / MiB:.0f} MiB; target "
                       f"<= {TARGET_RSS // MiB} MiB): {'ok' if m['rss'] <= TARGET_RSS else 'MISSED'}")
        limit = 1.1 * size + 8 * MiB
        if m["written"] > limit:
            out.append(f"{where}: wrote {m['written'] / MiB:.1f} MiB, over 1.1 x payload + 8 MiB = {limit / MiB:.1f}: MISSED")
        if m["again_written"]:
            out.append(f"{where}: the second, identical copy-in wrote {m['again_written']} bytes: MISSED (must be 0)")
        out += [f"{where}: JUDGE FAILED: {p}" for p in m["problems"]]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100M,1G,4G", help="payload sizes (default 100M,1G,4G)")
    ap.add_argument("--formats", default=",".join(FORMATS), help=f"containers (default {','.join(FORMATS)})")
    ap.add_argument("--runs", type=int, default=1, help="runs per figure, median taken (default 1)")
    ap.add_argument("--cache", type=Path, default=ROOT / "bench" / ".cache")
    ap.add_argument("--dir", type=Path, default=None,
                    help="where the payloads and the written copies live (default: under --cache)")
    ap.add_argument("--quick", action="store_true", help="100 MiB into the dynamic VHDX only")
    ap.add_argument("--no-check", action="store_true", help="skip the judges (qemu-img, ntfscat)")
    args = ap.parse_args()
    precompile()
    sizes = [100 * MiB] if args.quick else [parse_size(s) for s in args.sizes.split(",")]
    formats = ["vhdx-dynamic"] if args.quick else [f.strip() for f in args.formats.split(",")]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        ap.error(f"unknown format(s) {', '.join(unknown)}: choose from {', '.join(FORMATS)}")
    args.cache.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    print("vhdtool copy-in benchmark (bench/write.py)")
    work_dir = args.dir or args.cache
    work_dir.mkdir(parents=True, exist_ok=True)
    for key, value in facts(args.cache, work_dir):
        print(f"  {key:<13} {value}")
    guestfs, how = (False, "skipped (--quick)") if args.quick else guestfs_setup()
    print(f"  {'libguestfs':<13} {how}")
    images = ensure_images(args.cache, formats)
    for fmt, image in images.items():
        print(f"  {fmt:<13} {image.name}: {image.stat().st_blocks * 512 / MiB:.0f} MiB allocated, 127 GiB virtual, "
              f"system partition {human(SYSTEM_PARTITION)}")
    print(f"  {'runs':<13} median of {args.runs}; memory sampled every 20 ms; a sync before each timed command",
          flush=True)
    results = []
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="write-") as tmp:
        tmp = Path(tmp)
        for size in sizes:
            need = 4 * size + GiB  # payload, the copy's growth, the judges' raw disk and partition
            if shutil.disk_usage(tmp).free < need:
                print(f"{human(size)}: skipped, {human(need)} free needed on {tmp}", flush=True)
                continue
            local = tmp / f"payload-{size // MiB}MiB.bin"
            sha = make_payload(local, size)
            dd = statistics.median(dd_baseline(local, tmp) for _ in range(args.runs))
            print(f"\n{human(size)} payload: dd bs=1M conv=fsync {dd:.2f} s ({size / MiB / dd:.0f} MiB/s)", flush=True)
            for fmt, image in images.items():
                m = measure(image, local, args.runs, tmp, with_guestfs=guestfs, qfmt=FORMATS[fmt][1],
                            sha=None if args.no_check else sha)
                results.append((size, fmt, dd, m))
                print(f"  {fmt:<13} copy-in {m['wall']:.2f} s = {m['wall'] / dd:.2f}x dd; peak of the tree "
                      f"({m['processes']} processes, {m['samples']} samples): RSS {m['rss'] / MiB:.0f} MiB, "
                      f"Pss {m['pss'] / MiB:.0f} MiB, anon {m['anon'] / MiB:.0f} MiB, largest single process "
                      f"{m['kernel_max_single'] / MiB:.0f} MiB (kernel); wrote {m['written'] / MiB:.1f} MiB = "
                      f"{m['amplification']:.3f}x; again {m['again_wall']:.2f} s, {m['again_written']} B; judges: "
                      f"{'; '.join(m['problems']) or 'ok' if m['judged'] else 'not run'}"
                      + ("" if m["virt_copy_in"] is None else f"; virt-copy-in {m['virt_copy_in']:.2f} s"), flush=True)
            local.unlink()
        if not args.quick:
            for sargs, wall, doc in services(images.get("vhdx-dynamic") or ensure_image(args.cache), tmp):
                print(f"services {' '.join(sargs)}: {wall:.2f} s, {doc['bytes_written'] / 1024:.0f} KiB written, "
                      f"{len(doc['changes']['registry'])} value(s) changed")
    print()
    print(table([row(*r) for r in results]))
    print("\nx dd: copy-in wall / dd wall; RSS, Pss, anon: peak of the sum over the process tree (sampled); 1 proc: "
          "the kernel's peak RSS of its largest process;\namp: bytes written to the image / payload; again: the same "
          "copy-in a second time; judges: qemu-img check or convert, ntfscat sha256.")
    if not shutil.which("virt-copy-in"):
        print("virt-copy-in (libguestfs) is not installed: no comparison with it.")
    elif not guestfs:
        print(f"virt-copy-in: not run ({how}).")
    lines = verdicts(results)
    for line in lines:
        print(line)
    fs = sh("findmnt", "-n", "-o", "FSTYPE", "--target", str(work_dir)) or "?"
    print(f"machine: {os.cpu_count()} CPUs, payloads and copies on {fs}; "
          f"load average at the end {' '.join(Path('/proc/loadavg').read_text().split()[:3])}; "
          f"{time.perf_counter() - t_start:.0f} s in all")
    return 1 if any("FAILED" in line or "MISSED" in line for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
