"""System libraries through ctypes, opened on first use: ``inspect`` and ``plan`` never need one."""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from typing import TypeVar

from vhdtool.errors import MissingLibrary

LIBC_SONAME = "libc.so.6"

T = TypeVar("T")

_loaded: dict[str, ctypes.CDLL] = {}
_bound: dict[str, object] = {}
# Reentrant: a bind runs under the lock and opens libraries (libc) itself.
_lock = threading.RLock()


def load_library(soname: str, name: str, package: str, label: str | None = None) -> ctypes.CDLL:
    """``soname`` opened once per process; a missing one is a MissingLibrary naming ``name`` and ``package``."""
    with _lock:
        lib = _loaded.get(soname)
        if lib is None:
            try:
                # use_errno: ctypes.get_errno() then tells why a call failed.
                lib = ctypes.CDLL(soname, use_errno=True)
            except OSError:
                raise MissingLibrary(label, f"{name} is not installed", hint=f"install the {package} package") from None
            _loaded[soname] = lib
        return lib


def load_libc(label: str | None = None) -> ctypes.CDLL:
    """The C library (its allocator, for memory a library hands back or takes)."""
    return load_library(LIBC_SONAME, "the C library", "libc6", label)


def bind_library(soname: str, name: str, package: str, label: str | None,
                 bind: Callable[[ctypes.CDLL], T]) -> T:
    """What ``bind`` makes of ``soname`` (its entry points typed, its build checked), made once per process.

    A missing library is a MissingLibrary naming ``name`` and ``package``; whatever
    ``bind`` raises is passed on and nothing is kept, so the next call tries again."""
    with _lock:
        found = _bound.get(soname)
        if found is None:
            found = _bound[soname] = bind(load_library(soname, name, package, label))
        return found
