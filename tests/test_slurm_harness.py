"""The private Slurm cluster of tests/slurm.py, and deploy/slurm/vhdtool-batch.sbatch run on it.

Needs root and Debian's slurm-wlm + munge (install.sh --test installs them); skips otherwise.
One cluster serves the module: it is up (node idle) in about a second, but slurmctld's
first scheduling pass comes ~3 s after it starts, so the first array takes ~5 s and later
4-task arrays 2-3 s on this 2-CPU node (the module: ~17 s). Uses no vhdtool: the sbatch
script runs with a stub in its place that records what it was given.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from slurm import SlurmCluster, slurm_cluster

ROOT = Path(__file__).resolve().parent.parent
SBATCH_SCRIPT = ROOT / "deploy" / "slurm" / "vhdtool-batch.sbatch"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    t0 = time.monotonic()
    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as c:
        print(f"slurm cluster up in {time.monotonic() - t0:.2f}s")
        yield c


def write_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)
    return path


def test_array_tasks_run_once_each_with_their_array_environment(cluster: SlurmCluster, tmp_path):
    # 1-7:2 rather than 0-3, so MIN and STEP are not their defaults: batch's shard number
    # (TASK_ID-MIN)/STEP+1 needs all four variables.
    script = write_script(tmp_path / "task.sh", """\
echo "$SLURM_ARRAY_TASK_ID $SLURM_ARRAY_TASK_COUNT $SLURM_ARRAY_TASK_MIN $SLURM_ARRAY_TASK_STEP $SLURM_JOB_ID" \
  > "$OUT/task-$SLURM_ARRAY_TASK_ID"
echo "$SLURM_ARRAY_TASK_ID" >> "$OUT/runs"
""")
    t0 = time.monotonic()
    job = cluster.sbatch(script, "--array=1-7:2", f"--output={tmp_path}/%A_%a.out",
                         f"--export=ALL,OUT={tmp_path}", cwd=tmp_path)
    results = cluster.wait(job, timeout=60)
    elapsed = time.monotonic() - t0

    assert sorted(results) == [1, 3, 5, 7], results
    for task, r in results.items():
        assert (r.state, r.exit_code, r.signal) == ("COMPLETED", 0, 0), r
        assert r.array_job_id == job
        tid, count, tmin, step, job_id = (tmp_path / f"task-{task}").read_text().split()
        assert (int(tid), int(count), int(tmin), int(step)) == (task, 4, 1, 2)
        assert int(job_id) == r.job_id
    assert sorted(map(int, (tmp_path / "runs").read_text().split())) == [1, 3, 5, 7]  # once each
    # The same ends as jobcomp/filetxt recorded them (what is left once scontrol forgets).
    assert cluster.completions(job) == results
    print(f"4-task array: submitted to all ended in {elapsed:.2f}s")


def test_failing_tasks_exit_codes_are_seen(cluster: SlurmCluster, tmp_path):
    script = write_script(tmp_path / "task.sh", """\
case "$SLURM_ARRAY_TASK_ID" in
  1) exit 21 ;;
  2) kill -KILL $$ ;;
esac
exit 0
""")
    job = cluster.sbatch(script, "--array=0-2", f"--output={tmp_path}/%A_%a.out", cwd=tmp_path)
    results = cluster.wait(job, timeout=60)
    assert (results[0].state, results[0].exit_code) == ("COMPLETED", 0)
    assert (results[1].state, results[1].exit_code, results[1].signal) == ("FAILED", 21, 0)
    assert results[2].state == "FAILED" and results[2].signal == 9, results[2]
    assert cluster.completions(job) == results

    # A job that is not an array: keyed None.
    single = cluster.sbatch(write_script(tmp_path / "one.sh", "exit 3\n"), f"--output={tmp_path}/%j.out",
                            cwd=tmp_path)
    (r,) = cluster.wait(single, timeout=60).items()
    assert r[0] is None and (r[1].state, r[1].exit_code) == ("FAILED", 3)


STUB = """\
# Stands in for vhdtool: writes what it was given where --report points, as one JSON line.
import json, os, sys
args = sys.argv[1:]
report = args[args.index("--report") + 1]
env = {k: v for k, v in os.environ.items() if k.startswith("SLURM_ARRAY_") or k == "SLURM_CPUS_PER_TASK"}
with open(report, "a") as f:
    f.write(json.dumps({"argv": args, "env": env}) + "\\n")
fail = os.environ.get("STUB_FAIL_TASK")
sys.exit(21 if fail is not None and fail == os.environ.get("SLURM_ARRAY_TASK_ID") else 0)
"""


def test_shipped_sbatch_script_runs_as_an_array(cluster: SlurmCluster, tmp_path):
    stub = tmp_path / "stub_vhdtool.py"
    stub.write_text(STUB)
    manifest = tmp_path / "images.txt"
    manifest.write_text("a.vhdx\nb.vhdx\n")
    reports = tmp_path / "reports"  # made by the script
    # As a user would: site things via --export, the rest from the submitting environment.
    # --cpus-per-task=1 overrides the script's 2 so that the 4 tasks run 2 at a time here.
    job = cluster.sbatch(
        SBATCH_SCRIPT, "--cpus-per-task=1", f"--output={tmp_path}/%x-%A_%a.out",
        f"--export=ALL,MANIFEST={manifest},REPORTS={reports},VHDTOOL=python3 {stub}",
        cwd=tmp_path,
        env_extra={"VHDTOOL_ARGS": "--host win8 --cabs /share/vmguest.iso", "STUB_FAIL_TASK": "2"},
    )
    results = cluster.wait(job, timeout=90)

    assert sorted(results) == [0, 1, 2, 3]  # the script's own --array=0-3
    for task, r in results.items():
        out = (tmp_path / f"vhdtool-batch-{job}_{task}.out").read_text()
        rec = json.loads((reports / f"report-{task}-of-4.jsonl").read_text())
        assert rec["argv"] == ["batch", "stage", "--manifest", str(manifest),
                               "--report", str(reports / f"report-{task}-of-4.jsonl"), "--resume",
                               "--jobs", "1", "--host", "win8", "--cabs", "/share/vmguest.iso"]
        assert rec["env"]["SLURM_ARRAY_TASK_ID"] == str(task)
        assert rec["env"]["SLURM_ARRAY_TASK_COUNT"] == "4"
        assert rec["env"]["SLURM_ARRAY_TASK_MIN"] == "0"
        assert rec["env"]["SLURM_ARRAY_TASK_STEP"] == "1"
        if task == 2:
            # The task's exit code is vhdtool's: 21, "some images failed" (in the report).
            assert (r.state, r.exit_code) == ("FAILED", 21), out
            assert "some images failed (exit 21)" in out
        else:
            assert (r.state, r.exit_code) == ("COMPLETED", 0), out
            assert "every image succeeded" in out


def test_sbatch_script_outside_slurm(tmp_path):
    """The script's own checks, with bash alone: no cluster needed."""
    stub = tmp_path / "stub_vhdtool.py"
    stub.write_text(STUB)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    p = subprocess.run(["bash", str(SBATCH_SCRIPT)], env=env, capture_output=True, text=True, timeout=30)
    assert p.returncode != 0 and "set MANIFEST" in p.stderr

    env.update(MANIFEST=str(tmp_path / "m.txt"), REPORTS=str(tmp_path / "r"), VHDTOOL=f"python3 {stub}",
               VHDTOOL_COMMAND="inspect")
    p = subprocess.run(["bash", str(SBATCH_SCRIPT)], env=env, capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    rec = json.loads((tmp_path / "r" / "report-0-of-1.jsonl").read_text())
    assert rec["argv"][:2] == ["batch", "inspect"] and rec["argv"][-2:] == ["--jobs", "1"]


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for init to reap it has already ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_exit_stops_daemons_and_running_jobs(tmp_path):
    t0 = time.monotonic()
    with slurm_cluster(tmp_path / "c") as c:
        started = time.monotonic() - t0
        daemons = {name: p.pid for name, p in c._procs.items()}
        script = write_script(tmp_path / "sleep.sh", f'echo $$ > {tmp_path}/pid\nexec sleep 300\n')
        job = c.sbatch(script, f"--output={tmp_path}/%j.out", cwd=tmp_path)
        deadline = time.monotonic() + 30
        while not (tmp_path / "pid").exists() or not (tmp_path / "pid").read_text().strip():
            assert time.monotonic() < deadline, c.diagnostics()
            time.sleep(0.1)
        assert c.queued(job)
        t1 = time.monotonic()
    stopped = time.monotonic() - t1
    job_pid = int((tmp_path / "pid").read_text())
    assert sorted(daemons) == ["munged", "slurmctld", "slurmd"]
    left = [f"{name} {pid}" for name, pid in daemons.items() if _alive(pid)]
    assert not left and not _alive(job_pid), (left, job_pid)
    assert not c._ours()
    print(f"cluster started in {started:.2f}s, stopped with a running job in {stopped:.2f}s")
