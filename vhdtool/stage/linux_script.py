"""The boot-time installer of a Linux guest: install.sh and the systemd unit that runs it.

Pure text, the Linux counterpart of ``stage/script.py``: what is written into the guest,
nothing read from it. Every value that reaches the script or the unit (the id, the package
names, the unit names) must match a strict pattern first, so nothing from an image or a
command line can become shell or unit-file syntax; in the script each one is also quoted.
The script is POSIX sh, run by whatever /bin/sh the guest has (dash, bash, busybox ash).

What the stage writes (``LinuxStagedScript`` names the paths):
 - ``/var/lib/vhdtool/<id>/install.sh``;
 - ``/etc/systemd/system/vhdtool-<id>.service`` (Type=oneshot, after network-online.target);
 - the link ``/etc/systemd/system/multi-user.target.wants/vhdtool-<id>.service`` to the unit,
   absolute, as ``systemctl enable`` makes it. That link is the whole boot hook: the unit runs
   the script once per boot while the link exists.

At boot, as root, install.sh:
 - counts its attempts in attempts.txt and gives up after MAX_ATTEMPTS (one per boot);
 - runs the package manager non-interactively (apt-get: DEBIAN_FRONTEND=noninteractive,
   update then install -y --no-install-recommends, old config files kept; dnf or yum: -y install),
   logging to install.log beside itself;
 - on success, or after the last failed attempt, writes result.txt (exit_code, attempts,
   finished: the keys of the Windows result.txt, read by ``stage/status.py``) through a
   temporary name, then removes its own wants link, so it never runs again whether or not
   systemctl works; then, on success only, enables the daemons' units one by one
   (``systemctl enable UNIT``; a unit that fails is logged, not fatal);
 - does nothing but remove the link once result.txt exists (a run after a finished one, when
   power was lost between the two);
 - exits 0 in every case: the outcome is in result.txt, and a failed unit would only add noise.
A failed attempt leaves the link, so the unit runs the script again at the next boot.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vhdtool.plan.packages import PACKAGE_PATTERN
from vhdtool.stage.script import MAX_ATTEMPTS, UnsafeScriptValue

SUCCESS_CODES = (0,)
# A unit name may hold [A-Za-z0-9:_.-] (systemd.unit(5)) and no "+"; "%" would be a specifier.
ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9.-]{0,63}")
UNIT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9:_.@-]{0,200}\.service")
COMMANDS = {"apt": "apt-get", "dnf": "dnf", "yum": "yum"}  # the package manager's command
PACKAGE_MANAGERS = tuple(COMMANDS)
STAGING_ROOT = "/var/lib/vhdtool"
UNIT_DIR = "/etc/systemd/system"
WANTED_BY = "multi-user.target"
START_TIMEOUT = "30min"  # a mirror that hangs must not hold the boot's multi-user.target forever
APT_OPTIONS = ("-o", "DPkg::Lock::Timeout=600", "-o", "Dpkg::Options::=--force-confdef",
               "-o", "Dpkg::Options::=--force-confold")


@dataclass(frozen=True)
class LinuxStagedScript:
    id: str  # "hyperv-daemons", "linux-cloud-tools-generic"
    package_manager: str  # "apt" | "dnf" | "yum"
    packages: tuple[str, ...]
    units: tuple[str, ...]  # enabled after a successful install

    def __post_init__(self) -> None:
        if not isinstance(self.packages, tuple) or not isinstance(self.units, tuple):
            raise UnsafeScriptValue("packages and units must be tuples")
        checks = [(self.id, ID_PATTERN, "id")]
        checks += [(p, PACKAGE_PATTERN, "package name") for p in self.packages]
        checks += [(u, UNIT_PATTERN, "unit name") for u in self.units]
        for value, pattern, what in checks:
            # fullmatch: "$" alone would let a trailing newline through
            if not isinstance(value, str) or not pattern.fullmatch(value):
                raise UnsafeScriptValue(f"{what} {value!r} does not match {pattern.pattern}")
        if self.package_manager not in PACKAGE_MANAGERS:
            raise UnsafeScriptValue(f"unknown package manager {self.package_manager!r}")
        if not self.packages:
            raise UnsafeScriptValue("no package to install")

    @property
    def folder(self) -> str:
        return f"{STAGING_ROOT}/{self.id}"

    @property
    def script_path(self) -> str:
        return f"{self.folder}/install.sh"

    @property
    def unit_name(self) -> str:
        return f"vhdtool-{self.id}.service"

    @property
    def unit_path(self) -> str:
        return f"{UNIT_DIR}/{self.unit_name}"

    @property
    def wants_link(self) -> str:
        """The link that enables the unit; its target is ``unit_path``."""
        return f"{UNIT_DIR}/{WANTED_BY}.wants/{self.unit_name}"


def install_id(packages: tuple[str, ...]) -> str:
    """The staging id: the first package's name (one staging per package set)."""
    value = packages[0] if packages else ""
    if not ID_PATTERN.fullmatch(value):
        raise UnsafeScriptValue(f"id {value!r} does not match {ID_PATTERN.pattern}")
    return value


def _q(value: str) -> str:
    """Single-quoted for sh. The patterns already keep quotes out; this keeps it true if one changes."""
    if "'" in value or "\n" in value:
        raise UnsafeScriptValue(f"{value!r} cannot be quoted")
    return f"'{value}'"


def _install_lines(s: LinuxStagedScript) -> list[str]:
    packages = " ".join(_q(p) for p in s.packages)
    if s.package_manager == "apt":
        options = " ".join(APT_OPTIONS)
        return [
            "    DEBIAN_FRONTEND=noninteractive",
            "    export DEBIAN_FRONTEND",
            f"    apt-get update {APT_OPTIONS[0]} {APT_OPTIONS[1]} &&",
            f"        apt-get install -y --no-install-recommends {options} {packages}",
        ]
    return [f"    {COMMANDS[s.package_manager]} -y install {packages}"]


def _preamble(s: LinuxStagedScript) -> list[str]:
    """The script's settings and functions; nothing runs yet."""
    return [
        "#!/bin/sh",
        f"# vhdtool: installs {' '.join(s.packages)} once, at boot, as root ({s.unit_name}). Generated; do not edit.",
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "export PATH",
        "umask 022",
        f"HERE={_q(s.folder)}",
        f"WANTS={_q(s.wants_link)}",
        'LOG="$HERE/install.log"',
        'RESULT="$HERE/result.txt"',
        'COUNT="$HERE/attempts.txt"',
        "",
        "now() {",
        "    date -u '+%Y-%m-%dT%H:%M:%SZ' 2>/dev/null || echo unknown",
        "}",
        "",
        "# The unit runs this script at every boot while its link exists: removing the link is what",
        "# stops it, with or without a working systemctl.",
        "disable_self() {",
        '    rm -f "$WANTS"',
        "    sync 2>/dev/null || :",
        "}",
        "",
        "write_result() {",
        "    {",
        '        echo "exit_code=$RC"',
        '        echo "attempts=$ATTEMPTS"',
        '        echo "finished=$(now)"',
        '    } > "$RESULT.tmp" && mv -f "$RESULT.tmp" "$RESULT"',
        "    sync 2>/dev/null || :",
        "}",
        "",
        "install_packages() {",
        *_install_lines(s),
        "}",
    ]


def render_script(s: LinuxStagedScript) -> bytes:
    """install.sh, LF line endings, ASCII."""
    what = " ".join(s.packages)
    units = " ".join(_q(u) for u in s.units)
    lines = [
        *_preamble(s),
        "",
        "# A result means an earlier run finished: only the link is left to remove (power lost before it was).",
        'if [ -e "$RESULT" ]; then',
        "    disable_self",
        "    exit 0",
        "fi",
        "ATTEMPTS=",
        'if [ -f "$COUNT" ]; then',
        '    read -r ATTEMPTS < "$COUNT" || :',
        "fi",
        "# Not a count this script wrote (a leading 0 would be octal to sh, 08 an error): give up rather than",
        "# run without end.",
        'case "$ATTEMPTS" in',
        "    '') ATTEMPTS=0 ;;",
        f"    *[!0-9]*|?????*|0?*) ATTEMPTS={MAX_ATTEMPTS} ;;",
        "esac",
        "ATTEMPTS=$((ATTEMPTS + 1))",
        'echo "$ATTEMPTS" > "$COUNT"',
        "sync 2>/dev/null || :",
        f'if [ "$ATTEMPTS" -gt {MAX_ATTEMPTS} ]; then',
        "    # The last attempt was cut short (power lost) before it wrote a result.",
        f"    ATTEMPTS={MAX_ATTEMPTS}",
        "    RC=-1",
        f'    echo "[$(now)] no attempt left after {MAX_ATTEMPTS}" >> "$LOG"',
        "    write_result",
        "    disable_self",
        "    exit 0",
        "fi",
        f'echo "[$(now)] attempt $ATTEMPTS of {MAX_ATTEMPTS}: {COMMANDS[s.package_manager]} install {what}" >> "$LOG"',
        'install_packages >> "$LOG" 2>&1 < /dev/null',
        "RC=$?",
        'echo "[$(now)] exit code $RC" >> "$LOG"',
        f'if [ "$RC" -ne 0 ] && [ "$ATTEMPTS" -lt {MAX_ATTEMPTS} ]; then',
        "    # Failed: the link stays, and the unit runs the script again at the next boot.",
        "    exit 0",
        "fi",
        "write_result",
        "disable_self",
    ]
    if s.units:
        lines += [
            'if [ "$RC" -eq 0 ]; then',
            "    if command -v systemctl > /dev/null 2>&1; then",
            f"        for unit in {units}; do",
            '            systemctl enable "$unit" >> "$LOG" 2>&1 ||',
            '                echo "[$(now)] could not enable $unit" >> "$LOG"',
            "        done",
            "    else",
            f'        echo "[$(now)] no systemctl: {" ".join(s.units)} not enabled" >> "$LOG"',
            "    fi",
            "fi",
        ]
    lines.append("exit 0")
    return ("\n".join(lines) + "\n").encode("ascii")


def render_unit(s: LinuxStagedScript) -> bytes:
    """The systemd unit that runs install.sh once per boot while it is enabled."""
    lines = [
        f"# vhdtool: installs {' '.join(s.packages)} at boot, at most {MAX_ATTEMPTS} times; "
        "install.sh removes this unit's link when done. Generated; do not edit.",
        "[Unit]",
        f"Description=vhdtool: install the Hyper-V daemons ({' '.join(s.packages)})",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=oneshot",
        f"ExecStart=/bin/sh {s.script_path}",
        f"TimeoutStartSec={START_TIMEOUT}",
        "",
        "[Install]",
        f"WantedBy={WANTED_BY}",
    ]
    return ("\n".join(lines) + "\n").encode("ascii")
