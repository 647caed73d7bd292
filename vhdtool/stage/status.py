"""`status`: what the boot-time installer left in the guest, read offline and read-only.

For each staged id under %SystemRoot%\\vhdtool (and, read by ``parse_linux_state``, under a
Linux guest's /var/lib/vhdtool, whose install.sh writes the same result.txt): ``pending``
(staged, never run), ``running`` (it started: attempts.txt, but no result.txt), ``installed``
(result.txt with exit code 0 or 3010 on Windows, 0 on Linux) or ``failed`` (any other exit
code, or none readable, with the last lines of install.log). ``none`` when nothing was ever
staged. A staging that a newer one replaced before it finished is gone (stage deletes it in
the same commit); one that finished (result.txt) stays listed, as history. A Linux guest's
stagings are read from its root filesystem (ext2/3/4 or XFS, on a partition or an LVM volume);
its ic_version and ic_source are null (its drivers come with its kernel).

On Windows each staging's state is then checked against Windows' own record of its packages
(Component Based Servicing, in SOFTWARE read as Windows will read it at boot): the identity stage
recorded in package.txt, that package's CurrentState, the RebootPending/PackagesPending keys and
the IC version the guest records. ``stage/crosscheck.py`` decides, adding ``reboot-pending`` and
``inconsistent``; a staging without package.txt (an older stage) has CBS state "unknown".
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace

from vhdtool.cabinet.format import CBS_IDENTITY
from vhdtool.container import open_disk
from vhdtool.errors import UnsupportedLayout
from vhdtool.filesystem import NtfsFilesystem
from vhdtool.filesystem.base import Filesystem
from vhdtool.filesystem.linuxfs import open_linux_filesystem
from vhdtool.guest.cbs import CbsPackage, ServicingState, read_package, read_servicing
from vhdtool.guest.discover import inspect_disk, linux_candidates
from vhdtool.guest.inspection import require_guest
from vhdtool.guest.linux import is_linux_root
from vhdtool.guest.versioninfo import version_tuple
from vhdtool.guest.windows import open_guest_hive
from vhdtool.stage.linux_script import ID_PATTERN as LINUX_ID_PATTERN
from vhdtool.stage.linux_script import STAGING_ROOT as LINUX_STAGING_ROOT
from vhdtool.stage.linux_script import SUCCESS_CODES as LINUX_SUCCESS_CODES
from vhdtool.stage.crosscheck import crosscheck, ic_covers
from vhdtool.stage.script import ID_PATTERN, PACKAGE_FILE, SUCCESS_CODES
from vhdtool.volume import open_partition

SCHEMA = 1
STAGING_ROOT = "/Windows/vhdtool"
FINISHED_FILES = ("result.txt", "attempts.txt")  # how far a staging's runs got; removed to start it afresh
LOG_TAIL = 10
RESULT_LINE = re.compile(r"^(exit_code|attempts|finished)=(.{0,100})$")
IDENTITY_LINE = re.compile(r"^identity=(.{1,300})$")


@dataclass(frozen=True)
class StagedState:
    id: str
    # "pending" | "running" | "installed" | "failed"; on Windows also "reboot-pending" | "inconsistent"
    # (stage/crosscheck.py)
    state: str
    exit_code: int | None
    attempts: int | None
    finished: str | None
    log_tail: tuple[str, ...]
    cbs: CbsPackage | None = None  # Windows: the package's CBS record; None on Linux

    def to_dict(self) -> dict:
        return {"id": self.id, "state": self.state, "exit_code": self.exit_code, "attempts": self.attempts,
                "finished": self.finished, "log_tail": list(self.log_tail),
                "cbs": self.cbs.to_dict() if self.cbs else None}


@dataclass(frozen=True)
class Status:
    image: str
    state: str  # the newest staging's state, or "none"
    staged: tuple[StagedState, ...]
    ic_version: str | None
    ic_source: str | None
    servicing: ServicingState | None = None  # Windows: CBS's RebootPending/PackagesPending; None on Linux

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "image": self.image, "state": self.state,
                "staged": [s.to_dict() for s in self.staged], "ic_version": self.ic_version,
                "ic_source": self.ic_source, "cbs": self.servicing.to_dict() if self.servicing else None}


def _int(text: str | None) -> int | None:
    """A number the boot-time script wrote; None for anything else, including one no 32-bit exit code or count
    can be (cmd prints an exit code as signed, so -2**31 .. 2**32-1): the file is the guest's, hence hostile."""
    try:
        value = int(text) if text is not None else None
    except ValueError:
        return None
    return value if value is None or -2**31 <= value < 2**32 else None


def parse_state(staged_id: str, result: bytes | None, attempts: bytes | None, log: bytes | None,
                success_codes: tuple[int, ...] = SUCCESS_CODES) -> StagedState:
    """The state of one staging from its files' contents (None: the file is absent).

    Pure, and the same for both guests: install.cmd and install.sh (``stage/linux_script.py``)
    write the same result.txt keys; only what counts as success differs (``success_codes``:
    0 and 3010 for dism and pkgmgr, 0 for a package manager). Every content is hostile: it is
    decoded leniently, a line that is not one of the keys is ignored, a number that does not
    parse is None. The caller bounds how much of each file it reads.
    """
    fields: dict[str, str] = {}
    for line in (result or b"").decode("latin-1").splitlines():
        m = RESULT_LINE.match(line.strip())
        if m:
            fields[m.group(1)] = m.group(2).strip()
    text = (log or b"").decode("utf-8", "replace")
    tail = [line.rstrip() for line in text.splitlines() if line.strip()][-LOG_TAIL:]
    count = _int(fields.get("attempts"))
    if count is None and attempts is not None:
        count = _int(attempts.decode("latin-1").strip())
    exit_code = _int(fields.get("exit_code"))
    if result is not None:
        # The script writes result.txt once, when it is done: one without a readable exit code
        # (cut short, or altered) is a finished run whose outcome is unknown, never a pending one.
        state = "installed" if exit_code in success_codes else "failed"
    elif count:
        state = "running"
    else:
        state = "pending"
    return StagedState(staged_id, state, exit_code, count, fields.get("finished"), tuple(tail))


def parse_linux_state(staged_id: str, result: bytes | None, attempts: bytes | None,
                      log: bytes | None) -> StagedState:
    """``parse_state`` for what install.sh left in /var/lib/vhdtool/<id> (success: exit code 0)."""
    return parse_state(staged_id, result, attempts, log, LINUX_SUCCESS_CODES)


def read_state(fs: Filesystem, staged_id: str, root: str = STAGING_ROOT,
               success_codes: tuple[int, ...] = SUCCESS_CODES) -> StagedState:
    """``parse_state`` over the files of ``root/staged_id`` (Windows: /Windows/vhdtool; Linux: /var/lib/vhdtool)."""
    folder = f"{root}/{staged_id}"

    def content(name: str, limit: int) -> bytes | None:
        # A folder of that name holds nothing readable, but exists: install.cmd's and install.sh's
        # existence tests (``if exist``, ``[ -e ]``) take a result.txt folder for a finished run, and so does this.
        path = f"{folder}/{name}"
        if not fs.exists(path):
            return None
        return b"" if fs.is_dir(path) else fs.read(path, limit)

    return parse_state(staged_id, content("result.txt", 4096), content("attempts.txt", 64),
                       content("install.log", 1 << 20), success_codes)


def staging_ids(fs: Filesystem, root: str, pattern: re.Pattern) -> list[str]:
    """The stagings under ``root``: folders whose name ``pattern`` matches (a file or a link loop of that name is
    nobody's staging)."""
    names = fs.listdir(root) if fs.is_dir(root) else []
    return [n for n in names if pattern.fullmatch(n) and fs.is_dir(f"{root}/{n}")]


def linux_staged(fs: Filesystem) -> tuple[StagedState, ...]:
    """Every staging under a Linux guest's /var/lib/vhdtool, finished ones first (by when), the unfinished last."""
    root = LINUX_STAGING_ROOT
    states = [read_state(fs, i, root, LINUX_SUCCESS_CODES) for i in staging_ids(fs, root, LINUX_ID_PATTERN)]
    return tuple(sorted(states, key=lambda s: (s.state in ("pending", "running"), s.finished or "", s.id)))


def status(image: str | os.PathLike) -> Status:
    path = os.fspath(image)
    with open_disk(path) as disk:
        ins = require_guest(inspect_disk(disk))  # a data disk: nothing is ever staged in it
        w = ins.guest.windows
        if ins.guest.os == "linux" and ins.guest.linux is not None:
            staged = linux_staged(_linux_root(disk, ins, path))
            return Status(path, staged[-1].state if staged else "none", staged, None, None)
        if ins.guest.os != "windows" or w is None:
            raise UnsupportedLayout(path, f"the guest is {ins.guest.os}: nothing is ever staged in it",
                                    "stage and status know Windows and Linux guests")
        part = next(p for p in ins.partitions if p.index == w.system_partition)
        fs = NtfsFilesystem(open_partition(disk, part), path, f"partition {part.index}")
        ids = staging_ids(fs, STAGING_ROOT, ID_PATTERN)
        ids.sort(key=lambda i: version_tuple(i.split("-")[0]))
        ic = ins.guest.integration_services
        ic_version = ic.version if ic else None
        # As Windows will read it at boot (a dirty hive's logs replayed in memory), as inspect read it.
        software, _ = open_guest_hive(fs, "SOFTWARE", path, [])
        servicing = read_servicing(software)
        staged = tuple(_checked(read_state(fs, i), read_package(software, read_identity(fs, i)), servicing, ic_version)
                       for i in ids)
    return Status(path, staged[-1].state if staged else "none", staged, ic_version, ic.source if ic else None,
                  servicing)


def parse_identity(package: bytes | None) -> str | None:
    """The identity in package.txt's content (None: absent); None too for one that is not a safe CBS key name.

    Hostile like every file of the guest: decoded leniently, the first ``identity=`` line only, and the
    value must match ``CBS_IDENTITY`` (it becomes a registry path: no backslash gets through).
    """
    for line in (package or b"").decode("latin-1").splitlines():
        m = IDENTITY_LINE.match(line.strip())
        if m:
            return m.group(1) if CBS_IDENTITY.fullmatch(m.group(1)) else None
    return None


def read_identity(fs: Filesystem, staged_id: str) -> str | None:
    """The package identity stage recorded in the staging's package.txt; None for an older staging without one."""
    path = f"{STAGING_ROOT}/{staged_id}/{PACKAGE_FILE}"
    return parse_identity(fs.read(path, 4096) if fs.exists(path) and not fs.is_dir(path) else None)


def _checked(staged: StagedState, package: CbsPackage, servicing: ServicingState, ic_version: str | None) -> StagedState:
    covered = ic_covers(package, staged.id.split("-")[0], ic_version)
    return replace(staged, state=crosscheck(staged.state, staged.exit_code, package, servicing, covered), cbs=package)


def _linux_root(disk, ins, path: str) -> Filesystem:
    """The Linux root filesystem ``inspect`` reported (the first one found, on its partition or LVM volume)."""
    root = ins.guest.linux.root_partition
    for index, kind, stream, label in linux_candidates(disk, list(ins.partitions), path, []):
        fs = open_linux_filesystem(stream, kind, path, label)
        if index == root and is_linux_root(fs):
            return fs
    raise UnsupportedLayout(path, "the Linux root filesystem could not be opened again", "see `vhdtool inspect`")
