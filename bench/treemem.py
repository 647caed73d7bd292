"""Peak memory of a process tree, sampled from /proc: a command, its children and theirs (vhdtool forks a sandbox).

Every ``interval`` seconds the sampler finds the tree (``/proc/PID/task/TID/children``,
or a scan of ``/proc/*/stat`` where the kernel lacks that file) and adds up, over its
processes, VmRSS and RssAnon (``/proc/PID/status``) and Pss (``/proc/PID/smaps_rollup``).
RSS counts a page once in every process that maps it, so a page shared after fork counts
twice; Pss divides it among them. The peaks are of the sums at one instant. The kernel's
own peak of the largest single process (``wait4``'s ru_maxrss) is exact and serves as a
floor the sampled peak should reach.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

KiB = 1024


@dataclass
class TreeMemory:
    """Peaks (bytes) of the sums over the tree, sampled; ``kernel_max_single``: ru_maxrss of the largest process."""

    rss: int = 0
    anon: int = 0
    pss: int = 0
    processes: int = 0
    samples: int = 0
    kernel_max_single: int = 0
    seen: set = field(default_factory=set)


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return out


def _children_by_scan(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry))
    return out


CHILDREN = _children if Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists() else _children_by_scan


def tree(root: int) -> list[int]:
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo += CHILDREN(pid)
    return pids


def _status_kib(pid: int, keys: tuple[str, ...]) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in keys:
                    out[key] = int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


class Sampler(threading.Thread):
    def __init__(self, root: int, interval: float = 0.02):
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.mem = TreeMemory()
        self.stop = threading.Event()

    def sample(self) -> None:
        rss = anon = pss = 0
        pids = tree(self.root)
        for pid in pids:
            st = _status_kib(pid, ("VmRSS", "RssAnon"))
            rss += st.get("VmRSS", 0)
            anon += st.get("RssAnon", 0)
            pss += _pss_kib(pid)
        m = self.mem
        m.rss, m.anon, m.pss = max(m.rss, rss * KiB), max(m.anon, anon * KiB), max(m.pss, pss * KiB)
        m.processes = max(m.processes, len(pids))
        m.seen.update(pids)
        m.samples += 1

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.interval)


def run_sampled(cmd: list[str], interval: float = 0.02, **popen) -> tuple[float, int, TreeMemory]:
    """Run ``cmd`` (stdout/stderr as ``popen`` says: give files, not pipes, since nothing reads them meanwhile);
    its wall time, exit code and the tree's memory peaks."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, **popen)
    sampler = Sampler(proc.pid, interval)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    sampler.mem.kernel_max_single = usage.ru_maxrss * KiB
    return wall, proc.returncode, sampler.mem
