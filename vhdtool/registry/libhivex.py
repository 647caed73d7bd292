"""ctypes bindings of libhivex (hivex.h): the entry points the edit child calls, bound on first use."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from vhdtool.native import bind_library, load_libc
from vhdtool.native.libraries import LIBHIVEX

LIBRARY = LIBHIVEX
HIVEX_OPEN_WRITE = 4  # hivex.h


class HiveSetValue(ctypes.Structure):
    _fields_ = [("key", ctypes.c_char_p), ("t", ctypes.c_int), ("len", ctypes.c_size_t),
                ("value", ctypes.c_char_p)]


@dataclass(frozen=True)
class Library:
    lib: ctypes.CDLL  # opened with use_errno: ctypes.get_errno() is libhivex's errno after each call
    free: ctypes._CFuncPtr


def load(label) -> Library:
    """libhivex, opened on first use; MissingLibrary (naming its packages) when it is not installed."""
    return bind_library(LIBRARY, label, lambda lib: _bind(lib, label))


def _bind(lib: ctypes.CDLL, label) -> Library:
    size_p = ctypes.POINTER(ctypes.c_size_t)
    for fn, restype, argtypes in (
        ("hivex_open", ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_int]),
        ("hivex_close", ctypes.c_int, [ctypes.c_void_p]),
        ("hivex_commit", ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]),
        ("hivex_root", ctypes.c_size_t, [ctypes.c_void_p]),
        ("hivex_node_name", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t]),
        ("hivex_node_children", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t]),
        ("hivex_node_add_child", ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]),
        ("hivex_node_values", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t]),
        ("hivex_value_key", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t]),
        ("hivex_value_value", ctypes.c_void_p,
         [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_int), size_p]),
        ("hivex_node_set_values", ctypes.c_int,
         [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.POINTER(HiveSetValue), ctypes.c_int]),
    ):
        f = getattr(lib, fn)
        f.restype, f.argtypes = restype, argtypes
    free = load_libc(label).free  # libhivex's names, lists and value data are malloc'd for the caller
    free.restype, free.argtypes = None, [ctypes.c_void_p]
    return Library(lib, free)
