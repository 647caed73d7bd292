#!/usr/bin/env python3
"""vhdtool's benchmarks as one suite: one command, one table.

    .venv/bin/python bench/run.py [--quick] [--runs N] [--images N] [--inspect-images N] [--no-guestfs]
                                  [--wait-quiet S] [--only PART...]
                                  [--only PART...] [--cache DIR]

In one run, with the scripts beside this one (each still runs alone):

- inspect (inspect_time.py): the whole ``vhdtool inspect --json --stats`` process on
  one Windows guest in dynamic VHDX images of 4 GiB, 127 GiB and 2 TiB virtual size:
  wall time and the bytes it read from the image file; beside it the least a dissect
  user would write for three facts (three_facts.py) and vhdtool.inspect() in a warm
  process.
- copy-in (write.py) and stage (stage.py): a file (10 and 100 MiB) copied into the
  127 GiB image, a cab (10 and 100 MB) staged into a Server 2008 R2 guest's 127 GiB
  image, each on a fresh sparse copy: wall time, bytes written to the image file and
  write amplification (written / file size); a second, identical run must write
  nothing.
- batch (batch.py): ``vhdtool batch inspect`` and ``vhdtool batch stage`` over
  copies (fresh per run) of the small demo guest with 1, 2 and 4 workers: the whole
  batch process's wall time (worker start-up included), images per second and the
  speed-up over 1 worker (issue 9's check: at least 1.7 with 2 workers on 2 cores);
  compared with ``xargs -P N`` running one vhdtool process per image. Each row says how
  many cores the machine's other processes kept busy meanwhile: a speed-up measured
  while something else runs (a test suite) says little; ``--wait-quiet S`` waits for
  a quiet machine first.
- libguestfs, where virt-inspector, virt-copy-in, virt-customize and virt-win-reg are
  installed: the same inspect, copy-in and stage, timed in the same run, as the ratio
  of their wall time to vhdtool's. Its appliance is started once first to see that it
  works; where KVM cannot start it, it runs under TCG (software emulation), which is
  slower, and the facts at the top say so.

Times are medians of ``--runs`` (libguestfs: one run). ``--quick``: one run, files
and cabs of 1 and 10 MB, no libguestfs. Images are built once and cached in
bench/.cache (the first run builds them: hivexsh, mkntfs, ntfs-3g with FUSE, so
root, sfdisk, qemu-img, gcab).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import load

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
MiB = 1024 * 1024
GiB = 1024**3
GUESTFS_TIMEOUT = 600.0  # seconds for one libguestfs command before it counts as failed
HEADERS = ("area", "case", "size", "wall s", "MiB", "amp | img/s", "vs alternative", "notes")


def human(n: float) -> str:
    for unit, size in (("TiB", 1024**4), ("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= size:
            v = n / size
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n:.0f} B"


def versus(name: str, alt: float | None, ours: float, attempted: bool) -> str:
    if not attempted:
        return "-"
    if alt is None:
        return f"{name}: failed"
    return f"{name} {alt:.1f} s = {alt / ours:.0f}x"


# ---------------------------------------------------------------------------------------------- machine facts

def sh(*cmd: str) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def memory() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return human(int(line.split()[1]) * 1024)
    except OSError:
        pass
    return "?"


def facts(cache: Path) -> list[tuple[str, str]]:
    fs = sh("findmnt", "-n", "-o", "FSTYPE,SOURCE,TARGET", "--target", str(cache)) or sh("stat", "-f", "-c", "%T", str(cache))
    commit = sh("git", "-C", str(ROOT), "log", "-1", "--format=%h %s")
    dirty = sh("git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no")
    version = sh(sys.executable, "-I", "-m", "vhdtool.cli.main", "--version")
    py_start = []
    for _ in range(5):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-I", "-c", "pass"], check=True)
        py_start.append(time.perf_counter() - t0)
    return [
        ("cores (nproc)", f"{os.cpu_count()} ({sh('nproc')} usable)"),
        ("CPU", cpu_model()),
        ("memory", memory()),
        ("kernel", platform.release()),
        ("Python", f"{platform.python_version()} ({sys.executable}); `python -c pass` {sorted(py_start)[2] * 1000:.0f} ms"),
        ("vhdtool", f"{version or '?'}, commit {commit[:70]}{' (with uncommitted changes)' if dirty else ''}"),
        ("bench cache", f"{cache} on {fs}"),
        ("load average", " ".join(Path("/proc/loadavg").read_text().split()[:3]) + " (1, 5, 15 min) at the start"),
    ]


# ---------------------------------------------------------------------------------------------- the parts

def part_inspect(rows, cache: Path, runs: int, guestfs: bool, log) -> None:
    it = load("inspect_time")
    missing = it.missing_tools()
    if missing:
        rows.append(("inspect", "-", "-", "-", "-", "-", "-", f"not run: {', '.join(missing)} not installed"))
        return
    part, images = it.ensure_images(cache)
    for name, image in images.items():
        log(f"inspect {name}")
        m = it.measure(image, runs, with_guestfs=guestfs, guestfs_timeout=GUESTFS_TIMEOUT)
        v, bare = m["vhdtool"], m["three_facts"]
        notes = (f"{v['reads']} reads of a {human(m['file_size'])} file; dissect 3-fact script {bare['wall']:.2f} s, "
                 f"{bare['bytes_read'] / MiB:.1f} MiB; warm in-process {m['warm'] * 1000:.0f} ms")
        rows.append(("inspect", "inspect --json", human(it.SIZES[name]) + " virtual", f"{v['wall']:.2f}",
                     f"{v['bytes_read'] / MiB:.2f} read", "-",
                     versus("virt-inspector", m["virt_inspector"], v["wall"], guestfs), notes))


def part_write(rows, cache: Path, runs: int, sizes_mib: list[int], guestfs: bool, work: Path, log) -> None:
    wr = load("write")
    image = wr.ensure_image(cache)
    for size in sizes_mib:
        log(f"copy-in {size} MiB")
        local = work / f"payload-{size}MiB.bin"
        with open(local, "wb") as f:
            for _ in range(size):
                f.write(os.urandom(MiB))
        m = wr.measure(image, local, runs, work, with_guestfs=guestfs, guestfs_timeout=GUESTFS_TIMEOUT)
        local.unlink()
        rows.append(("copy-in", f"{size} MiB file", human(m["size"]), f"{m['wall']:.2f}",
                     f"{m['written'] / MiB:.2f} written", f"{m['amplification']:.3f}",
                     versus("virt-copy-in", m["virt_copy_in"], m["wall"], guestfs),
                     f"into a 127 GiB image; peak RSS of the process tree {m['rss'] / MiB:.0f} MiB (Pss "
                     f"{m['pss'] / MiB:.0f}); again: {m['again_wall']:.2f} s, {m['again_written']} B written"))


def part_stage(rows, cache: Path, runs: int, sizes_mb: list[int], guestfs: bool, work: Path, log) -> None:
    st = load("stage")
    image = st.ensure_image(cache)
    for size in sizes_mb:
        log(f"stage {size} MB cab")
        cabs = work / f"cabs-{size}MB"
        st.make_cab(cabs, size * 1000 * 1000)
        m = st.measure(image, cabs, runs, work, with_guestfs=guestfs, guestfs_timeout=GUESTFS_TIMEOUT)
        shutil.rmtree(cabs)
        rows.append(("stage", f"{size} MB cab", f"{m['size'] / 1e6:.1f} MB", f"{m['wall']:.2f}",
                     f"{m['written'] / MiB:.2f} written", f"{m['amplification']:.3f}",
                     versus("virt-customize + virt-win-reg", m["guestfs"], m["wall"], guestfs),
                     f"into a 127 GiB image; again: {m['again_wall']:.2f} s, {m['again_written']} B written"))


def part_batch(rows, cache: Path, runs: int, n_images: dict, work: Path, log, wait_quiet: float) -> list[str]:
    bt = load("batch")
    checks = []
    if wait_quiet > 0:
        log(f"waiting (at most {wait_quiet:.0f} s) for the machine's other processes to quieten")
        waited, busy = bt.wait_quiet(wait_quiet)
        checks.append(f"batch: waited {waited:.0f} s for a quiet machine; other processes then kept {busy:.2f} cores busy")
    log(f"batch over {', '.join(f'{n} images ({c})' for c, n in n_images.items())}")
    m = bt.measure(cache, work, runs, n_images)
    for command, per_jobs in m["results"].items():
        size = f"{n_images[command]} x {human(m['virtual_size'] or 0)}"
        for n, kinds in per_jobs.items():
            b, x = kinds.get("batch"), kinds.get("xargs")
            alt = f"xargs -P {n}: {x['images_per_s']:.1f} img/s" if x else "-"
            if b is None:
                rows.append(("batch", f"{command} --jobs {n}", size, "-", "-", "-", alt,
                             "vhdtool batch is not there yet"))
                continue
            if x:
                alt += f" (batch {b['images_per_s'] / x['images_per_s']:.1f}x that)"
            notes = f"speed-up {b['speedup']:.2f}x over 1 worker"
            if n == 2:
                ok = b["speedup"] >= bt.TARGET_SPEEDUP_2
                notes += f" ({'meets' if ok else 'BELOW'} the {bt.TARGET_SPEEDUP_2}x target)"
                checks.append(f"batch {command}: 2 workers {b['speedup']:.2f}x the images/s of 1 worker "
                              f"(target >= {bt.TARGET_SPEEDUP_2}): {'ok' if ok else 'BELOW TARGET'}")
            if b.get("span"):
                notes += f"; first image start to last end {b['span']:.2f} s"
                if b.get("span_speedup") and n != per_jobs_first(per_jobs):
                    notes += f" ({b['span_speedup']:.2f}x)"
            notes += f"; other processes busy {b['other_cores']:.1f} cores"
            rows.append(("batch", f"{command} --jobs {n}", size, f"{b['wall']:.2f}", "-",
                         f"{b['images_per_s']:.1f} img/s", alt, notes))
    return checks


def per_jobs_first(per_jobs: dict) -> int:
    return next(iter(per_jobs))


# ---------------------------------------------------------------------------------------------- the table

def table(rows: list[tuple]) -> str:
    rows = [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(HEADERS)]
    right = {3, 4, 5}

    def line(cells):
        return " | ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(HEADERS), "-+-".join("-" * w for w in widths)]
    area = None
    for r in rows:
        if area is not None and r[0] != area:
            out.append("-+-".join("-" * w for w in widths))
        area = r[0]
        out.append(line(r))
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one run, 1 and 10 MB files and cabs, no libguestfs")
    ap.add_argument("--runs", type=int, help="runs per figure, median taken (default 3, 1 with --quick)")
    ap.add_argument("--images", type=int, default=32, help="images per batch stage (default 32)")
    ap.add_argument("--inspect-images", type=int, default=128,
                    help="images per batch inspect (default 128: at ~17 ms an image, 32 would mostly time the "
                         "process start)")
    ap.add_argument("--no-guestfs", action="store_true", help="skip the libguestfs comparisons")
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                    help="before the batch part, wait up to S seconds until other processes keep < 0.25 cores busy")
    ap.add_argument("--only", nargs="+", choices=("inspect", "copy-in", "stage", "batch"),
                    help="run only these parts")
    ap.add_argument("--cache", type=Path, default=BENCH / ".cache")
    args = ap.parse_args()
    runs = args.runs or (1 if args.quick else 3)
    sizes = [1, 10] if args.quick else [10, 100]
    parts = args.only or ["inspect", "copy-in", "stage", "batch"]
    args.cache.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    print("vhdtool benchmarks (bench/run.py)")
    for key, value in facts(args.cache):
        print(f"  {key:<14} {value}")
    if args.quick or args.no_guestfs:
        guestfs, how = False, "skipped (" + ("--quick" if args.quick else "--no-guestfs") + ")"
    else:
        guestfs, how = load("guestfs").setup()
    print(f"  {'libguestfs':<14} {how}")
    print(f"  {'runs':<14} median of {runs} per figure" + ("; libguestfs once" if guestfs else ""))
    print(flush=True)

    def log(what: str) -> None:
        print(f"  [{time.perf_counter() - t_start:6.1f} s] {what}", file=sys.stderr, flush=True)

    rows: list[tuple] = []
    checks: list[str] = []
    failures: list[str] = []
    with tempfile.TemporaryDirectory(dir=args.cache, prefix="run-") as tmp:
        work = Path(tmp)
        steps = {
            "inspect": lambda: part_inspect(rows, args.cache, runs, guestfs, log),
            "copy-in": lambda: part_write(rows, args.cache, runs, sizes, guestfs, work, log),
            "stage": lambda: part_stage(rows, args.cache, runs, sizes, guestfs, work, log),
            "batch": lambda: checks.extend(part_batch(rows, args.cache, runs,
                                                      {"inspect": args.inspect_images, "stage": args.images},
                                                      work, log, args.wait_quiet)),
        }
        for name in parts:
            t0 = time.perf_counter()
            try:
                steps[name]()
            except Exception as e:  # noqa: BLE001 - one part's failure is a row, the others still run
                failures.append(f"{name}: {type(e).__name__}: {e}")
                rows.append((name, "-", "-", "-", "-", "-", "-", f"FAILED: {str(e)[:120]}"))
            log(f"{name} done in {time.perf_counter() - t0:.1f} s")

    print(table(rows))
    print()
    print("wall s: the whole vhdtool process (median); MiB: read from (inspect) or written to (copy-in, stage) the image "
          "file;\namp: bytes written / file size; img/s: images / whole batch process wall time (worker start-up "
          "included);\nvs alternative: the other tool's wall time and how many times vhdtool's it is "
          "(xargs: one vhdtool process per image).")
    if not guestfs:
        print(f"libguestfs (virt-inspector, virt-copy-in, virt-customize): {how}.")
    for c in checks:
        print(c)
    for f in failures:
        print(f"FAILED {f}")
    print(f"suite: {time.perf_counter() - t_start:.0f} s; load average at the end "
          f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
