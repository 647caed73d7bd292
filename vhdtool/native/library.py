"""System libraries through ctypes, opened on first use: ``inspect`` and ``plan`` never need one."""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from typing import TypeVar

from vhdtool.errors import MissingLibrary
from vhdtool.native.libraries import LIBC, SystemLibrary

T = TypeVar("T")

_loaded: dict[str, ctypes.CDLL] = {}
_bound: dict[str, object] = {}
# Reentrant: a bind runs under the lock and opens libraries (libc) itself.
_lock = threading.RLock()


def load_library(library: SystemLibrary, label: str | None = None) -> ctypes.CDLL:
    """``library`` opened once per process; a missing one is a MissingLibrary naming it and its packages."""
    with _lock:
        lib = _loaded.get(library.soname)
        if lib is None:
            try:
                # use_errno: ctypes.get_errno() then tells why a call failed.
                lib = ctypes.CDLL(library.soname, use_errno=True)
            except OSError:
                raise MissingLibrary(label, f"{library.name} is not installed", hint=library.install_hint()) from None
            _loaded[library.soname] = lib
        return lib


def load_libc(label: str | None = None) -> ctypes.CDLL:
    """The C library (its allocator, for memory a library hands back or takes)."""
    return load_library(LIBC, label)


def bind_library(library: SystemLibrary, label: str | None, bind: Callable[[ctypes.CDLL], T]) -> T:
    """What ``bind`` makes of ``library`` (its entry points typed, its build checked), made once per process.

    A missing library is a MissingLibrary naming it and its packages; whatever
    ``bind`` raises is passed on and nothing is kept, so the next call tries again."""
    with _lock:
        found = _bound.get(library.soname)
        if found is None:
            found = _bound[library.soname] = bind(load_library(library, label))
        return found
