"""The native sandbox on its own: what a job in the child answers, and what happens when the child misbehaves.

The jobs here are plain Python standing in for C: each misbehaviour (a crash by
signal, a hang, a memory blow-up, an oversized answer, an exception) is done for
real in a real forked child, and the parent must turn it into one NativeError.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time

import pytest

from vhdtool.errors import MissingLibrary, NativeError
from vhdtool.native import Refusal, bind_library, load_libc, load_library, run_isolated
from vhdtool.native.libraries import LIBC, SystemLibrary

LABEL = "input.bin"


def run(job, **kw):
    kw.setdefault("library", "libtest")
    kw.setdefault("cap", 1 << 20)
    return run_isolated(job, LABEL, **kw)


def test_answer_and_payload_cross_the_pipe():
    payload = os.urandom(300_000)  # more than a pipe buffer holds
    head, data = run(lambda: {"n": 3, "names": ["a", "b"], "payload": payload})
    assert head == {"n": 3, "names": ["a", "b"], "payload": len(payload)}
    assert data == payload


def test_answer_without_payload():
    head, data = run(lambda: {"ok": True})
    assert head == {"ok": True, "payload": None} and data is None


def test_refusal_becomes_a_native_error_with_its_text():
    def job():
        raise Refusal("bad header in the input")

    with pytest.raises(NativeError) as e:
        run(job)
    assert e.value.message == f"{LABEL}: bad header in the input"


@pytest.mark.parametrize("how", ["signal", "null-read"])
def test_crash_is_contained(how, capfd):
    def job():
        if how == "signal":
            os.kill(os.getpid(), signal.SIGSEGV)
        ctypes.string_at(0)

    with pytest.raises(NativeError) as e:
        run(job)
    assert "libtest crashed on it (signal 11, SIGSEGV)" in e.value.message
    assert capfd.readouterr() == ("", "")


def test_hang_times_out_and_the_child_is_reaped():
    start = time.monotonic()
    with pytest.raises(NativeError) as e:
        run(lambda: time.sleep(60), timeout=0.5, subject="the blob")
    assert time.monotonic() - start < 5
    assert "libtest did not finish within 0.5 s; the blob is damaged or hostile" in e.value.message
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)


def test_memory_is_capped():
    with pytest.raises(NativeError) as e:
        run(lambda: {"x": len(bytearray(4 * 1024**3))})
    assert "libtest ran out of memory on it" in e.value.message


def test_oversized_answer_is_refused():
    with pytest.raises(NativeError) as e:
        run(lambda: {"payload": bytes(2 << 20)}, cap=1 << 20)
    assert "sent more than its answer can hold" in e.value.message


def test_python_error_in_the_child_is_a_failure():
    def job():
        raise RuntimeError("boom")

    with pytest.raises(NativeError) as e:
        run(job)
    assert "the libtest child failed (exit status 70)" in e.value.message


def test_child_holds_no_descriptor_of_the_parent(tmp_path):
    image = open(tmp_path / "disk.vhdx", "wb")
    fd = image.fileno()

    def job():
        try:
            os.fstat(fd)
        except OSError:
            return {"open": False}
        return {"open": True}

    try:
        assert run(job)[0]["open"] is False
    finally:
        image.close()


def test_fork_failure(monkeypatch):
    def no_fork():
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", no_fork)
    with pytest.raises(NativeError) as e:
        run(lambda: {})
    assert "cannot start a process to read it in (Resource temporarily unavailable)" in e.value.message
    assert "try again" in e.value.message


NOT_HERE = SystemLibrary("libnothere", "libvhdtool-not-here.so.0", "libnothere0", "libnothere-libs", ("stage",), "tests")
LIBM = SystemLibrary("the math library", "libm.so.6", "libc6", "glibc", (), "tests")


def test_missing_library_names_the_package():
    with pytest.raises(MissingLibrary) as e:
        load_library(NOT_HERE, LABEL)
    assert e.value.message == (f"{LABEL}: libnothere is not installed; install the libnothere0 package "
                               "(Debian/Ubuntu; libnothere-libs on Fedora/RHEL)")
    assert isinstance(e.value, NativeError)


def test_library_is_loaded_once():
    assert load_library(LIBC) is load_library(LIBC)


def test_a_library_is_bound_once_and_a_failed_bind_is_tried_again():
    calls = []

    def bind(lib):
        calls.append(lib)
        if len(calls) == 1:
            raise ValueError("a build this platform cannot use")
        fn = lib.cos
        fn.restype, fn.argtypes = ctypes.c_double, [ctypes.c_double]
        return fn

    with pytest.raises(ValueError):
        bind_library(LIBM, LABEL, bind)
    cos = bind_library(LIBM, LABEL, bind)
    assert cos(0.0) == 1.0  # the typed entry point of the real library
    assert bind_library(LIBM, LABEL, bind) is cos
    assert len(calls) == 2 and calls[0] is calls[1] is load_library(LIBM)


def test_a_missing_library_is_never_bound():
    def bind(lib):
        raise AssertionError("bound a library that is not there")

    with pytest.raises(MissingLibrary) as e:
        bind_library(NOT_HERE, LABEL, bind)
    assert e.value.exit_code == 14 and "install the libnothere0 package" in e.value.message


def test_libc_is_the_c_library():
    assert load_libc() is load_library(LIBC)
    assert load_libc().getpid() == os.getpid()
