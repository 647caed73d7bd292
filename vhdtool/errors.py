"""Typed errors: every failure a user can cause, each with a one-line message and an exit code.

Each layer raises its own subclass; the CLI turns any VhdtoolError into
``vhdtool: <message>`` on stderr and its ``exit_code``. Nothing else may escape
a parser: a struct error, an IndexError or an EOFError met while reading an
image is a corrupt image, not a crash.
"""

from __future__ import annotations

import os


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
    hint = "the disk has no MBR or GPT partition table"


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
