"""`stage` on a Linux guest: install.sh, its unit and the unit's enabling link, written through the ext4 writer.

The text comes from ``stage/linux_script.py``; this module decides what to write in one edit
session (``vhdtool.editor``), so a change is all there or not at all:
 - ``/var/lib/vhdtool/<id>/install.sh``, 0755, root's;
 - ``/etc/systemd/system/vhdtool-<id>.service``, 0644, root's;
 - the link ``/etc/systemd/system/multi-user.target.wants/vhdtool-<id>.service`` to the unit, absolute
   and root's, as ``systemctl enable`` makes it; folders made as needed (0755, root's).

The id is the first package's name (``linux_script.install_id``): like the Windows id (the cab's
version and architecture), it is a function of what is installed, so staging the same plan again
finds the same files and link, and the edit session drops every operation (the image file's
bytes stay the same). A staging of that id that finished (result.txt: installed, or failed after
its last attempt) is started afresh: its result.txt and attempts.txt are removed (install.log is
kept and appended to), so that install.sh runs its three attempts again. Another staging of ours
still enabled (its link in multi-user.target.wants, no result.txt) is refused (exit 20): two
package installs would run at the same boot.
"""

from __future__ import annotations

import hashlib

from vhdtool.errors import SetupPending, UnsupportedLayout
from vhdtool.plan.decide import Plan
from vhdtool.stage.linux_script import (
    ID_PATTERN,
    STAGING_ROOT,
    UNIT_DIR,
    WANTED_BY,
    LinuxStagedScript,
    install_id,
    render_script,
    render_unit,
)
from vhdtool.stage.status import FINISHED_FILES

SCRIPT_MODE, UNIT_MODE = 0o755, 0o644


def linux_script(plan: Plan) -> LinuxStagedScript:
    """What the plan stages: the strict patterns of ``LinuxStagedScript`` are checked here."""
    return LinuxStagedScript(id=install_id(plan.packages), package_manager=plan.package_manager,
                             packages=tuple(plan.packages), units=tuple(plan.units))


def stage_linux(ed, image: str, plan: Plan) -> tuple[LinuxStagedScript, tuple[dict, ...], dict]:
    """Queue the staging in edit session ``ed``; (the script, the files written, the boot hook)."""
    script = linux_script(plan)
    _refuse_another_enabled(ed, image, script)
    _refuse_separate_mounts(ed, image, script)
    text, unit = render_script(script), render_unit(script)
    ed.mkdir(script.folder)
    ed.write_file(script.script_path, text, mode=SCRIPT_MODE, uid=0, gid=0)
    if ed.entry(f"{script.folder}/result.txt") is not None:  # its name is enough (the content is the guest's)
        for name in FINISHED_FILES:  # a finished run of this id: the next boot starts from attempt 1
            ed.unlink(f"{script.folder}/{name}")
    ed.mkdir(UNIT_DIR)
    ed.write_file(script.unit_path, unit, mode=UNIT_MODE, uid=0, gid=0)
    ed.mkdir(f"{UNIT_DIR}/{WANTED_BY}.wants")
    ed.symlink(script.wants_link, script.unit_path)
    files = tuple({"path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "mode": f"{mode:04o}"}
                  for path, data, mode in ((script.script_path, text, SCRIPT_MODE),
                                           (script.unit_path, unit, UNIT_MODE)))
    hook = {"kind": "systemd-unit", "command": f"/bin/sh {script.script_path}", "unit": script.unit_name,
            "link": script.wants_link, "target": script.unit_path}
    return script, files, hook


def _refuse_separate_mounts(ed, image: str, script: LinuxStagedScript) -> None:
    """vhdtool writes the root volume: a folder the guest mounts from another filesystem (a separate /var) would
    hide install.sh (or the unit) from its boot, and the unit would fail at every boot."""
    from vhdtool.guest.linux import fstab_mount_over

    for path in (script.folder, UNIT_DIR):
        found = fstab_mount_over(ed.ext_filesystem(), path)
        if found is not None:
            raise UnsupportedLayout(image, f"the guest mounts {found[0]} from {found[1]} (/etc/fstab): its boot would "
                                           f"not see {path} where vhdtool writes it, on the root volume",
                                    f"install {' '.join(script.packages)} from inside the guest")


def _refuse_another_enabled(ed, image: str, script: LinuxStagedScript) -> None:
    for name in ed.listdir(STAGING_ROOT):
        if name == script.id or not ID_PATTERN.fullmatch(name):
            continue
        other = LinuxStagedScript(name, script.package_manager, script.packages, ())
        if ed.entry(other.wants_link) is not None and ed.entry(f"{other.folder}/result.txt") is None:
            raise SetupPending(image, f"another vhdtool staging ({name}) is enabled to install at next boot",
                               f"boot the guest once so that it runs, or remove {other.wants_link} in the guest")
