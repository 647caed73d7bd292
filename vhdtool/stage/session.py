"""`stage`: plan, then write the cab, install.cmd and the boot hook through the write engine, per image."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace

from vhdtool.editor import ChangeSet, edit
from vhdtool.errors import SetupPending, UnsupportedLayout
from vhdtool.plan.decide import STAGE, Plan, plan_for_host
from vhdtool.plan.matrix import Matrix
from vhdtool.plan.sources import CabCatalog, cab_bytes
from vhdtool.guest.versioninfo import version_tuple
from vhdtool.stage.script import StagedScript, cmdline_id, install_id, installer_for, is_ours, render

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
        if plan.action == STAGE:
            staged = _stage_into(ed, image, plan)
    if staged is None:
        return StageResult(plan, False, None, (), None, ed.result)
    script, files, hook = staged
    return StageResult(plan, True, script.id, files, hook, ed.result)


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
    if script.hook == "setup-cmdline":
        setup_type = ed.read_value("SYSTEM", SETUP_KEY, "SetupType", 0)
        cmdline = ed.read_value("SYSTEM", SETUP_KEY, "CmdLine", "") or ""
        ours = is_ours(cmdline)
        if (setup_type not in (0, None) or cmdline) and not ours:
            raise SetupPending(image, f"another setup command is pending (SetupType={setup_type}, CmdLine={cmdline!r})")
        pending = cmdline_id(cmdline) if ours else None
        if pending and version_tuple(pending.split("-")[0]) > version_tuple(plan.cab.version):
            raise SetupPending(image, f"a newer integration services package ({pending}) is already staged to "
                                      f"install at next boot than the chosen {plan.cab.version}",
                               "boot the guest once, or stage from the newer cab source")
    cab = cab_bytes(plan.cab)
    text = render(script)
    folder = script.guest_folder
    ed.mkdir(folder)
    ed.write_file(f"{folder}/{script.cab_name}", cab)
    ed.write_file(f"{folder}/install.cmd", text)
    if script.hook == "setup-cmdline":
        ed.set_value("SYSTEM", SETUP_KEY, "SetupType", 2, "REG_DWORD")
        ed.set_value("SYSTEM", SETUP_KEY, "CmdLine", script.cmdline, "REG_SZ")
        hook = {"kind": "setup-cmdline", "command": script.cmdline}
    else:
        existing = ed.file_content(SETUP_COMPLETE) or b""
        line = script.setupcomplete_line.encode("ascii")
        if line not in existing:
            joined = existing if not existing or existing.endswith(b"\n") else existing + b"\r\n"
            ed.write_file(SETUP_COMPLETE, joined + line + b"\r\n")
        hook = {"kind": "setupcomplete", "command": script.setupcomplete_line}
    files = (
        {"path": f"{folder}/{script.cab_name}", "size": len(cab), "sha256": hashlib.sha256(cab).hexdigest()},
        {"path": f"{folder}/install.cmd", "size": len(text), "sha256": hashlib.sha256(text).hexdigest()},
    )
    return script, files, hook
