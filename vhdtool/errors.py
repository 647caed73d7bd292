"""Typed errors: every failure a user can cause, each with a one-line message and an exit code.

Every exit code vhdtool has is defined here and nowhere else (a test greps for
strays). Each layer raises its own subclass; the CLI turns any VhdtoolError into
``vhdtool: <message>`` on stderr and its ``exit_code``. Nothing else may escape
a parser: a struct error, an IndexError or an EOFError met while reading an
image is a corrupt image, not a crash. Each layer translates the exceptions of
the library below it in one way, ``translating(...)``, at its boundary.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

# Codes that belong to no error type. Command-line usage errors exit with 2, as
# click makes them; ImageNotFound shares that code.
EXIT_OK = 0
EXIT_INTERNAL_ERROR = 70  # a bug: an exception no layer translated (sysexits EX_SOFTWARE)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it
EXIT_SOME_FAILED = 21  # `batch`, `report`: the run went through, some images failed (each has its own code)


class VhdtoolError(Exception):
    """Base of all errors vhdtool reports to a user."""

    exit_code = 1
    hint = ""

    def __init__(self, path: str | os.PathLike | None, problem: str, hint: str | None = None):
        self.path = os.fspath(path) if path is not None else None
        self.problem = problem
        if hint is not None:
            self.hint = hint
        super().__init__(self.message)

    @property
    def message(self) -> str:
        where = f"{self.path}: " if self.path else ""
        text = f"{where}{self.problem}"
        if self.hint:
            text += f"; {self.hint}"
        # One line, whatever the problem text carried.
        return " ".join(text.split())


def first_line(e: BaseException) -> str:
    """The first line of what a third-party library said, for a one-line message."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


@contextlib.contextmanager
def translating(error: type[VhdtoolError], path: str | os.PathLike | None, what: str) -> Iterator[None]:
    """Turn any failure of a third-party library inside the block into one ``error``.

    ``what`` names the place ("NTFS on partition 2: /Windows"); the library's own
    first line follows it. Our own errors pass through untouched, so a layer may
    raise a more specific one inside the block. MemoryError and RecursionError are
    what hostile sizes and cycles make a parser raise.
    """
    try:
        yield
    except VhdtoolError:
        raise
    except (MemoryError, RecursionError) as e:
        raise error(path, f"{what}: structures too large or cyclic ({type(e).__name__})") from None
    except Exception as e:  # noqa: BLE001 - parsers of damaged data raise anything
        raise error(path, f"{what}: {first_line(e)}") from None


# -- container layer -------------------------------------------------------

class ImageNotFound(VhdtoolError):
    exit_code = 2
    hint = "check the path"


class NotADiskImage(VhdtoolError):
    exit_code = 3
    hint = "give a .vhdx or .vhd file"


class CorruptImage(VhdtoolError):
    exit_code = 4
    hint = "the image is damaged; restore it from a backup or repair it on a Hyper-V host"


class UnsupportedImage(VhdtoolError):
    exit_code = 5
    hint = "this layout is not supported"


class MissingParent(VhdtoolError):
    exit_code = 6
    hint = "put the parent disk next to the differencing disk"


# -- volume layer -------------------------------------------------------------

class NoPartitionTable(VhdtoolError):
    exit_code = 7
    hint = "give the VM's partitioned system disk, not a bare filesystem image"


class UnsupportedLayout(VhdtoolError):
    exit_code = 5


# -- filesystem / guest layers ------------------------------------------------

class EncryptedVolume(VhdtoolError):
    exit_code = 8
    hint = "unlock or decrypt the volume inside the guest first"


class NoGuestFound(VhdtoolError):
    exit_code = 9
    hint = "give the VM's system disk"


class CorruptFilesystem(VhdtoolError):
    exit_code = 4
    hint = "run chkdsk inside the guest"


class CorruptHive(VhdtoolError):
    exit_code = 4
    hint = "the registry hive is damaged"


class UnreplayableHive(CorruptHive):
    """A dirty hive whose logs cannot bring it up to date; ``why`` is the reason alone, for reports."""

    def __init__(self, path: str | os.PathLike | None, problem: str, why: str, hint: str | None = None):
        self.why = why
        super().__init__(path, problem, hint)


# -- writing (refusals come before anything is written) ---------------------------------

class WriteFailed(VhdtoolError):
    exit_code = 15
    hint = "check the disk holding the image (space, I/O errors); vhdtool replays or discards its own log at the next open"


class ImageInUse(VhdtoolError):
    exit_code = 16
    hint = "stop the VM or the program that has the image open, then try again"


class ImageReadOnly(VhdtoolError):
    exit_code = 17
    hint = "make the image file writable, or write a copy with --output NEW"


class GuestNotClean(VhdtoolError):
    exit_code = 18
    hint = "boot the guest and shut it down cleanly (not hibernated, Fast Startup off), then try again"


class ImageHasChildren(VhdtoolError):
    exit_code = 19
    hint = "merge or delete the differencing disks that depend on it, or write a copy with --output NEW"


class VolumeFull(VhdtoolError):
    """The guest volume has no room for what is to be written; found before anything is written."""

    exit_code = 26
    hint = "the image is unchanged; free space in the guest, copy less, or give a larger volume"


class SetupPending(VhdtoolError):
    exit_code = 20
    hint = "boot the guest once so that Windows runs the pending setup command, or clear SYSTEM\\Setup CmdLine"


# -- native libraries (vhdtool.native) ------------------------------------------

class NativeError(VhdtoolError):
    """A system library could not be loaded, or its sandboxed child failed.

    Layers that run native code (cabinet, NTFS and hive writers) translate it into
    their own error naming what was being read; this code is seen only where none does.
    """

    exit_code = 13


class MissingLibrary(NativeError):
    exit_code = 14
    hint = "install the system package named above"


# -- cabinets, cab sources, ISO ------------------------------------------------------

class CabError(VhdtoolError):
    exit_code = 10
    hint = "use an intact cab from the integration services disk or the Download Center"


class CabSourceError(VhdtoolError):
    exit_code = 12
    hint = "give a folder of cabs, a .cab file or the host's vmguest.iso"


class IsoError(CabSourceError):
    hint = "use the host's vmguest.iso (C:\\Windows\\System32\\vmguest.iso) or a folder of cabs"


# -- plan ------------------------------------------------------------------------------

class UnknownKey(VhdtoolError):
    """An unknown host, matrix revision, or a host that cannot be told from the guest."""

    exit_code = 11


# -- fleet (batch, report) -----------------------------------------------------------

class ImageTimedOut(VhdtoolError):
    """An image took longer than the batch's per-image time limit; its worker was killed.

    A kill mid-write is a crash the transaction is built for: the image is left as it
    was or fully changed, never in between.
    """

    exit_code = 22
    hint = "run it alone to see why, or raise --timeout"


class WorkerDied(VhdtoolError):
    exit_code = 23
    hint = "a bug or the kernel's OOM killer: run `vhdtool` on this image alone (VHDTOOL_DEBUG=1) and report it"


class BadManifest(VhdtoolError):
    exit_code = 24
    hint = "give CSV (image,host,output,cabs) or JSON lines ({\"image\": ...}), one image per row"


class BadReport(VhdtoolError):
    exit_code = 25
    hint = "give a report written by `vhdtool batch --report`"
