"""The system libraries vhdtool loads: soname, packages and the commands that need each, in one place.

The loaders (``load_library``), their MissingLibrary hints, ``vhdtool doctor`` and the README's
table all name a library's packages from here, so they cannot disagree. install.sh installs the
Debian packages (tests/test_install.py checks that it asks for each one).
"""

from __future__ import annotations

from dataclasses import dataclass

# What the commands write with; a command needs a library only for the work named.
WRITING = ("stage", "copy-in", "services")


@dataclass(frozen=True)
class SystemLibrary:
    name: str  # as messages name it: "libntfs-3g"
    soname: str  # what ctypes opens: "libntfs-3g.so.89"
    debian: str  # the Debian/Ubuntu package that holds the soname
    fedora: str  # the Fedora/RHEL package that holds it (ntfs-3g-libs: from EPEL on RHEL)
    commands: tuple[str, ...]  # the vhdtool commands that load it (batch runs them too)
    used_for: str  # the work it is loaded for

    def install_hint(self) -> str:
        return f"install the {self.debian} package (Debian/Ubuntu; {self.fedora} on Fedora/RHEL)"


LIBNTFS_3G = SystemLibrary(
    "libntfs-3g", "libntfs-3g.so.89", "libntfs-3g89", "ntfs-3g-libs", WRITING,
    "writing NTFS (Windows guests, copy-in to an NTFS partition)")
LIBHIVEX = SystemLibrary(
    "libhivex", "libhivex.so.0", "libhivex0", "hivex-libs", ("stage", "services"),
    "writing registry hives (Windows guests)")
LIBMSPACK = SystemLibrary(
    "libmspack", "libmspack.so.0", "libmspack0", "libmspack", ("plan", "stage"),
    "reading cabs and .msu files (--cabs)")
LIBEXT2FS = SystemLibrary(
    "libext2fs", "libext2fs.so.2", "libext2fs2", "e2fsprogs-libs", WRITING,
    "writing ext2/3/4 (Linux guests, copy-in to an ext partition)")
LIBCOM_ERR = SystemLibrary(
    "libcom_err", "libcom_err.so.2", "libcom-err2", "libcom_err", WRITING,
    "the text of libext2fs's error codes")
LIBC = SystemLibrary(
    "the C library", "libc.so.6", "libc6", "glibc", WRITING + ("plan",),
    "fallocate before a commit, mmap of copied files, memory for libmspack and libhivex")

LIBRARIES = (LIBNTFS_3G, LIBHIVEX, LIBMSPACK, LIBEXT2FS, LIBCOM_ERR, LIBC)
