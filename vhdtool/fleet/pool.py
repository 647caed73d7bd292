"""Worker processes for a batch: one image each at a time, a time limit per image, a crash costs one image.

The parent hands an image to an idle worker only when the worker has finished the
last, so each image's time limit is its own. A worker that dies, or that is killed
because its image ran past ``timeout``, fails that image (WorkerDied,
ImageTimedOut) and is replaced; every other image goes on. Killing a worker in the
middle of a write is a crash the write path is built for (docs/ARCHITECTURE.md, "Write ordering": one log
sequence per operation; a VHD is replaced by a rename), so the image is left as it
was or fully written.

``stopping()`` (a signal, --fail-fast) stops handing out images: those in hand
finish. ``killing()`` (a second signal) kills the workers at once.

Workers are forked from this process after it has imported the command's code and
loaded what every image shares (the matrix, the cab catalog: vhdtool.fleet.work), so a
worker starts in milliseconds instead of a new Python's tenth of a second, and the cabs
of a source are read and verified once per batch, not once per worker. The child keeps
only its three pipes (vhdtool.fleet.worker) and never returns into this code.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from vhdtool.errors import ImageTimedOut, WorkerDied
from vhdtool.fleet.manifest import Job
from vhdtool.fleet.work import ImageCommand

TICK = 0.2  # seconds between looks at the clock and the stop flags when nothing happens
MAX_ANSWER = 64 * 1024 * 1024


@dataclass
class _WorkerHandle:
    """The parent's handle on one forked worker process: its pid, its pipes, the image in hand."""

    pid: int
    to_child: int  # its requests (the child's stdin)
    from_child: int  # its answers (the child's stdout)
    errors: int  # what it says on stderr
    out: bytearray = field(default_factory=bytearray)
    err: bytearray = field(default_factory=bytearray)
    job: tuple[int, Job] | None = None
    started: float = 0.0
    started_wall: str = ""
    err_open: bool = True
    out_open: bool = True


# on_done(job, ok, result or error dict, started (wall clock, ISO), seconds)
Done = Callable[[Job, bool, dict, str, float], None]


class Pool:
    def __init__(self, command: ImageCommand, size: int, timeout: float | None, on_stderr: Callable[[str], None],
                 now_iso: Callable[[], str]):
        self.command = command  # warmed: its code imported, the shared inputs loaded
        self.size = max(1, size)
        self.timeout = timeout if timeout and timeout > 0 else None
        self.on_stderr = on_stderr
        self.now_iso = now_iso
        self.workers: list[_WorkerHandle] = []
        self.killed: list[Job] = []  # in hand when killing() came

    def _start(self) -> _WorkerHandle:
        from vhdtool.fleet.worker import child

        pipes = [os.pipe() for _ in range(3)]  # requests, answers, stderr
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            child(self.command, pipes[0][0], pipes[1][1], pipes[2][1])  # never returns
        for fd in (pipes[0][0], pipes[1][1], pipes[2][1]):
            os.close(fd)
        for fd in (pipes[0][1], pipes[1][0], pipes[2][0]):
            os.set_inheritable(fd, False)
        w = _WorkerHandle(pid, pipes[0][1], pipes[1][0], pipes[2][0])
        self.workers.append(w)
        return w

    def _send(self, w: _WorkerHandle, msg: dict) -> None:
        data = memoryview((json.dumps(msg, separators=(",", ":")) + "\n").encode())
        while data:
            data = data[os.write(w.to_child, data):]

    def _remove(self, w: _WorkerHandle, kill: bool) -> int | None:
        """Close its pipes (a live worker then exits) or kill it; its exit status (negative: a signal)."""
        if kill:
            try:
                os.kill(w.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for fd in (w.to_child, w.from_child, w.errors):
            try:
                os.close(fd)
            except OSError:
                pass
        deadline = time.monotonic() + 30
        while True:
            done, status = os.waitpid(w.pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(w.pid, signal.SIGKILL)
                _, status = os.waitpid(w.pid, 0)
                break
            time.sleep(0.005)
        self.workers.remove(w)
        return os.waitstatus_to_exitcode(status)

    def run(self, jobs: list[Job], on_start: Callable[[Job], None], on_done: Done, stopping: Callable[[], bool],
            killing: Callable[[], bool]) -> list[Job]:
        """Run every job; return those never started (a stop came first).

        A worker that finishes gets its next image before the finished one's record is
        written (the record's fsync would otherwise idle it); after a failure the record
        comes first, so that --fail-fast starts nothing more.
        """
        queue = deque(enumerate(jobs))
        finished: list[tuple] = []

        def deliver() -> None:
            while finished:
                on_done(*finished.pop(0))

        try:
            while True:
                if any(not ok for _, ok, *_ in finished):
                    deliver()
                if not stopping():
                    while queue:
                        idle = next((w for w in self.workers if w.job is None), None)
                        if idle is None:
                            if len(self.workers) >= min(self.size, len(jobs)):
                                break
                            try:
                                idle = self._start()
                            except OSError as e:
                                n, job = queue.popleft()
                                on_done(job, False, _doc(WorkerDied(
                                    job.image, f"no worker process could be started ({e.strerror})")),
                                    self.now_iso(), 0.0)
                                continue
                        n, job = queue.popleft()
                        idle.job, idle.started, idle.started_wall = (n, job), time.monotonic(), self.now_iso()
                        on_start(job)
                        try:
                            self._send(idle, {"id": n, "job": job.to_dict()})
                        except OSError:
                            pass  # it died; its EOF below fails the image
                deliver()
                busy = [w for w in self.workers if w.job is not None]
                if not busy:
                    break
                if killing():
                    for w in busy:
                        self.killed.append(w.job[1])
                        self._remove(w, kill=True)
                    break
                self._wait(busy, lambda *args: finished.append(args))
        finally:
            for w in list(self.workers):
                self._remove(w, kill=w.job is not None)
        return [job for _, job in queue]

    def _wait(self, busy: list[_WorkerHandle], on_done: Done) -> None:
        now = time.monotonic()
        wait = TICK
        if self.timeout:
            wait = min(wait, max(0.0, min(w.started + self.timeout for w in busy) - now))
        fds = {}
        poller = select.poll()
        for w in self.workers:
            if w.out_open:
                fds[w.from_child] = (w, "out")
            if w.err_open:
                fds[w.errors] = (w, "err")
        for fd in fds:
            poller.register(fd, select.POLLIN)
        ready = [fd for fd, _ in poller.poll(wait * 1000)]
        for fd in ready:
            w, which = fds[fd]
            if w not in self.workers:
                continue
            data = os.read(fd, 1 << 16)
            if which == "err":
                if data:
                    w.err += data
                    self._stderr_lines(w, final=False)
                else:
                    w.err_open = False
                continue
            if not data:
                self._died(w, on_done)
                continue
            w.out += data
            if len(w.out) > MAX_ANSWER:
                self._failed(w, on_done, WorkerDied(w.job[1].image if w.job else None, "the worker's answer is too long"))
                continue
            while b"\n" in w.out and w.job is not None:
                line, _, rest = w.out.partition(b"\n")
                w.out = bytearray(rest)
                self._answer(w, line, on_done)
        if self.timeout:
            now = time.monotonic()
            for w in list(self.workers):
                if w.job is not None and now - w.started > self.timeout:
                    self._failed(w, on_done, ImageTimedOut(
                        w.job[1].image, f"not done after {self.timeout:g} s (--timeout); its worker was killed"))

    def _answer(self, w: _WorkerHandle, line: bytes, on_done: Done) -> None:
        n, job = w.job
        try:
            msg = json.loads(line)
            ok, payload = bool(msg["ok"]), (msg["result"] if msg["ok"] else msg["error"])
            if msg["id"] != n:
                raise ValueError("answer to another image")
        except (ValueError, KeyError, TypeError):
            self._failed(w, on_done, WorkerDied(job.image, "the worker sent a malformed answer"))
            return
        w.job = None
        on_done(job, ok, payload, w.started_wall, time.monotonic() - w.started)

    def _stderr_lines(self, w: _WorkerHandle, final: bool) -> None:
        while b"\n" in w.err:
            line, _, rest = w.err.partition(b"\n")
            w.err = bytearray(rest)
            self.on_stderr(line.decode("utf-8", "replace"))
        if final and w.err:
            self.on_stderr(w.err.decode("utf-8", "replace"))
            w.err.clear()

    def _died(self, w: _WorkerHandle, on_done: Done) -> None:
        job = w.job
        try:  # what it said on the way out (not waiting: a process it left behind may hold the pipe)
            os.set_blocking(w.errors, False)
            rest = os.read(w.errors, 1 << 16)
            if rest:
                w.err += rest
        except OSError:
            pass
        w.out_open = False
        self._stderr_lines(w, final=True)
        code = self._remove(w, kill=True)
        if job is not None:
            if code is not None and code < 0:
                try:
                    how = f"signal {-code}, {signal.Signals(-code).name}"
                except ValueError:
                    how = f"signal {-code}"
            else:
                how = f"exit status {code}"
            on_done(job[1], False, _doc(WorkerDied(job[1].image, f"its worker died ({how}) while working on it")),
                    w.started_wall, time.monotonic() - w.started)

    def _failed(self, w: _WorkerHandle, on_done: Done, error) -> None:
        job = w.job
        self._remove(w, kill=True)
        if job is not None:
            on_done(job[1], False, _doc(error), w.started_wall, time.monotonic() - w.started)


def _doc(error) -> dict:
    return {"code": error.exit_code, "message": error.message}
