"""System libraries through ctypes, opened on first use: ``inspect`` and ``plan`` never need one."""

from __future__ import annotations

import ctypes
import threading

from vhdtool.errors import MissingLibrary

_loaded: dict[str, ctypes.CDLL] = {}
_lock = threading.Lock()


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
