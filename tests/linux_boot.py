"""Simulated boots of a staged Linux install.sh, for tests/test_linux_stage_script.py.

No Linux guest boots here. A guest root is a small tree made in a temporary folder, with what
the stage would write into it (install.sh, the unit, the wants link) and:

- a static busybox (Debian's busybox-static, /bin/busybox) as /bin/busybox, with a link for each
  of its applets in /bin: /bin/sh is busybox's ash, so the script runs under a shell that is
  neither bash nor the host's dash;
- stubs for apt-get, dnf, yum and systemctl in /usr/bin (busybox has none of them): small sh
  scripts that record their arguments and DEBIAN_FRONTEND, one call a line, fields separated by
  tabs, in /stub/calls, and exit with the code a test wrote in /stub/rc/<program>-<verb> (0 when
  there is none), the verb being the first of install, update, enable, disable in the arguments;
- /dev/null, made with mknod, because the script reads and writes it.

A boot is modelled as systemd runs the unit: only while the link in multi-user.target.wants
exists, and then the unit file's ExecStart (read from the file the link points to, inside the
tree), run with ``chroot ROOT`` and the environment systemd gives a service (PATH, LANG only).
This needs root and a filesystem that allows device nodes: ``make_guest`` raises ``Unavailable``
(the tests skip) when either is missing. ``add_simulation`` adds the same to a real guest's tree
extracted from an image (tests/test_linux_stage.py), and says which paths are its own. A stub
package manager whose install succeeds copies /stub/payload (if a test made one) into the tree, as
the package would unpack.
"""

from __future__ import annotations

import configparser
import os
import shlex
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from vhdtool.stage.linux_script import LinuxStagedScript, render_script, render_unit

BUSYBOX = Path("/bin/busybox")
STUBBED = ("apt-get", "dnf", "yum", "systemctl")
SERVICE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin", "LANG": "C"}
STUB = """#!/bin/sh
name=${0##*/}
verb=none
for a in "$@"; do
    case "$a" in install|update|enable|disable) verb=$a; break ;; esac
done
{ printf '%s' "$name"; printf '\\t%s' "$@"; printf '\\tDEBIAN_FRONTEND=%s\\n' "${DEBIAN_FRONTEND-}"; } >> /stub/calls
rc=0
if [ -f "/stub/rc/$name-$verb" ]; then read -r rc < "/stub/rc/$name-$verb"; fi
echo "stub $name $verb: exit $rc"
# A successful install unpacks the package: whatever a test put in /stub/payload.
if [ "$verb" = install ] && [ "$rc" = 0 ] && [ -d /stub/payload ]; then cp -a /stub/payload/. /; fi
exit "$rc"
"""


class Unavailable(Exception):
    """The simulation cannot run on this machine (why is the message)."""


@dataclass(frozen=True)
class Call:
    program: str
    args: tuple[str, ...]
    debian_frontend: str


@dataclass
class LinuxGuest:
    root: Path
    script: LinuxStagedScript

    def path(self, guest_path: str) -> Path:
        return self.root / guest_path.lstrip("/")

    @property
    def folder(self) -> Path:
        return self.path(self.script.folder)

    @property
    def wants_link(self) -> Path:
        return self.path(self.script.wants_link)

    def file(self, name: str) -> bytes | None:
        """The content of a file in the staging folder, or None."""
        p = self.folder / name
        return p.read_bytes() if p.exists() else None

    def calls(self) -> list[Call]:
        p = self.root / "stub/calls"
        out = []
        for line in p.read_text().splitlines() if p.exists() else ():
            fields = line.split("\t")
            out.append(Call(fields[0], tuple(fields[1:-1]), fields[-1].removeprefix("DEBIAN_FRONTEND=")))
        return out

    def remove_stub(self, program: str) -> None:
        self.path(f"/usr/bin/{program}").unlink()

    def exec_start(self) -> list[str]:
        """The unit's ExecStart, read from the file its wants link points to (inside the tree)."""
        target = os.readlink(self.wants_link)
        unit = configparser.ConfigParser(interpolation=None, strict=True)
        unit.optionxform = str
        unit.read_string(self.path(target).read_text())
        return shlex.split(unit["Service"]["ExecStart"])

    def boot(self, rc: dict[str, int] | None = None, timeout: float = 60) -> subprocess.CompletedProcess | None:
        """One boot: the unit runs if it is enabled. ``rc``: {"apt-get-install": 100, ...} for the stubs.

        Returns the finished run, or None when the unit was not enabled (nothing ran).
        """
        rcdir = self.root / "stub/rc"
        shutil.rmtree(rcdir, ignore_errors=True)
        rcdir.mkdir(parents=True)
        for key, code in (rc or {}).items():
            (rcdir / key).write_text(f"{code}\n")
        if not os.path.lexists(self.wants_link):
            return None
        return subprocess.run(["chroot", str(self.root), *self.exec_start()], env=SERVICE_ENV,
                              capture_output=True, text=True, timeout=timeout)


def _write(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    path.chmod(mode)


def _inside(root: Path, path: Path) -> Path:
    """``path``, refused when a link in a guest tree would take a write out of it (onto the host)."""
    real, top = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([real, top]) != top:
        raise ValueError(f"{path} leads out of the guest tree {root} (to {real})")
    return path


def add_simulation(root: Path) -> set[str]:
    """Busybox, the stubs, /dev/null and /stub added to the guest tree at ``root`` (which may be a real
    guest's tree, extracted from an image: names it has are kept). Returns the guest paths added, which
    are the simulation's and not the guest's."""
    if os.geteuid() != 0:
        raise Unavailable("chroot needs root")
    if not BUSYBOX.is_file():
        raise Unavailable(f"{BUSYBOX} is missing (apt-get install busybox-static)")
    applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, check=True).stdout.split()
    added: set[str] = set()
    for d in ("bin", "usr/bin", "usr/sbin", "sbin", "etc", "tmp", "dev", "stub", "var/lib"):
        if not os.path.lexists(root / d):
            added.add("/" + d)
        _inside(root, root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, _inside(root, root / "bin/busybox"))
    added.add("/bin/busybox")
    for applet in applets:
        if applet != "busybox" and applet not in STUBBED and not os.path.lexists(root / "bin" / applet):
            os.symlink("busybox", root / "bin" / applet)
            added.add(f"/bin/{applet}")
    for program in STUBBED:
        _write(_inside(root, root / "usr/bin" / program), STUB, 0o755)
        added.add(f"/usr/bin/{program}")
    try:
        if not os.path.lexists(root / "dev/null"):
            os.mknod(_inside(root, root / "dev/null"), 0o666 | stat.S_IFCHR, os.makedev(1, 3))
            added.add("/dev/null")
        with open(root / "dev/null", "wb") as f:
            f.write(b"x")
    except OSError as e:
        raise Unavailable(f"cannot make /dev/null in {root}: {e}") from None
    probe = subprocess.run(["chroot", str(root), "/bin/sh", "-c", "echo ok"], env=SERVICE_ENV,
                           capture_output=True, text=True)
    if probe.stdout.strip() != "ok":
        raise Unavailable(f"chroot into {root} failed: {probe.stderr.strip()}")
    return added


def make_guest(root: Path, script: LinuxStagedScript) -> LinuxGuest:
    """A guest tree at ``root`` with ``script`` staged as the stage writes it, enabled for next boot."""
    for d in ("bin", "usr/bin", "usr/sbin", "sbin", "etc", "tmp", "dev", "stub", "var/lib"):
        (root / d).mkdir(parents=True, exist_ok=True)
    guest = LinuxGuest(root, script)
    # What the stage writes.
    _write(guest.folder / "install.sh", render_script(script), 0o755)
    _write(guest.path(script.unit_path), render_unit(script))
    guest.wants_link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(script.unit_path, guest.wants_link)
    add_simulation(root)
    return guest
