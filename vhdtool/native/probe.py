"""What the dynamic loader finds of each system library vhdtool loads (``vhdtool doctor``).

A library is found when ``dlopen`` of its soname succeeds, as it must when a command loads it. Its
version is what the library itself says through a version call, where it has one; a library without
one says so rather than a version read from elsewhere.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass

from vhdtool.errors import MissingLibrary
from vhdtool.native.libraries import (LIBC, LIBCOM_ERR, LIBEXT2FS, LIBHIVEX, LIBMSPACK, LIBNTFS_3G, LIBRARIES,
                                      SystemLibrary)
from vhdtool.native.library import load_library

SCHEMA = 1
RTLD_DI_LINKMAP = 2  # dlfcn.h
MSPACK_VER_LIBRARY = 0  # mspack.h


class LinkMap(ctypes.Structure):
    """The head of glibc's struct link_map (link.h): its l_name is the file the loader opened."""

    _fields_ = [("l_addr", ctypes.c_void_p), ("l_name", ctypes.c_char_p)]


@dataclass(frozen=True)
class LibraryCheck:
    library: SystemLibrary
    found: bool
    path: str | None  # the file the loader opened
    version: str | None
    version_from: str  # the call that told the version, or why there is none

    def to_dict(self) -> dict:
        lib = self.library
        return {"name": lib.name, "soname": lib.soname, "found": self.found, "path": self.path,
                "version": self.version, "version_from": self.version_from,
                "packages": {"debian": lib.debian, "fedora": lib.fedora},
                "commands": list(lib.commands), "used_for": lib.used_for}


def _ntfs_3g(lib: ctypes.CDLL) -> tuple[str | None, str]:
    try:
        fn = lib.ntfs_libntfs_version
    except AttributeError:
        return None, "this build exports no version call (ntfs_libntfs_version)"
    fn.restype, fn.argtypes = ctypes.c_char_p, []
    return fn().decode("ascii", "replace"), "ntfs_libntfs_version()"


def _ext2fs(lib: ctypes.CDLL) -> tuple[str | None, str]:
    fn = lib.ext2fs_get_library_version
    fn.restype, fn.argtypes = ctypes.c_int, [ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_char_p)]
    version, date = ctypes.c_char_p(), ctypes.c_char_p()
    fn(ctypes.byref(version), ctypes.byref(date))
    text = (version.value or b"").decode("ascii", "replace")
    if date.value:
        text += f" ({date.value.decode('ascii', 'replace')})"
    return text or None, "ext2fs_get_library_version()"


def _mspack(lib: ctypes.CDLL) -> tuple[str | None, str]:
    fn = lib.mspack_version
    fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_int]
    return None, f"libmspack tells only its interface version ({fn(MSPACK_VER_LIBRARY)}), not its release"


def _libc(lib: ctypes.CDLL) -> tuple[str | None, str]:
    fn = lib.gnu_get_libc_version
    fn.restype, fn.argtypes = ctypes.c_char_p, []
    return fn().decode("ascii", "replace"), "gnu_get_libc_version()"


def _none(name: str) -> Callable[[ctypes.CDLL], tuple[None, str]]:
    return lambda _lib: (None, f"{name} has no version call")


VERSION_CALLS: dict[str, Callable[[ctypes.CDLL], tuple[str | None, str]]] = {
    LIBNTFS_3G.soname: _ntfs_3g,
    LIBHIVEX.soname: _none("libhivex"),
    LIBMSPACK.soname: _mspack,
    LIBEXT2FS.soname: _ext2fs,
    LIBCOM_ERR.soname: _none("libcom_err"),
    LIBC.soname: _libc,
}


def _path(lib: ctypes.CDLL) -> str | None:
    """The file the loader opened for ``lib`` (dlinfo), or None where the C library has no dlinfo."""
    try:
        dlinfo = load_library(LIBC).dlinfo
    except (AttributeError, MissingLibrary):
        return None
    dlinfo.restype, dlinfo.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    head = ctypes.POINTER(LinkMap)()
    if dlinfo(lib._handle, RTLD_DI_LINKMAP, ctypes.byref(head)) != 0 or not head or not head.contents.l_name:
        return None
    return head.contents.l_name.decode("utf-8", "surrogateescape")


def check_library(library: SystemLibrary) -> LibraryCheck:
    try:
        lib = load_library(library)
    except MissingLibrary:
        return LibraryCheck(library, False, None, None, "not found")
    version, version_from = VERSION_CALLS.get(library.soname, _none(library.name))(lib)
    return LibraryCheck(library, True, _path(lib), version, version_from)


def check_libraries() -> list[LibraryCheck]:
    return [check_library(library) for library in LIBRARIES]


def missing_error(checks: list[LibraryCheck]) -> MissingLibrary | None:
    """One MissingLibrary naming every library not found and the packages that bring them."""
    missing = [c.library for c in checks if not c.found]
    if not missing:
        return None
    names = ", ".join(lib.name for lib in missing)
    verb = "is" if len(missing) == 1 else "are"
    if len(missing) == 1:
        hint = missing[0].install_hint()
    else:
        hint = (f"install the packages {' '.join(lib.debian for lib in missing)} (Debian/Ubuntu; "
                f"{' '.join(lib.fedora for lib in missing)} on Fedora/RHEL)")
    return MissingLibrary(None, f"{names} {verb} not installed", hint=hint)


def doctor_document(checks: list[LibraryCheck]) -> dict:
    return {"schema": SCHEMA, "ok": all(c.found for c in checks),
            "libraries": [c.to_dict() for c in checks],
            # vhdtool starts no programs of its own: everything it runs is one of these libraries.
            "programs": []}
