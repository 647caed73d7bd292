"""systemd unit files and udev rules as text: the [Install] section, ExecStart, SYSTEMD_WANTS.

Pure parsing, no filesystem. The syntax followed is systemd.syntax(7) and systemd.unit(5),
"[Install] Section Options": comment lines start with '#' or ';'; a line ending in a
backslash continues on the next (the backslash becomes a space, and comment lines between
continued lines are skipped); list settings take several whitespace-separated, optionally
quoted, words per line and may be repeated; an empty assignment (``WantedBy=``) empties the
list so far. Unit names are checked as systemd.unit(5) "Description" states them (at most
255 characters of ASCII letters, digits, ':', '-', '_', '.', '\\' and one '@', ending in a
known type suffix), so that a hostile WantedBy= can never name a path.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

INSTALL_LISTS = ("WantedBy", "RequiredBy", "UpheldBy", "Alias", "Also")
UNIT_SUFFIXES = ("service", "socket", "device", "mount", "automount", "swap", "target", "path", "timer",
                 "slice", "scope")
UNIT_NAME = re.compile(r"^[A-Za-z0-9:_.\\-]+(@[A-Za-z0-9:_.\\-]*)?\.(%s)$" % "|".join(UNIT_SUFFIXES))
MAX_UNIT_NAME = 255
# udev(7): "SYSTEMD_WANTS" is read by systemd from a device tagged "systemd"; values are unit names.
SYSTEMD_WANTS = re.compile(r'ENV\{SYSTEMD_WANTS\}\s*(\+=|:=|=)\s*"([^"]*)"')


@dataclass(frozen=True)
class InstallSection:
    """What ``systemctl enable`` reads from a unit: the lists of systemd.unit(5) "[Install] Section"."""

    wanted_by: tuple[str, ...] = ()
    required_by: tuple[str, ...] = ()
    upheld_by: tuple[str, ...] = ()
    alias: tuple[str, ...] = ()
    also: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()  # values that are not valid unit names, skipped as systemd skips them

    @property
    def has_rules(self) -> bool:
        """What systemd calls "installation config" other than Also= (install.c has_rules)."""
        return bool(self.wanted_by or self.required_by or self.upheld_by or self.alias)


def is_unit_name(name: str) -> bool:
    return len(name) <= MAX_UNIT_NAME and UNIT_NAME.match(name) is not None and ".." not in name


def logical_lines(text: str) -> list[tuple[str, str]]:
    """(section, "Key=value" line) pairs, continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    section = ""
    pending: str | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith(("#", ";")):
            continue  # a comment, also between continued lines
        if pending is not None:
            line = pending + " " + line
            pending = None
        elif not line:
            continue
        if line.endswith("\\"):
            pending = line[:-1].rstrip()
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        out.append((section, line))
    if pending:
        out.append((section, pending))
    return out


def _words(value: str) -> list[str] | None:
    try:
        return shlex.split(value, comments=False, posix=True)
    except ValueError:  # an unbalanced quote: systemd rejects the whole assignment
        return None


def expand_specifiers(value: str, unit: str) -> str | None:
    """The specifiers of systemd.unit(5) "Specifiers" a non-template unit's [Install] can use; None for others."""
    prefix = unit.rsplit(".", 1)[0]
    table = {"n": unit, "N": prefix, "p": prefix.split("@", 1)[0], "%": "%"}
    out = []
    i = 0
    while i < len(value):
        c = value[i]
        if c != "%":
            out.append(c)
            i += 1
            continue
        if i + 1 >= len(value) or value[i + 1] not in table:
            return None
        out.append(table[value[i + 1]])
        i += 2
    return "".join(out)


def parse_install(text: str, unit: str) -> InstallSection:
    """The [Install] section of unit file ``text`` of the unit named ``unit``."""
    lists: dict[str, list[str]] = {k: [] for k in INSTALL_LISTS}
    ignored: list[str] = []
    for section, line in logical_lines(text):
        if section != "Install" or "=" not in line:
            continue
        key, value = (x.strip() for x in line.split("=", 1))
        if key not in lists:
            continue
        if not value:
            lists[key] = []  # an empty assignment resets the list
            continue
        for word in _words(value) or []:
            name = expand_specifiers(word, unit)
            if name is None or not is_unit_name(name):
                ignored.append(f"{key}={word}")
            elif name not in lists[key]:
                lists[key].append(name)
    return InstallSection(
        wanted_by=tuple(lists["WantedBy"]), required_by=tuple(lists["RequiredBy"]),
        upheld_by=tuple(lists["UpheldBy"]), alias=tuple(lists["Alias"]), also=tuple(lists["Also"]),
        ignored=tuple(ignored),
    )


def exec_start_binary(text: str) -> str | None:
    """The program of the first ExecStart= of the [Service] section, its prefixes ('@-:+!') removed."""
    for section, line in logical_lines(text):
        if section != "Service" or "=" not in line:
            continue
        key, value = (x.strip() for x in line.split("=", 1))
        if key != "ExecStart" or not value:
            continue
        words = _words(value)
        if not words:
            return None
        program = words[0].lstrip("@-:+!")
        return program or None
    return None


def udev_wanted_units(text: str) -> tuple[str, ...]:
    """The units a udev rules file asks systemd to start through ENV{SYSTEMD_WANTS} (udev(7))."""
    units: list[str] = []
    joined = re.sub(r"\\\n", " ", text)
    for line in joined.splitlines():
        if line.lstrip().startswith("#"):
            continue
        for _op, value in SYSTEMD_WANTS.findall(line):
            units.extend(u for u in value.split() if is_unit_name(u) and u not in units)
    return tuple(units)
