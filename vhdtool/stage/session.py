"""`stage`: plan, then write the cab, install.cmd and the boot hook through the write engine, per image.

A Linux guest's plan (packages, no cab) is staged by ``stage/linux_session.py`` in the same edit session.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, replace

from vhdtool.editor import ChangeSet, edit
from vhdtool.errors import CabError, SetupPending, UnsupportedLayout
from vhdtool.plan.decide import MANUAL, STAGE, Plan, plan_for_host, signature_refusal
from vhdtool.plan.guestkey import identify
from vhdtool.plan.matrix import Matrix
from vhdtool.plan.sources import CabCatalog, cab_source
from vhdtool.guest.versioninfo import version_tuple
from vhdtool.stage.script import (
    ID_PATTERN,
    MARKER,
    MAX_ATTEMPTS,
    PACKAGE_FILE,
    StagedScript,
    cmdline_id,
    install_id,
    installer_for,
    is_ours,
    render,
    render_package,
)
from vhdtool.stage.linux_session import stage_linux
from vhdtool.stage.status import FINISHED_FILES, STAGING_ROOT, parse_state

SCHEMA = 1
SETUP_KEY = "Setup"
SETUP_COMPLETE = "/Windows/Setup/Scripts/SetupComplete.cmd"


@dataclass(frozen=True)
class StageResult:
    plan: Plan
    staged: bool  # the image now holds this staging (whether this run wrote it or an earlier one)
    id: str | None
    files: tuple[dict, ...]
    boot_hook: dict | None
    edit: ChangeSet | None

    @property
    def changed(self) -> bool:
        return self.edit is not None and bool(self.edit.files or self.edit.registry)

    def to_dict(self) -> dict:
        d = self.plan.to_dict()
        d.update({
            # The image holds this staging (written now or before); a dry run that would write it has not.
            "staged": self.staged and not (self.edit is not None and self.edit.dry_run and self.changed),
            "id": self.id,
            "files": list(self.files),
            "boot_hook": self.boot_hook,
            "output": self.edit.output if self.edit else None,
            "changes": self.edit.to_dict()["changes"] if self.edit else {"files": [], "registry": []},
            "bytes_written": self.edit.bytes_written if self.edit else 0,
            "dry_run": self.edit.dry_run if self.edit else False,
            "committed": self.edit.committed if self.edit else False,
        })
        return d


def stage(image: str | os.PathLike, host: str | None, catalog: CabCatalog, matrix: Matrix,
          dry_run: bool = False, output: str | os.PathLike | None = None) -> StageResult:
    """Stage the plan's cab into ``image`` (``host`` None: the host the guest last ran on).

    With ``output``, the copy is made whatever the plan says, so that a pipeline finds it.
    """
    staged = None
    with edit(image, dry_run=dry_run, output=output) as ed:
        # With --output the session inspects the copy; the plan names the image it was asked about.
        plan = replace(plan_for_host(ed.inspection, host, catalog, matrix), image=os.fspath(image))
        _refuse_unsigned(plan, catalog, ed.inspection)
        if plan.action == STAGE and plan.packages:
            # A Linux plan: install.sh and its systemd unit, through the ext4 writer.
            staged = stage_linux(ed, os.fspath(image), plan)
        elif plan.action == STAGE:
            staged = _stage_into(ed, image, plan)
    if staged is None:
        return StageResult(plan, False, None, (), None, ed.result)
    script, files, hook = staged
    return StageResult(plan, True, script.id, files, hook, ed.result)


def _refuse_unsigned(plan: Plan, catalog: CabCatalog, inspection) -> None:
    """A plan left without a cab because the guest's cab was refused for its signature is an error, not a
    quiet "manual": the user asked for that cab to be staged."""
    if plan.action != MANUAL:
        return
    guest = identify(inspection)
    for c in catalog.candidates:
        fits = c.arch == guest.arch and c.nt == guest.nt and not c.problem
        why = signature_refusal(c, catalog.require_signed) if fits else None
        if why:
            hint = ("use the cab as Microsoft ships it" if c.signature == "invalid"
                    else "drop --require-signed to accept it, or give its root with --trust-root")
            raise CabError(c.container, f"not staged: {why}", hint)


def _stage_into(ed, image, plan: Plan):
    w = ed.inspection.guest.windows
    if not w.drive_letter:
        raise UnsupportedLayout(image, "MountedDevices names no drive letter for the system volume",
                                "the boot script needs the guest's system drive")
    script = StagedScript(
        id=install_id(plan.cab.version, plan.cab.arch),
        cab_name=plan.cab.name,
        installer=installer_for(w.version),
        system_root=f"{w.drive_letter}:\\Windows",
        hook="setupcomplete" if w.generalized else "setup-cmdline",
    )
    _refuse_a_pending_newer(ed, image, plan, script)
    replaced = _replaced(ed, script)
    text = render(script)
    folder = script.guest_folder
    # The new files first: they take clusters free now, not the ones the deletes free (those stay
    # readable by the old state until the commit, so data written there would go through the log).
    ed.mkdir(folder)
    # The cab stays in its file (or its ISO): the session takes the Source over, copies it into
    # the image at the commit, and closes it when the session ends.
    cab = cab_source(plan.cab)
    ed.write_file(f"{folder}/{script.cab_name}", cab)
    ed.write_file(f"{folder}/install.cmd", text)
    # What CBS will record the package as, for `status` (the cab is deleted once it installed).
    package = render_package(plan.cab.cbs_identity) if plan.cab.cbs_identity else None
    if package:
        ed.write_file(f"{folder}/{PACKAGE_FILE}", package)
    # A finished run of this id (failed for good, or installed), or one whose attempts are used up (power lost
    # in the last), starts afresh: install.cmd only clears the hook while result.txt exists, and gives up
    # without a try past MAX_ATTEMPTS. install.log stays and is appended to.
    if _finished(ed, folder):
        for name in FINISHED_FILES:
            ed.delete(f"{folder}/{name}")
    for old in replaced:
        ed.delete(f"{STAGING_ROOT}/{old}")
    if script.hook == "setup-cmdline":
        ed.set_value("SYSTEM", SETUP_KEY, "SetupType", 2, "REG_DWORD")
        ed.set_value("SYSTEM", SETUP_KEY, "CmdLine", script.cmdline, "REG_SZ")
        hook = {"kind": "setup-cmdline", "command": script.cmdline}
    else:
        existing = ed.file_content(SETUP_COMPLETE) or b""
        _refuse_an_unreachable_end(image, existing)
        # The replaced packages' lines go, as each install.cmd would remove its own (findstr /v).
        line = script.setupcomplete_line.encode("ascii")
        # Ours goes last, whatever was appended after it since: Windows' cmd.exe goes on reading the file at
        # the byte offset it had reached, so install.cmd dropping a line that is not the last shifts the rest.
        kept = b"".join(text for text in existing.splitlines(keepends=True) if text.rstrip(b"\r\n") != line
                        and not any(f"{MARKER} {old}".encode() in text for old in replaced))
        kept = (kept if not kept or kept.endswith(b"\n") else kept + b"\r\n") + line + b"\r\n"
        if kept != existing:
            ed.write_file(SETUP_COMPLETE, kept)
        hook = {"kind": "setupcomplete", "command": script.setupcomplete_line}
    files = (
        {"path": f"{folder}/{script.cab_name}", "size": len(cab), "sha256": cab.sha256()},
        {"path": f"{folder}/install.cmd", "size": len(text), "sha256": hashlib.sha256(text).hexdigest()},
    )
    if package:
        files += ({"path": f"{folder}/{PACKAGE_FILE}", "size": len(package),
                   "sha256": hashlib.sha256(package).hexdigest()},)
    return script, files, hook


# A line that ends SetupComplete.cmd wherever it stands: ``exit``, ``exit /b``, ``goto :eof`` at the start of a line
# (an indented one is taken for a conditional one, in a block). A label after it may be reached by call or goto.
_SCRIPT_END = re.compile(rb"^(@[ \t]*)?(exit|goto[ \t]*:eof)([ \t/].*)?$", re.IGNORECASE)
_LABEL = re.compile(rb"^[ \t]*:[^:]")


def _refuse_an_unreachable_end(image, existing: bytes) -> None:
    """Refuse a SetupComplete.cmd after which the line stage appends would never run (stage would say
    staged, and `status` say pending for ever): UTF-16 text, which cmd.exe does not run, or a script whose
    last label or end line is an end line (``exit``, ``goto :eof``)."""
    if existing[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\0" in existing:
        raise UnsupportedLayout(image, f"{SETUP_COMPLETE} is UTF-16 text, which cmd.exe does not run: the line "
                                       "stage appends to it would never run",
                                "save it in the guest as ANSI text, or stage the image before generalizing it")
    last = None
    for number, line in enumerate(existing.splitlines(), 1):
        line = line.rstrip(b"\x1a")
        if _SCRIPT_END.match(line):
            last = (number, line)
        elif _LABEL.match(line):
            last = None
    if last is not None:
        number, line = last
        raise UnsupportedLayout(image, f"{SETUP_COMPLETE} line {number} ({line.decode('latin-1').strip()!r}) "
                                       "ends the script before the line stage appends to it, which would never run",
                                "end the script without exit or goto :eof in the guest, or stage the image "
                                "before generalizing it")


def _finished(ed, folder: str) -> bool:
    """Whether the staging in ``folder`` would not run the installer at the next boot (status.parse_state's reading)."""
    if "result.txt" not in (n.casefold() for n in ed.listdir(folder)):
        attempts = (ed.file_content(f"{folder}/attempts.txt") or b"")[:64]
        state = parse_state("", None, attempts, None)
        return state.attempts is not None and state.attempts >= MAX_ATTEMPTS
    return True


def _hooked(ed, image, script: StagedScript) -> list[str]:
    """The ids of ours that the guest's boot hook runs at next boot."""
    if script.hook == "setup-cmdline":
        setup_type = ed.read_value("SYSTEM", SETUP_KEY, "SetupType", 0)
        cmdline = ed.read_value("SYSTEM", SETUP_KEY, "CmdLine", "") or ""
        if (setup_type not in (0, None) or cmdline) and not is_ours(cmdline):
            raise SetupPending(image, f"another setup command is pending (SetupType={setup_type}, CmdLine={cmdline!r})")
        found = cmdline_id(cmdline)
        return [found] if found else []
    text = (ed.file_content(SETUP_COMPLETE) or b"").decode("latin-1")
    marked = [line.split(MARKER, 1)[1].strip() for line in text.splitlines() if MARKER in line]
    return [i for i in marked if ID_PATTERN.fullmatch(i)]


def _refuse_a_pending_newer(ed, image, plan: Plan, script: StagedScript) -> None:
    for pending in _hooked(ed, image, script):
        if version_tuple(pending.split("-")[0]) > version_tuple(plan.cab.version):
            raise SetupPending(image, f"a newer integration services package ({pending}) is already staged to "
                                      f"install at next boot than the chosen {plan.cab.version}",
                               "boot the guest once, or stage from the newer cab source")


def _replaced(ed, script: StagedScript) -> list[str]:
    """Our staged folders that the new one replaces: no newer than it, and never run to the end.

    A folder with result.txt is history (installed, or failed after its last attempt) and is
    kept for `status`; one without never finished, and the hook now runs the new one instead.
    """
    new = version_tuple(script.id.split("-")[0])
    return [name for name in ed.listdir(STAGING_ROOT)
            if ID_PATTERN.fullmatch(name) and name.casefold() != script.id.casefold()
            and version_tuple(name.split("-")[0]) <= new
            and ed.file_content(f"{STAGING_ROOT}/{name}/result.txt") is None]
