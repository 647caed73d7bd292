"""The sandbox: run a job that calls native code in a forked, confined child, and read back its answer.

The child closes every descriptor but its answer pipe (the parent may hold a disk
image open for writing), caps its address space, dumps no core, and ``_exit``s
whatever happens. The parent waits with a timeout. A crash, a hang or a memory
blow-up in the child becomes a ``NativeError``, never a crash of vhdtool.

The answer protocol: ``MAGIC``, a 32-bit length, a JSON head, then the payload
bytes whose length the head gives. The parent parses it as data, never as code: a
child that a library let an attacker take over can lie, but not run code in the
parent, and each caller checks what the child says against what it knows.
"""

from __future__ import annotations

import faulthandler
import fcntl
import gc
import json
import os
import resource
import select
import signal
import struct
import time
from collections.abc import Callable

from vhdtool.errors import EXIT_INTERNAL_ERROR, NativeError
from vhdtool.units import MiB
DEFAULT_TIMEOUT = 10.0  # seconds
TICK_INTERVAL = 0.25  # seconds between calls of a caller's ``tick`` while the child works
CHILD_MEMORY = 1024 * MiB  # address space the child may add to what it inherits
MAGIC = b"VNAT"


class Refusal(Exception):
    """Raised by a job, in the child, to refuse its input; becomes a NativeError with this message."""


Job = Callable[[], dict]


def run_isolated(
    job: Job,
    label: str | None,
    *,
    library: str,
    cap: int,
    timeout: float = DEFAULT_TIMEOUT,
    subject: str = "the input",
    keep_fds: tuple[int, ...] = (),
    tick: Callable[[], None] | None = None,
) -> tuple[dict, bytes | None]:
    """Run ``job()`` in a forked child; its answer (head, payload), or a NativeError for whatever happened to it.

    ``job`` returns a JSON-able dict; its optional ``payload`` (bytes) crosses the pipe
    raw. ``cap`` bounds what the parent will read. ``library`` and ``subject`` name
    the code and what it was given, for messages. ``keep_fds`` are descriptors the
    child keeps (a disk image it reads through); each must be open read-only, so
    that the child cannot write to anything the parent will commit. ``tick()`` is
    called about every ``TICK_INTERVAL`` seconds while the child has not answered (a
    progress display; the child itself can draw nothing).
    """
    for fd in keep_fds:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY:
            raise ValueError(f"descriptor {fd} is writable; the sandbox keeps only read-only ones")
    read_fd, write_fd = os.pipe()
    try:
        pid = os.fork()
    except OSError as e:
        os.close(read_fd)
        os.close(write_fd)
        raise NativeError(label, f"cannot start a process to read it in ({e.strerror})",
                          hint="free some memory or processes and try again") from None
    if pid == 0:  # child: never returns
        # A collection would touch every object the parent has, copying each page it sits on.
        gc.disable()
        os.close(read_fd)
        _child(write_fd, job, cap, library, keep_fds)
    os.close(write_fd)
    reaped = False
    try:
        deadline = time.monotonic() + timeout
        blob = _read_answer(read_fd, deadline, cap, label, library, tick)
        status = _wait(pid, deadline) if blob is not None else None
        reaped = status is not None
        if status is None:
            raise NativeError(label, f"{library} did not finish within {timeout:g} s; {subject} is damaged or hostile")
        if os.WIFSIGNALED(status):
            number = os.WTERMSIG(status)
            try:
                name = signal.Signals(number).name
            except ValueError:
                name = "unknown"
            raise NativeError(label, f"{library} crashed on it (signal {number}, {name})")
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            raise NativeError(label, f"the {library} child failed (exit status {code})")
        return _parse_answer(blob, label, library)
    finally:
        os.close(read_fd)
        if not reaped:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)


def _read_answer(fd: int, deadline: float, cap: int, label: str | None, library: str,
                 tick: Callable[[], None] | None = None) -> bytes | None:
    """Everything the child writes until it exits; None if the deadline passes first."""
    chunks, size = [], 0
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        wait = left if tick is None else min(left, TICK_INTERVAL)
        if not poller.poll(max(1, int(wait * 1000))):
            if tick is not None:
                tick()
            continue
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > cap:
            raise NativeError(label, f"the {library} child sent more than its answer can hold")
        chunks.append(chunk)


def _wait(pid: int, deadline: float) -> int | None:
    # The pipe closes as the child exits; reaping it is a matter of microseconds.
    delay = 0.0001
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            return None
        time.sleep(delay)
        delay = min(delay * 2, 0.01)


def _parse_answer(blob: bytes, label: str | None, library: str) -> tuple[dict, bytes | None]:
    malformed = NativeError(label, f"the {library} child sent a malformed answer")
    if len(blob) < 8 or blob[:4] != MAGIC:
        raise malformed
    (head_size,) = struct.unpack_from("<I", blob, 4)
    try:
        answer = json.loads(blob[8 : 8 + head_size])
    except ValueError:
        raise malformed from None
    if not isinstance(answer, dict):
        raise malformed
    if "error" in answer:
        problem = answer["error"]
        if not isinstance(problem, str):
            raise malformed
        raise NativeError(label, problem[:300])
    rest = blob[8 + head_size :]
    payload_size = answer.get("payload")
    if payload_size is None:
        if rest:
            raise malformed
        return answer, None
    if not isinstance(payload_size, int) or payload_size != len(rest):
        raise malformed
    return answer, rest


def _child(write_fd: int, job: Job, answer_cap: int, library: str, keep_fds: tuple[int, ...] = ()) -> None:
    """The child's whole life: confine itself, run the job, answer, and _exit whatever happens."""
    status = EXIT_INTERNAL_ERROR  # the job raised: any status but 0 is a failure to the parent
    try:
        if write_fd <= 2:
            # A parent started with stdio closed: keep the pipe clear of the descriptors redirected below.
            write_fd = fcntl.fcntl(write_fd, fcntl.F_DUPFD, 3)
        _confine((write_fd, *keep_fds), answer_cap)
        payload = b""
        try:
            result = job()
            payload = result.pop("payload", None)
            result["payload"] = None if payload is None else len(payload)
            head = _frame(result)
        except Refusal as e:
            head = _frame({"error": str(e)})
        except MemoryError:
            head = _frame({"error": f"{library} ran out of memory on it"})
        # Head and payload go out separately: the payload is never copied again.
        for part in (head, payload or b""):
            view = memoryview(part)
            while view:
                view = view[os.write(write_fd, view) :]
        status = 0
    finally:
        # Never return into the parent's code (a test runner, a CLI) from the child.
        os._exit(status)


def _frame(head: dict) -> bytes:
    text = json.dumps(head).encode()
    return MAGIC + struct.pack("<I", len(text)) + text


def _confine(keep: tuple[int, ...], answer_cap: int) -> None:
    """Limits for a process about to parse hostile bytes in C."""
    if faulthandler.is_enabled():
        # A crash here is expected and reported by the parent; no traceback on the user's terminal.
        faulthandler.disable()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    # The parent may hold a disk image open for writing: a child that a library let
    # someone take over gets no descriptor but its answer pipe (and the read-only ones it was given).
    low = 3
    for fd in sorted(f for f in keep if f >= 3):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        if fd != devnull:
            os.dup2(devnull, fd)
    if devnull > 2:
        os.close(devnull)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    inherited = _address_space()
    if inherited:
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        # Room for the library's own buffers, and for the answer it builds (grown in place).
        limit = inherited + CHILD_MEMORY + 2 * answer_cap
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        if soft == resource.RLIM_INFINITY or limit < soft:
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _address_space() -> int:
    """This process's virtual size in bytes, 0 if /proc cannot say."""
    try:
        with open("/proc/self/statm", "rb") as f:
            pages = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")
