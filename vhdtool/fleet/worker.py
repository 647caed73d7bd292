"""A batch's worker: a child forked by vhdtool.fleet.pool, one image at a time, JSON lines on pipes.

The parent writes one line per image ``{"id": N, "job": {...}}``; the worker answers
each with one line ``{"id": N, "ok": true, "result": {...}}`` or ``{"id": N, "ok":
false, "error": {"code", "message"}}`` and exits when its requests end.

The child keeps only its three pipes: every other descriptor of the parent (the
report, the other workers' pipes) is closed, so that a worker's end of file is seen
when the parent closes it. It ignores SIGINT and SIGTERM: a Ctrl-C reaches the whole
process group, and the parent alone decides whether an image being written finishes
(it does, on the first signal) or is killed (on the second; the transaction makes a
kill safe). It dies with its parent (PR_SET_PDEATHSIG), so a batch killed outright
leaves no worker writing on behind it for a resumed batch to collide with. It never
returns into the parent's code: whatever happens, it ends in ``os._exit``.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import traceback

from vhdtool.errors import EXIT_INTERNAL_ERROR, EXIT_OK

PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


def _error(e: BaseException) -> dict:
    from vhdtool.errors import VhdtoolError

    if isinstance(e, VhdtoolError):
        return {"code": e.exit_code, "message": e.message}
    detail = str(e).splitlines()[0] if str(e) else ""
    return {"code": EXIT_INTERNAL_ERROR,
            "message": f"internal error: {type(e).__name__}: {detail} (set VHDTOOL_DEBUG=1 for a traceback and report it)"}


def _fault(spec: str, key: str) -> None:
    """The tests' way to make a worker crash or hang on the image whose key contains TEXT.

    A real crash (SIGSEGV, from the kernel's point of view) and a real hang (the
    process sleeps until the parent kills it); the tests check the batch's answer to
    each. The timeout test of real work uses a short --timeout instead.
    """
    kind, _, text = spec.partition(":")
    if text and text in key:
        if kind == "crash":
            os.kill(os.getpid(), signal.SIGSEGV)
        elif kind == "hang":
            while True:
                signal.pause()


def child(command, requests: int, answers: int, errors: int) -> None:
    """The forked worker's whole life; never returns."""
    status = EXIT_INTERNAL_ERROR
    try:
        parent = os.getppid()
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.dup2(requests, 0)
        os.dup2(answers, 1)
        os.dup2(errors, 2)
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        _die_with_parent(parent)
        serve(command)
        status = EXIT_OK
    except BaseException:  # noqa: BLE001 - nothing may unwind into the parent's code
        try:
            traceback.print_exc()
        finally:
            status = EXIT_INTERNAL_ERROR
    finally:
        try:
            sys.stderr.flush()
        finally:
            os._exit(status)


def serve(command) -> None:
    from vhdtool.fleet.manifest import Job

    fault = os.environ.get("VHDTOOL_TEST_FAULT", "")  # tests only: "crash:TEXT" or "hang:TEXT" (see _fault)
    requests = os.fdopen(0, "rb", buffering=1 << 16)
    for line in requests:
        msg = json.loads(line)
        job = Job.from_dict(msg["job"])
        if fault:
            _fault(fault, job.key)
        try:
            answer = {"id": msg["id"], "ok": True, "result": command.run(job)}
        except Exception as e:  # noqa: BLE001 - one image's failure, whatever it is, is that image's record
            if os.environ.get("VHDTOOL_DEBUG"):
                traceback.print_exc()
            answer = {"id": msg["id"], "ok": False, "error": _error(e)}
        data = memoryview((json.dumps(answer, separators=(",", ":")) + "\n").encode())
        while data:
            data = data[os.write(1, data):]
