"""A private one-node Slurm cluster for tests: munged, slurmctld and slurmd started by hand.

``slurm_cluster(tmpdir)`` starts, as root, Debian's slurm-wlm (22.05) and munge with every
file of their own under ``tmpdir`` (key, sockets, state, spool, pid files, logs, ports picked
free), waits until the node is idle, yields a ``SlurmCluster`` and on exit stops the three
daemons and anything they left running. Nothing under /etc, /run or /var is used or touched,
so it runs beside (or without) a system Slurm.

Choices that matter here:

* ``ProctrackType=proctrack/linuxproc``, ``TaskPlugin=task/none`` and
  ``JobAcctGatherType=jobacct_gather/none``: nothing that tracks, confines or measures jobs
  with cgroups. slurmd 22.05 still loads a cgroup plugin at start whatever is configured
  (``CgroupPlugin=disabled`` only exists from 23.02), and with no cgroup.conf it autodetects:
  that stats /sys/fs/cgroup/systemd and fails where there is none, and cgroup/v2 refuses
  hybrid mounts ("Hybrid mode is not supported"). So cgroup.conf says
  ``CgroupPlugin=cgroup/v1``: that plugin only loads at start and is used by none of the
  plugins above, so slurmd starts and runs jobs even with an empty /sys/fs/cgroup and
  creates nothing there (checked by running slurmd under an empty tmpfs on /sys/fs/cgroup).
* ``SchedulerParameters=batch_sched_delay=0``: the next wave of array tasks starts on the
  scheduler's next 1-second tick instead of 3 seconds later. (Not ``sched_min_interval``:
  sched/builtin reads ``interval=`` out of that name and rejects 0.)
* No slurmdbd, so no sacct: each task's final state and exit code come from
  ``scontrol show job`` (records are kept for ``MinJobAge`` seconds after the end) and,
  as a second source that survives the record's purge, from ``jobcomp/filetxt``.
* Every address is 127.0.0.1: the node name is this machine's short host name, as slurmd
  wants, but ``NodeAddr``/``SlurmctldHost`` point at the loopback.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "sinfo", "scancel")
# Set in the daemons' environment (so slurmstepd and jobs submitted with --export=ALL have it
# too): a process that carries this cluster's value is one of ours, found by it when the
# cluster stops and ended by its pid (see SlurmCluster._ours).
MARKER = "VHDTOOL_TEST_SLURM"
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
            "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@dataclass(frozen=True)
class TaskResult:
    job_id: int            # the task's own job id
    array_job_id: int | None
    array_task_id: int | None
    state: str             # COMPLETED, FAILED, CANCELLED, TIMEOUT, ...
    exit_code: int         # the batch script's exit status
    signal: int            # the signal that ended it, 0 if none


def missing_reason() -> str | None:
    """Why a private cluster can't be started here, or None when it can."""
    if os.geteuid() != 0:
        return "a private Slurm cluster needs root (slurmd runs jobs as their owner)"
    missing = [p for p in (*DAEMONS, *CLIENTS, "mungekey") if not _which(p)]
    if missing:
        return "Slurm/munge not installed (apt-get install slurm-wlm munge): missing " + ", ".join(missing)
    return None


def _which(prog: str) -> str | None:
    return shutil.which(prog, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _short_hostname() -> str:
    try:
        out = subprocess.run(["hostname", "-s"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    return out or socket.gethostname().split(".")[0]


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"<{path}: {e}>"
    return text[-limit:]


def _kv(line: str) -> dict[str, str]:
    """``scontrol -o`` output (``Key=value Key=value with spaces ...``) as a dict."""
    return dict(re.findall(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=(.*?)(?=\s+[A-Za-z][A-Za-z0-9_:/]*=|$)", line.strip()))


def _exit(value: str) -> tuple[int, int]:
    code, _, sig = value.partition(":")
    return int(code or 0), int(sig or 0)


class SlurmError(RuntimeError):
    pass


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.logs = root / "log"
        self.jobcomp = root / "log" / "jobcomp.txt"
        self.node = _short_hostname()
        self.cpus = len(os.sched_getaffinity(0)) or 1  # as nproc counts them
        self.env: dict[str, str] = {}
        self._procs: dict[str, subprocess.Popen] = {}
        self._socket_dir: Path | None = None

    # -- clients ---------------------------------------------------------------------------
    def run(self, *argv: str, check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster."""
        env = dict(self.env, **kw.pop("env_extra", {}) or {})
        p = subprocess.run(list(argv), env=env, capture_output=True, text=True, timeout=timeout, **kw)
        if check and p.returncode != 0:
            raise SlurmError(f"{' '.join(argv)} exited {p.returncode}: {p.stderr.strip()}\n{self.diagnostics()}")
        return p

    def sbatch(self, script, *args: str, cwd=None, env_extra: dict[str, str] | None = None) -> int:
        """Submit ``script`` (sbatch options in ``args``); returns the job id (of the array)."""
        p = self.run("sbatch", "--parsable", *args, str(script), cwd=cwd, env_extra=env_extra)
        first = p.stdout.strip().splitlines()[-1]
        return int(first.split(";")[0])

    def queued(self, job_id: int) -> list[str]:
        """Tasks of the job still in the queue (pending, running, completing), as squeue names them."""
        p = self.run("squeue", "-h", "-r", "-j", str(job_id), "-o", "%i %T", check=False)
        if p.returncode != 0:
            # Once every record of the job is purged squeue calls the id invalid.
            if "Invalid job id" in p.stderr:
                return []
            raise SlurmError(f"squeue exited {p.returncode}: {p.stderr.strip()}")
        return [ln for ln in p.stdout.splitlines() if ln.strip()]

    def wait(self, job_id: int, timeout: float = 60) -> dict[int | None, TaskResult]:
        """Wait until every task of the job (array) has left the queue; each task's end.

        Keyed by array task id (None for a job that is not an array).
        """
        deadline = time.monotonic() + timeout
        while True:
            queued = self.queued(job_id)
            if not queued:
                results = self._from_scontrol(job_id)
                if results and all(r.state in FINISHED for r in results.values()):
                    return results
            if time.monotonic() > deadline:
                raise SlurmError(f"job {job_id} still queued after {timeout}s: {queued}\n{self.diagnostics()}")
            time.sleep(0.2)

    def _from_scontrol(self, job_id: int) -> dict[int | None, TaskResult]:
        p = self.run("scontrol", "-o", "show", "job", str(job_id), check=False)
        results: dict[int | None, TaskResult] = {}
        if p.returncode == 0:
            for line in p.stdout.splitlines():
                if not line.strip():
                    continue
                f = _kv(line)
                task = f.get("ArrayTaskId")
                if task is not None and not task.isdigit():
                    return {}  # "1-3": tasks not yet split off the pending array record
                code, sig = _exit(f.get("ExitCode", "0:0"))
                r = TaskResult(
                    job_id=int(f["JobId"]),
                    array_job_id=int(f["ArrayJobId"]) if "ArrayJobId" in f else None,
                    array_task_id=int(task) if task is not None else None,
                    state=f.get("JobState", "?"),
                    exit_code=code,
                    signal=sig,
                )
                results[r.array_task_id] = r
        if not results:
            results = self.completions(job_id)
        return results

    def completions(self, job_id: int) -> dict[int | None, TaskResult]:
        """The job's tasks as jobcomp/filetxt recorded their ends (kept after scontrol forgets)."""
        results: dict[int | None, TaskResult] = {}
        if not self.jobcomp.exists():
            return results
        for line in self.jobcomp.read_text(errors="replace").splitlines():
            f = _kv(line)
            if not f:
                continue
            jid = int(f.get("JobId", -1))
            array_job = int(f["ArrayJobId"]) if f.get("ArrayJobId", "").isdigit() else None
            if jid != job_id and array_job != job_id:
                continue
            task = f.get("ArrayTaskId")
            code, sig = _exit(f.get("ExitCode", "0:0"))
            r = TaskResult(jid, array_job, int(task) if task and task.isdigit() else None,
                           f.get("JobState", "?"), code, sig)
            results[r.array_task_id] = r
        return results

    def diagnostics(self) -> str:
        """Each daemon's state and the end of its log, for failure messages."""
        parts = []
        for name in DAEMONS:
            proc = self._procs.get(name)
            status = "not started" if proc is None else (
                "running" if proc.poll() is None else f"exited {proc.returncode}")
            # slurmctld/slurmd write their log file (and the same to stderr, in <name>.out);
            # munged in the foreground logs to stderr only. A daemon that died early may
            # have said why only on stderr.
            log = self.logs / f"{name}.log"
            if proc is not None and (proc.poll() is not None or not log.exists()):
                log = self.logs / f"{name}.out"
            parts.append(f"--- {name} ({status}): {log}\n{_tail(log, 3000)}")
        return "\n".join(parts)

    # -- daemons ---------------------------------------------------------------------------
    def _write_config(self) -> None:
        r = self.root
        for d in ("munge", "state", "spool", "log", "run"):
            (r / d).mkdir(mode=0o700, parents=True, exist_ok=True)
        # munged warns unless every user can reach its socket (job owners other than root).
        (r / "munge").chmod(0o755)
        ctld_port, slurmd_port = _free_ports(2)
        self.munge_socket = r / "munge" / "munge.socket"
        if len(str(self.munge_socket).encode()) > 100:
            # A Unix socket's path is at most 107 bytes: a deep tmpdir gets a short folder.
            self._socket_dir = Path(tempfile.mkdtemp(prefix="vhdtool-munge-"))
            self._socket_dir.chmod(0o755)
            self.munge_socket = self._socket_dir / "munge.socket"
        # See the module's doc: a named plugin that is loaded but never used, instead of
        # autodetection, which wants /sys/fs/cgroup/systemd.
        (r / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\n")
        self.conf.write_text(f"""\
# Written by tests/slurm.py: a private one-node cluster under {r}
ClusterName=vhdtooltest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}
SlurmdPidFile={r / 'run' / 'slurmd.pid'}
SlurmctldLogFile={self.logs / 'slurmctld.log'}
SlurmdLogFile={self.logs / 'slurmd.log'}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={self.jobcomp}
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# Ended jobs stay visible to scontrol for an hour (no slurmdbd, so no sacct).
MinJobAge=3600
MaxArraySize=1001
InactiveLimit=0
KillWait=5
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName={self.node} NodeAddr=127.0.0.1 NodeHostname={self.node} CPUs={self.cpus} State=UNKNOWN
PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")

    def _base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_", "SQUEUE_", "SINFO_"))}
        env["PATH"] = env.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin"
        env["SLURM_CONF"] = str(self.conf)
        env[MARKER] = str(self.root)
        return env

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.logs / f"{name}.out", "ab")
        self._procs[name] = subprocess.Popen(argv, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def _wait_for(self, what: str, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise SlurmError(f"{name} exited {proc.returncode} while waiting for {what}\n"
                                     f"{self.diagnostics()}")
            if ready():
                return
            if time.monotonic() > deadline:
                raise SlurmError(f"timed out after {timeout}s waiting for {what}\n{self.diagnostics()}")
            time.sleep(0.1)

    def start(self, timeout: float = 60) -> None:
        self._write_config()
        self.env = self._base_env()
        key = self.root / "munge" / "munge.key"
        subprocess.run(["mungekey", "--create", "--force", "--keyfile", str(key)], check=True,
                       capture_output=True, env=self.env, timeout=30)
        key.chmod(0o400)
        self._spawn("munged", [
            _which("munged"), "-F", "--force",
            f"--socket={self.munge_socket}",
            f"--key-file={key}",
            f"--pid-file={self.root / 'munge' / 'munged.pid'}",
            # In the foreground munged logs to stderr (captured in munged.out); the log file
            # is named all the same so nothing of the system's /var/log/munge is ever opened.
            f"--log-file={self.logs / 'munged.log'}",
            f"--seed-file={self.root / 'munge' / 'munged.seed'}",
        ])
        self._wait_for("munged's socket", self.munge_socket.exists, timeout)
        conf = str(self.conf)
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-f", conf])
        self._spawn("slurmd", [_which("slurmd"), "-D", "-f", conf])
        self._wait_for(f"node {self.node} idle in sinfo", self._node_idle, timeout)

    def _node_idle(self) -> bool:
        p = self.run("sinfo", "-h", "-N", "-n", self.node, "-o", "%T", check=False, timeout=10)
        return p.returncode == 0 and p.stdout.strip() == "idle"

    def stop(self, timeout: float = 10) -> None:
        """Cancel every job, then SIGTERM each daemon (SIGKILL after ``timeout``), then end
        whatever of the cluster is left (steps and jobs of a slurmd that died first)."""
        ctld = self._procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None and self.env:
            # Jobs first, while slurmd is there to end their steps.
            with contextlib.suppress(Exception):
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    p = self.run("squeue", "-h", "-o", "%A", check=False, timeout=10)
                    jobs = p.stdout.split() if p.returncode == 0 else []
                    if not jobs:
                        break
                    self.run("scancel", *jobs, check=False, timeout=10)
                    time.sleep(0.2)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        self._end_leftovers(timeout)
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    def _ours(self) -> list[int]:
        """Pids of live processes of this cluster: the daemons' helpers, slurmstepd and jobs.

        Known by the marker in their environment (the daemons' own, which slurmstepd and jobs
        submitted with --export=ALL inherit) or by ``SLURM_CONF=<this conf>``, which
        slurmstepd puts in every job's environment even with --export=NONE; and any
        descendant of those. Zombies have ended (init reaps them) and are left out.
        """
        needles = (f"{MARKER}={self.root}\0".encode(), f"SLURM_CONF={self.conf}\0".encode())
        parent: dict[int, int] = {}
        marked: set[int] = set()
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            pid = int(entry)
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = b"\0" + f.read() + b"\0"
            except OSError:
                continue
            if fields[0] == "Z":
                continue
            parent[pid] = int(fields[1])
            if any(b"\0" + n in env for n in needles):
                marked.add(pid)
        ours = set()
        for pid in parent:
            p, seen = pid, 0
            while p in parent and seen < 64:
                if p in marked:
                    ours.add(pid)
                    break
                p, seen = parent[p], seen + 1
        return sorted(ours)

    def _end_leftovers(self, timeout: float) -> None:
        for sig, wait in ((signal.SIGTERM, min(timeout, 3)), (signal.SIGKILL, timeout)):
            pids = self._ours()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while self._ours() and time.monotonic() < deadline:
                time.sleep(0.1)
        left = self._ours()
        if left:
            raise SlurmError(f"processes of the cluster under {self.root} outlived SIGKILL: {left}")


@contextlib.contextmanager
def slurm_cluster(tmpdir, timeout: float = 60):
    """Start a private one-node Slurm under ``tmpdir``; yields a SlurmCluster; stops it on exit.

    Skips the calling test (pytest.skip) when not root or Slurm/munge are not installed.
    """
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(Path(tmpdir))
    try:
        cluster.start(timeout)
        yield cluster
    finally:
        cluster.stop()
