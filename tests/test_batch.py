"""`vhdtool batch` and `vhdtool report` over a fleet of fixture images, run as real processes.

What the batch did is judged by tools other than vhdtool: qemu-img check (VHDX) and
qemu-img convert (VHD) for the containers, sfdisk and ntfs-3g's ntfsls for what was
staged (exactly one staged folder per serviced image), hivexget for the boot hook,
and sha256 for images that must not have changed. Kills are real signals to the
real processes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from conftest import ROOT
from fixtures import build as fb
from fixtures.cabs import CabSpec, build_iso
from judges.hives import hive_typed_values
from judges.tools import sh
from judges.volumes import extract_partition, partition_table, raw_image

pytestmark = pytest.mark.fixtures
WIN8_IC = "6.2.9200.16384"
SOME_FAILED = 21

# 16 images: several guests, one damaged, one hibernated, one already up to date
# (Server 2012 has 6.2.9200.16384, the ISO's version), one Linux guest, both formats.
FLEET = [
    ("ws2008r2-x64", "a"), ("ws2008r2-x64", "b"), ("ws2008r2-x64", "c"), ("ws2008r2-x64", "d"),
    ("ws2008r2-x64-fixed", ""), ("ws2008r2-x64-vhd", ""), ("ws2008r2-x64-fixed-vhd", ""),
    ("ws2008r2-nokvp", ""), ("ws2008r2-dirtyhive", ""), ("win7-x86", ""), ("ws2008-sp2-x64", ""),
    ("ws2012-sysprep", ""), ("win10-gpt", ""), ("ubuntu-ext4", ""), ("ws2008r2-hibernated", ""),
]
STAGED = {"ws2008r2-x64-a", "ws2008r2-x64-b", "ws2008r2-x64-c", "ws2008r2-x64-d", "ws2008r2-x64-fixed",
          "ws2008r2-x64-vhd", "ws2008r2-x64-fixed-vhd", "ws2008r2-nokvp", "ws2008r2-dirtyhive", "win7-x86",
          "ws2008-sp2-x64"}
FAILING = {"damaged": 4, "ws2008r2-hibernated": 18}


def stem(path: str | Path) -> str:
    return Path(path).name.rsplit(".", 1)[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def fleet_src(tmp_path_factory):
    """The 16 original images (never written) and the ISO to stage from."""
    root = tmp_path_factory.mktemp("fleet")
    images = root / "images"
    images.mkdir()
    for name, suffix in FLEET:
        src = Path(fb.build(name))
        dst = images / f"{name}{'-' + suffix if suffix else ''}{src.suffix}"
        shutil.copyfile(src, dst)
    damaged = images / "damaged.vhdx"
    shutil.copyfile(fb.build("ws2008r2-x64"), damaged)
    with open(damaged, "r+b") as f:  # both VHDX headers (64 KiB and 128 KiB) overwritten
        for offset in (64 * 1024, 128 * 1024):
            f.seek(offset)
            f.write(b"\xa5" * 4096)
    iso = build_iso([CabSpec(nt, arch, WIN8_IC) for nt in ("6.0", "6.1", "6.2") for arch in ("x64", "x86")],
                    root / "vmguest.iso")
    return images, iso


@pytest.fixture
def fleet(fleet_src, tmp_path):
    images, iso = fleet_src
    work = tmp_path / "images"
    work.mkdir()
    for p in sorted(images.iterdir()):
        subprocess.run(["cp", "--sparse=always", str(p), str(work / p.name)], check=True)
    return work, iso


def vhdtool(*args, env=None, timeout=300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vhdtool.cli.main", *map(str, args)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), **(env or {})), timeout=timeout, **kw)


def start(*args, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vhdtool.cli.main", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT), **(env or {})))


def records(report: Path) -> list[dict]:
    lines = report.read_text().splitlines()
    out = [json.loads(line) for line in lines if line.strip()]  # every line is whole JSON
    assert all(r["record"] == "vhdtool-batch" and r["schema"] == 1 for r in out)
    return out


def stage_args(work: Path, iso: Path, report: Path, *extra) -> list:
    return ["batch", "stage", f"{work}/*", "--host", "win8", "--cabs", iso, "--jobs", "2", "--report", report, *extra]


def system_volume(image: Path, tmp: Path) -> Path | None:
    """The NTFS volume holding /Windows, cut out of qemu-img's raw conversion by sfdisk's table."""
    raw = raw_image(image, tmp / f"{image.name}.raw")
    try:
        for n, _ in enumerate(partition_table(raw)["partitions"], 1):
            part = extract_partition(raw, n, tmp / f"{image.name}.p{n}")
            if subprocess.run(["ntfsls", "-f", "-p", "/Windows", str(part)], capture_output=True).returncode == 0:
                return part
            part.unlink()
    finally:
        raw.unlink()
    return None


def staged_folders(part: Path) -> list[str]:
    res = subprocess.run(["ntfsls", "-f", "-p", "/Windows/vhdtool", str(part)], capture_output=True, text=True)
    return sorted(set(res.stdout.split()) - {".", ".."}) if res.returncode == 0 else []


def container_ok(image: Path, tmp: Path | None = None) -> None:
    if image.suffix == ".vhdx":
        res = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
        assert res.returncode == 0 and "No errors were found" in res.stdout, (image, res.stdout, res.stderr)
    else:  # qemu-img cannot check VHD ("vpc"); it must still read all of it
        raw = image.with_name(image.name + ".judge.raw")
        subprocess.run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", str(image), str(raw)], check=True,
                       capture_output=True)
        raw.unlink()


def judge_serviced_once(work: Path, tmp: Path, names=STAGED) -> None:
    """Every image passes qemu-img; each staged one holds exactly one staged folder and the boot hook."""
    for image in sorted(work.iterdir()):
        if stem(image) == "damaged":
            continue
        container_ok(image)
        if stem(image) not in names:
            continue
        part = system_volume(image, tmp)
        folders = staged_folders(part)
        assert len(folders) == 1, (image, folders)
        hive = tmp / "SYSTEM"
        hive.write_bytes(sh("ntfscat", "-f", part, "/Windows/System32/config/SYSTEM").stdout)
        setup = hive_typed_values(hive, "Setup")
        assert setup["SetupType"] == (4, 2) and folders[0] in setup["CmdLine"][1], (image, setup)
        part.unlink()


def test_a_fleet_is_staged_failures_named_and_resume_does_nothing(fleet, tmp_path):
    work, iso = fleet
    originals = {p.name: digest(p) for p in work.iterdir()}
    report = tmp_path / "report.jsonl"
    res = vhdtool(*stage_args(work, iso, report))
    assert res.returncode == SOME_FAILED, res.stderr
    recs = records(report)
    assert sorted(stem(r["image"]) for r in recs) == sorted(stem(p) for p in work.iterdir()) and len(recs) == 16
    for r in recs:
        name = stem(r["image"])
        if name in FAILING:
            assert r["outcome"] == "failed" and r["exit_code"] == FAILING[name], r
            assert r["error"]["message"].startswith(str(work)) and "\n" not in r["error"]["message"]
        else:
            assert r["outcome"] == "ok" and r["exit_code"] == 0, r
            assert r["result"]["staged"] == (name in STAGED), r
            assert r["result"]["method"] == ("up-to-date" if name == "ws2012-sysprep" else r["result"]["method"])
    assert "hibernated" in next(r for r in recs if stem(r["image"]) == "ws2008r2-hibernated")["error"]["message"]
    assert re.search(r"16 images: 14 ok, 2 failed", res.stderr), res.stderr
    # The images that failed, and the ones with nothing to do, were not written.
    for p in work.iterdir():
        if stem(p) not in STAGED:
            assert digest(p) == originals[p.name], p
    judge_serviced_once(work, tmp_path)

    # Again with --resume: the 14 done are left alone (not even opened for writing: byte-identical),
    # the 2 failures are tried again and fail the same way.
    after = {p.name: digest(p) for p in work.iterdir()}
    res = vhdtool(*stage_args(work, iso, report, "--resume"))
    assert res.returncode == SOME_FAILED, res.stderr
    assert "14 images already done" in res.stderr
    again = records(report)[16:]
    assert sorted((stem(r["image"]), r["exit_code"]) for r in again) == sorted(FAILING.items())
    assert {p.name: digest(p) for p in work.iterdir()} == after


def children(pid: int) -> set[int]:
    out = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out |= {int(c) for c in (task / "children").read_text().split()}
        except OSError:
            pass
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_sigkill_midway_then_resume_services_every_image_exactly_once(fleet, tmp_path):
    work, iso = fleet
    report = tmp_path / "report.jsonl"
    killed_at = []
    for after in (3, 7, 11):  # kill the whole batch three times, each time with images in hand
        proc = start(*stage_args(work, iso, report, "--resume"))
        deadline = time.monotonic() + 120
        workers = set()
        while time.monotonic() < deadline and proc.poll() is None:
            workers |= children(proc.pid)
            if report.exists() and sum(1 for r in records(report) if r["outcome"] == "ok") >= after:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        killed_at.append(len(records(report)))
        # Its workers die with it (PR_SET_PDEATHSIG): none writes on behind the resumed batch.
        assert workers
        t = time.monotonic()
        while any(alive(w) for w in workers) and time.monotonic() - t < 10:
            time.sleep(0.05)
        assert not any(alive(w) for w in workers)
    res = vhdtool(*stage_args(work, iso, report, "--resume"))
    assert res.returncode == SOME_FAILED, res.stderr
    recs = records(report)
    ok = [stem(r["image"]) for r in recs if r["outcome"] == "ok"]
    assert sorted(ok) == sorted(set(ok)), "an image succeeded twice"
    assert set(ok) == {stem(p) for p in work.iterdir()} - set(FAILING)
    judge_serviced_once(work, tmp_path)
    print(f"\nkilled after {killed_at} records; {len(recs)} records in all")


def test_sigterm_lets_the_images_in_hand_finish(fleet, fleet_src, tmp_path):
    work, iso = fleet
    originals, _ = fleet_src
    report = tmp_path / "report.jsonl"
    proc = start(*stage_args(work, iso, report))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (report.exists() and records(report)):
        time.sleep(0.01)
    in_hand = {int(c) for c in children(proc.pid)}
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "SIGTERM: stopping" in err and in_hand
    recs = records(report)
    assert 1 <= len(recs) < 16, err
    done = {stem(r["image"]) for r in recs}
    # Every image either has its record (it finished) or is exactly as it was (never started).
    for p in work.iterdir():
        if stem(p) not in done:
            assert digest(p) == digest(originals / p.name), p
    judge_serviced_once(work, tmp_path, names=STAGED & done)
    res = vhdtool(*stage_args(work, iso, report, "--resume"))
    assert res.returncode == SOME_FAILED
    assert {stem(r["image"]) for r in records(report)} == {stem(p) for p in work.iterdir()}


def test_a_worker_that_crashes_or_hangs_fails_that_image_only(fleet_src, tmp_path):
    images, _ = fleet_src
    names = ["ws2008r2-x64-a.vhdx", "ws2008r2-x64-b.vhdx", "win7-x86.vhdx", "ubuntu-ext4.vhdx"]
    args = ["batch", "inspect", *(images / n for n in names), "--jobs", "2"]
    res = vhdtool(*args, "--report", tmp_path / "crash.jsonl", env={"VHDTOOL_TEST_FAULT": "crash:win7-x86"})
    assert res.returncode == SOME_FAILED, res.stderr
    by = {Path(r["image"]).name: r for r in records(tmp_path / "crash.jsonl")}
    assert len(by) == 4 and by["win7-x86.vhdx"]["exit_code"] == 23
    assert "signal 11, SIGSEGV" in by["win7-x86.vhdx"]["error"]["message"]
    assert all(r["outcome"] == "ok" for n, r in by.items() if n != "win7-x86.vhdx")

    t = time.monotonic()
    res = vhdtool(*args, "--timeout", "3", "--report", tmp_path / "hang.jsonl",
                  env={"VHDTOOL_TEST_FAULT": "hang:ubuntu"})
    assert res.returncode == SOME_FAILED and time.monotonic() - t < 30, res.stderr
    by = {Path(r["image"]).name: r for r in records(tmp_path / "hang.jsonl")}
    assert by["ubuntu-ext4.vhdx"]["exit_code"] == 22 and "not done after 3 s" in by["ubuntu-ext4.vhdx"]["error"]["message"]
    assert all(r["outcome"] == "ok" for n, r in by.items() if n != "ubuntu-ext4.vhdx")


def test_a_timeout_in_the_middle_of_a_write_leaves_the_image_old_or_new(fleet_src, tmp_path):
    images, iso = fleet_src
    seen = set()
    for limit in (0.005, 0.02, 0.04, 0.07, 0.1, 0.15, 0.3):
        victim = tmp_path / "victim.vhdx"
        shutil.copyfile(images / "ws2008r2-x64-a.vhdx", victim)
        report = tmp_path / f"r{limit}.jsonl"
        res = vhdtool("batch", "stage", victim, "--host", "win8", "--cabs", iso, "--timeout", limit,
                      "--report", report)
        (rec,) = records(report)
        seen.add(rec["exit_code"])
        assert (res.returncode, rec["exit_code"]) in ((0, 0), (SOME_FAILED, 22)), res.stderr
        repaired = tmp_path / "repaired.vhdx"
        shutil.copyfile(victim, repaired)
        subprocess.run(["qemu-img", "check", "-r", "all", str(repaired)], check=True, capture_output=True)
        container_ok(repaired)
        state = json.loads(vhdtool("status", "--json", victim).stdout)["state"]
        assert state in ("none", "pending"), state
        # Old or new: a second batch finishes the job.
        res = vhdtool("batch", "stage", victim, "--host", "win8", "--cabs", iso, "--report", report)
        assert res.returncode == 0 and json.loads(vhdtool("status", "--json", victim).stdout)["state"] == "pending"
    assert 22 in seen, seen


def test_shards_cover_every_image_exactly_once(fleet_src, tmp_path):
    images, _ = fleet_src
    paths = sorted(str(p) for p in images.iterdir())
    forward, backward = tmp_path / "forward.csv", tmp_path / "backward.jsonl"
    forward.write_text("image\n" + "".join(f"{p}\n" for p in paths))
    backward.write_text("".join(json.dumps({"image": p}) + "\n" for p in reversed(paths)))

    def keys(report: Path) -> list[str]:
        return [r["key"] for r in records(report)]

    runs = {}
    for k, manifest in ((1, forward), (2, backward)):  # the two machines list the images in other orders
        report = tmp_path / f"shard{k}.jsonl"
        res = vhdtool("batch", "inspect", "--manifest", manifest, "--shard", f"{k}/2", "--report", report)
        assert f"shard {k}/2 (--shard {k}/2)" in res.stderr and res.returncode in (0, SOME_FAILED), res.stderr
        runs[k] = keys(report)
    assert sorted(runs[1] + runs[2]) == paths and abs(len(runs[1]) - len(runs[2])) <= 1
    # Kubernetes (the index from the Job, the count from VHDTOOL_SHARDS) and Slurm arrays, by their environment.
    for name, envs in {
        "k8s": [{"JOB_COMPLETION_INDEX": str(i), "VHDTOOL_SHARDS": "3"} for i in range(3)],
        "slurm": [{"SLURM_ARRAY_TASK_ID": str(i), "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "5",
                   "SLURM_ARRAY_TASK_MAX": "11", "SLURM_ARRAY_TASK_STEP": "2"} for i in (5, 7, 9, 11)],
    }.items():
        got = []
        for env in envs:
            report = tmp_path / f"{name}-{len(got)}.jsonl"
            res = vhdtool("batch", "inspect", "--manifest", forward, "--report", report, env=env)
            assert res.returncode in (0, SOME_FAILED), res.stderr
            assert ("JOB_COMPLETION_INDEX=" if name == "k8s" else "SLURM_ARRAY_TASK_ID=") in res.stderr
            got.extend(keys(report))
        assert sorted(got) == paths, name
    # The merged report of both shards: every image once, the two failures with their reasons.
    res = vhdtool("report", tmp_path / "shard1.jsonl", tmp_path / "shard2.jsonl", "--json")
    doc = json.loads(res.stdout)
    assert res.returncode == SOME_FAILED and doc["images"] == 16 and doc["duplicates"] == []
    assert doc["by_shard"] == {"1/2": len(runs[1]), "2/2": len(runs[2])}
    # inspect fails on the damaged image only; the hibernated guest reads fine.
    assert [(stem(f["image"]), f["exit_code"]) for f in doc["failures"]] == [("damaged", 4)]
    assert doc["by_guest"]["Windows Server 2008 R2 Standard x64"] >= 4


def test_report_merges_reruns_and_survives_a_torn_line(fleet_src, tmp_path):
    images, iso = fleet_src
    report = tmp_path / "r.jsonl"
    names = [images / "ws2008r2-x64-a.vhdx", images / "damaged.vhdx", images / "ubuntu-ext4.vhdx"]
    vhdtool("batch", "plan", *names, "--host", "win8", "--cabs", iso, "--report", report)
    with open(report, "a") as f:
        f.write('{"schema": 1, "record": "vhdtool-batch", "comm')  # a batch killed mid-line
    res = vhdtool("batch", "plan", *names[:1], "--host", "win8", "--cabs", iso, "--report", report)
    assert res.returncode == 0, res.stderr
    lines = report.read_text().splitlines()
    assert len(lines) == 5 and json.loads(lines[-1])["outcome"] == "ok"  # the new record is on a line of its own
    res = vhdtool("report", report)
    assert res.returncode == SOME_FAILED
    assert "3 images: 2 ok, 1 failed (4 records)" in res.stdout and "skipped" in res.stdout
    assert "integration-services-disk" in res.stdout and "win8" in res.stdout
    doc = json.loads(vhdtool("report", report, "--json").stdout)
    assert doc["by_method"] == {"integration-services-disk": 1, "up-to-date": 1}
    assert doc["unreadable_lines"] and doc["unreadable_lines"][0].endswith("not JSON (a line cut short by a crash?)")
    res = vhdtool("report", tmp_path / "nothing.jsonl")
    assert res.returncode == 25 and res.stderr.count("\n") == 1 and "nothing.jsonl" in res.stderr


def test_manifest_columns_host_output_and_cabs(fleet_src, tmp_path):
    images, iso = fleet_src
    work = tmp_path / "share"
    work.mkdir()
    for n in ("ws2008r2-x64-a.vhdx", "win7-x86.vhdx", "ws2008r2-x64-b.vhdx"):
        shutil.copyfile(images / n, work / n)
    before = {p.name: digest(p) for p in work.iterdir()}
    shutil.copyfile(iso, work / "vmguest.iso")
    # Relative to the manifest's folder; a per-image host, output copy and cab source.
    (work / "fleet.csv").write_text(
        "image,host,output,cabs\n"
        "ws2008r2-x64-a.vhdx,,golden/a.vhdx,\n"
        "win7-x86.vhdx,win8.1,,vmguest.iso\n"
        "# a comment\n\n"
        "ws2008r2-x64-b.vhdx,2012,,\n")
    (work / "golden").mkdir()
    report = tmp_path / "r.jsonl"
    res = vhdtool("batch", "stage", "-m", work / "fleet.csv", "--host", "auto", "--cabs", iso, "--report", report,
                  "--jobs", "2")
    assert res.returncode == 0, res.stderr
    by = {stem(r["key"]): r["result"] for r in records(report)}
    assert by["ws2008r2-x64-a"]["output"] == str(work / "golden/a.vhdx") and by["ws2008r2-x64-a"]["staged"]
    assert by["ws2008r2-x64-a"]["host"] == "win8"  # --host auto: the host it last ran on
    assert by["win7-x86"]["host"] == "win8.1" and by["ws2008r2-x64-b"]["host"] == "win8"
    after = {p.name: digest(p) for p in work.iterdir() if p.suffix == ".vhdx"}
    assert after["ws2008r2-x64-a.vhdx"] == before["ws2008r2-x64-a.vhdx"]  # written to its copy instead
    assert after["win7-x86.vhdx"] != before["win7-x86.vhdx"]
    container_ok(work / "golden/a.vhdx")
    assert len(staged_folders(system_volume(work / "golden/a.vhdx", tmp_path))) == 1

    # JSON lines; the same file under two paths runs once.
    (work / "fleet.jsonl").write_text(json.dumps({"image": "ws2008r2-x64-b.vhdx", "host": "win8"}) + "\n"
                                      + json.dumps({"path": "./ws2008r2-x64-b.vhdx"}) + "\n")
    res = vhdtool("batch", "plan", "-m", work / "fleet.jsonl", "--cabs", iso)
    assert res.returncode == 0 and len(res.stdout.splitlines()) == 1 and "it runs once" in res.stderr
    # No host anywhere: that image fails with its reason; the others go on.
    res = vhdtool("batch", "plan", work / "win7-x86.vhdx")
    assert res.returncode == SOME_FAILED and "no host for this image" in res.stdout


@pytest.mark.parametrize("content, message", [
    ("image,colour\nx.vhdx,blue\n", "unknown column 'colour'"),
    ('{"image": "x.vhdx"}\n{"image": \n', "line 2: not JSON"),
    ('{"image": 5}\n', "line 1: image must be a string"),
    ("x.vhdx,win8,,,extra\n", "line 1: 5 cells"),
])
def test_bad_manifests_are_one_line_errors(tmp_path, content, message):
    m = tmp_path / ("m.jsonl" if content.startswith("{") else "m.csv")
    m.write_text(content)
    res = vhdtool("batch", "inspect", "--manifest", m)
    assert res.returncode == 24 and res.stderr.count("\n") == 1 and message in res.stderr and str(m) in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("args, env, message", [
    (["--resume"], {}, "--resume needs --report"),
    (["--shard", "3/2"], {}, "shard 3 of 2 does not exist"),
    (["--shard", "x"], {}, "is not K/N"),
    ([], {"JOB_COMPLETION_INDEX": "1"}, "not the number of shards"),
    ([], {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1",
          "SLURM_ARRAY_TASK_MAX": "9", "SLURM_ARRAY_TASK_STEP": "1"}, "cannot be numbered"),
    (["'/nowhere/*.vhdx'"], {}, "matches no file"),
])
def test_batch_usage_errors(tmp_path, args, env, message):
    image = tmp_path / "x.vhdx"
    image.write_bytes(b"")
    res = vhdtool("batch", "inspect", *([image] if not any("nowhere" in a for a in args) else []),
                  *[a.strip("'") for a in args], env=env)
    assert res.returncode in (2, 24) and message in res.stderr and res.stderr.count("\n") == 1, res.stderr


def run_in_pty(args: list, timeout: float = 120) -> tuple[int, str]:
    """Run vhdtool with stderr on a pseudo-terminal (stdout to a pipe); what the terminal showed."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="100")
    env.pop("CI", None)
    proc = subprocess.Popen([sys.executable, "-m", "vhdtool.cli.main", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=slave, env=env)
    os.close(slave)
    shown = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([master], [], [], 0.1)
        if r:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
        elif proc.poll() is not None:
            break
    proc.wait()
    proc.stdout.close()
    os.close(master)
    return proc.returncode, shown.decode("utf-8", "replace")


def test_progress_bar_on_a_terminal_lines_otherwise(fleet_src, tmp_path):
    images, _ = fleet_src
    names = [images / n for n in ("ws2008r2-x64-a.vhdx", "ws2008r2-x64-b.vhdx", "win7-x86.vhdx", "damaged.vhdx")]
    code, shown = run_in_pty(["batch", "inspect", *names, "--jobs", "2", "--report", tmp_path / "r.jsonl"])
    assert code == SOME_FAILED
    assert re.search(r"batch inspect: +\d+%\|", shown) and "4/4" in shown and "image/s" in shown, shown
    assert "ok 3, failed 1, skipped 0" in shown and "failed " + str(names[3]) in shown, shown
    res = vhdtool("batch", "inspect", *names, "--jobs", "2", "--report", tmp_path / "r2.jsonl")
    assert "%|" not in res.stderr and re.search(r"batch: \[4/4\] (ok|failed) ", res.stderr), res.stderr


def test_kubernetes_example_runs_each_index(fleet_src, tmp_path):
    yaml = pytest.importorskip("yaml")
    images, iso = fleet_src
    job = yaml.safe_load((ROOT / "deploy/kubernetes/vhdtool-batch-job.yaml").read_text())
    spec = job["spec"]
    assert job["kind"] == "Job" and spec["completionMode"] == "Indexed"
    container = spec["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    assert int(env["VHDTOOL_SHARDS"]) == spec["completions"]
    mount = container["volumeMounts"][0]["mountPath"]
    share = tmp_path / "share"
    shutil.copytree(images, share / "images")
    shutil.copyfile(iso, share / "vmguest.iso")
    (share / "manifest.csv").write_text("image\n" + "".join(f"images/{p.name}\n" for p in sorted(images.iterdir())))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "vhdtool").write_text(f"#!/bin/sh\nexec {sys.executable} -m vhdtool.cli.main \"$@\"\n")
    (bindir / "vhdtool").chmod(0o755)
    command = [c.replace(mount, str(share)) for c in container["command"] + container.get("args", [])]
    for index in range(spec["completions"]):  # what each pod of the Indexed Job runs
        res = subprocess.run(command, capture_output=True, text=True, timeout=300,
                             env=dict(os.environ, PYTHONPATH=str(ROOT), PATH=f"{bindir}:{os.environ['PATH']}",
                                      JOB_COMPLETION_INDEX=str(index), **env))
        assert res.returncode in (0, SOME_FAILED), res.stderr
        assert f"JOB_COMPLETION_INDEX={index} of {spec['completions']}" in res.stderr
    reports = sorted((share / "reports").glob("*.jsonl"))
    assert len(reports) == spec["completions"]
    keys = [r["key"] for p in reports for r in records(p)]
    assert sorted(keys) == sorted(f"images/{p.name}" for p in images.iterdir())


def test_fail_fast_starts_nothing_after_the_first_failure(fleet_src, tmp_path):
    images, _ = fleet_src
    report = tmp_path / "r.jsonl"
    res = vhdtool("batch", "inspect", images / "damaged.vhdx", images / "win7-x86.vhdx", images / "ubuntu-ext4.vhdx",
                  "--jobs", "1", "--fail-fast", "--report", report)
    assert res.returncode == SOME_FAILED and "2 not run" in res.stderr, res.stderr
    assert [(stem(r["image"]), r["outcome"]) for r in records(report)] == [("damaged", "failed")]


def test_a_second_signal_kills_the_workers_and_each_image_is_old_or_new(fleet, tmp_path):
    work, iso = fleet
    report = tmp_path / "report.jsonl"
    # One worker hangs on an image (a test hook): the first signal waits for it, the second kills it.
    proc = start(*stage_args(work, iso, report), env={"VHDTOOL_TEST_FAULT": "hang:ws2008r2-x64-c"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (report.exists() and len(records(report)) >= 15):  # all but it
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    time.sleep(1.0)
    assert proc.poll() is None  # still waiting for the image in hand
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "SIGINT again: killing the workers" in err, err
    assert re.search(r"killed in hand, with no record .*ws2008r2-x64-c\.vhdx", err), err
    for image in sorted(work.iterdir()):
        if stem(image) in FAILING:
            continue
        copy = tmp_path / image.name
        shutil.copyfile(image, copy)
        if copy.suffix == ".vhdx":  # a write cut short leaves a log that the next open replays
            subprocess.run(["qemu-img", "check", "-r", "all", str(copy)], check=True, capture_output=True)
        container_ok(copy)
        copy.unlink()
        if stem(image) in STAGED:
            state = json.loads(vhdtool("status", "--json", image).stdout)["state"]
            assert state in ("none", "pending"), (image, state)
    res = vhdtool(*stage_args(work, iso, report, "--resume"))
    assert res.returncode == SOME_FAILED
    judge_serviced_once(work, tmp_path)


def test_a_slurm_job_array_stages_the_fleet_each_image_once(fleet, tmp_path):
    """deploy/slurm/vhdtool-batch.sbatch as a 4-task array on a one-node Slurm the test starts itself."""
    from slurm import slurm_cluster

    work, iso = fleet
    manifest = tmp_path / "images.csv"
    manifest.write_text("image\n" + "".join(f"{p}\n" for p in sorted(work.iterdir())))
    reports = tmp_path / "reports"
    with slurm_cluster(tmp_path / "slurm") as cluster:

        def submit(output: str) -> int:
            return cluster.sbatch(
                ROOT / "deploy/slurm/vhdtool-batch.sbatch", "--cpus-per-task=1", f"--output={tmp_path}/{output}",
                cwd=tmp_path,
                env_extra={"MANIFEST": str(manifest), "REPORTS": str(reports),
                           "VHDTOOL": f"{sys.executable} -m vhdtool.cli.main", "PYTHONPATH": str(ROOT),
                           "VHDTOOL_ARGS": f"--host win8 --cabs {iso}"})

        job = submit("%x-%A_%a.out")
        results = cluster.wait(job, timeout=240)
        first = {p.name: len(records(p)) for p in reports.glob("*.jsonl")}
        digests = {p.name: digest(p) for p in work.iterdir()}
        # The same array submitted again resumes: the 14 done are skipped, the 2 failures tried again.
        cluster.wait(submit("again-%A_%a.out"), timeout=240)
    retried = [r for p in reports.glob("*.jsonl") for r in records(p)[first[p.name]:]]
    assert sorted((stem(r["image"]), r["exit_code"]) for r in retried) == sorted(FAILING.items())
    assert {p.name: digest(p) for p in work.iterdir()} == digests
    assert sorted(results) == [0, 1, 2, 3]
    # What follows judges the first run: each report's records before the retries.
    recs = [r for p in sorted(reports.glob("*.jsonl")) for r in records(p)[:first[p.name]]]
    assert len(list(reports.glob("*.jsonl"))) == 4
    # Every image once, by exactly one task, each task on its own shard.
    assert sorted(r["key"] for r in recs) == sorted(str(p) for p in work.iterdir())
    assert {r["shard"] for r in recs} == {"1/4", "2/4", "3/4", "4/4"}
    for task, r in results.items():
        out = (tmp_path / f"vhdtool-batch-{job}_{task}.out").read_text()
        assert f"SLURM_ARRAY_TASK_ID={task} of 4" in out
        shard_failed = any(x["outcome"] == "failed" for x in recs if x["shard"] == f"{task + 1}/4")
        assert (r.state, r.exit_code) == (("FAILED", 21) if shard_failed else ("COMPLETED", 0)), out
    assert sorted((stem(x["image"]), x["exit_code"]) for x in recs if x["outcome"] == "failed") == sorted(FAILING.items())
    res = vhdtool("report", *sorted(reports.glob("*.jsonl")), "--json")
    doc = json.loads(res.stdout)
    assert doc["images"] == 16 and doc["outcomes"] == {"ok": 14, "failed": 2} and not doc["duplicates"]
    judge_serviced_once(work, tmp_path)
