"""systemd offline: where a unit's file is, whether it starts at boot, and what enable/disable would link.

Read-only and pure over a ``Filesystem`` view of the guest's root; every symlink is resolved
inside the guest (an absolute target such as /lib/systemd/system/x.service names the guest's
file, never the host's). The rules are systemd's, as systemd.unit(5), systemctl(1) and
src/shared/install.c (v252) state them, and as ``systemctl --root=DIR`` (systemd 252) judges
them on the same trees in tests/test_linux_units.py:

- **Search path** (systemd.unit(5) "System Unit Search Path"): /etc/systemd/system,
  /run/systemd/system, /usr/local/lib/systemd/system, /usr/lib/systemd/system, and
  /lib/systemd/system on builds with a split /usr. /run is a tmpfs, normally empty in a
  stopped guest's disk; generator and transient folders only exist at run time and are not
  searched. The first folder that holds the name wins. With merged /usr, /lib is a symlink (relative or
  absolute) to usr/lib and both names reach the same file.
- **Masked** (install.c unit_file_load, unit_file_load_or_readlink): the file found first is
  a symlink to /dev/null (it need not exist in the guest) or to an empty file, or is itself
  an empty file.
- **Enabled** (install.c find_symlinks_in_scope, with the unit's own name): a symlink named
  after the unit in a ``*.wants/``, ``*.requires/`` or ``*.upholds/`` folder of
  /etc/systemd/system, whatever it points to; or a symlink /etc/systemd/system/<alias> for an
  alias the unit's [Install] Alias= names. Links in the vendor folders (/usr/lib/...) are the
  distribution's static wiring and do not make a unit "enabled".
- **Indirect**: not enabled, but a symlink at the top of /etc/systemd/system with another name
  points at the unit file, or the unit has no [Install] rules other than Also=.
- **Disabled** / **static**: the unit has [Install] rules (WantedBy=, RequiredBy=, UpheldBy=,
  Alias=), or has none at all.

``systemctl enable`` creates, for each WantedBy=T, /etc/systemd/system/T.wants/<unit>; for
RequiredBy= and UpheldBy= the same in .requires/ and .upholds/; for each Alias=A,
/etc/systemd/system/A; each an absolute link to the unit file; then the same for each Also=
unit. A link of the unit's name already in a .wants/.requires folder but pointing elsewhere is
replaced; anything else in the way of a link is a refusal (systemctl 252 does the same). The target here is the unit file's path with its folders resolved in the guest
(/usr/lib/systemd/system/x.service on merged /usr): the guest's systemd finds the same file
through it whichever search order it was built with. ``systemctl disable`` removes every
symlink under /etc/systemd/system named after the unit (or an Also= unit) or pointing at it
(even a /dev/null one in a .wants folder, as systemctl 252 does), then each folder it emptied;
``enable`` first makes the folders it needs (0755).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from vhdtool.filesystem.base import Filesystem
from vhdtool.guest.unitfile import InstallSection, parse_install, udev_wanted_units
from vhdtool.units import MiB

CONFIG_DIR = "/etc/systemd/system"
UNIT_DIRS = (CONFIG_DIR, "/run/systemd/system", "/usr/local/lib/systemd/system", "/usr/lib/systemd/system",
             "/lib/systemd/system")
# udev(7) "Rules Files": a file in /etc overrides one of the same name in /run or the
# vendor folders; a rules file that is empty or a link to /dev/null disables the vendor one.
UDEV_RULE_DIRS = ("/etc/udev/rules.d", "/run/udev/rules.d", "/usr/local/lib/udev/rules.d", "/usr/lib/udev/rules.d",
                  "/lib/udev/rules.d")
DEPENDENCY_DIRS = (".wants", ".requires", ".upholds")
DEV_NULL = "/dev/null"
MAX_UNIT_FILE = 1 * MiB
MAX_RULES_FILE = 1 * MiB
MAX_RULES_BYTES = 16 * MiB  # all rules files together; real ones are a few KiB each
MAX_DIR_ENTRIES = 8192  # a hostile folder may list any number of names; the rest are not looked at
MAX_CONFIG_LINKS = 65536  # links looked at under /etc/systemd/system by disable
MAX_RULES_FILES = 1024
MAX_ALSO = 32


@dataclass(frozen=True)
class UnitFile:
    """A unit as systemd's search finds it in the guest."""

    name: str
    path: str  # where the search found it, e.g. /lib/systemd/system/x.service
    target: str  # the path an enable link points to: ``path`` with its folders resolved in the guest
    masked: bool
    install: InstallSection
    text: str


@dataclass(frozen=True)
class LinkChange:
    path: str
    action: str  # "create" or "delete" (a link), "mkdir" or "rmdir" (its folder, mode 0755)
    target: str | None  # what the link points (or pointed) to; None for a folder

    def to_dict(self) -> dict:
        return {"path": self.path, "action": self.action, "target": self.target}


@dataclass(frozen=True)
class LinkPlan:
    """What ``systemctl enable|disable UNIT`` would change, or why it must not be done."""

    unit: str
    action: str  # "enable" or "disable"
    changes: tuple[LinkChange, ...] = ()
    refusal: str | None = None
    hint: str | None = None
    notes: tuple[str, ...] = ()


def _entry_exists(fs: Filesystem, path: str) -> bool:
    return fs.readlink(path) is not None or fs.exists(path)


def _destination(link_path: str, stored: str) -> str:
    """The guest path a symlink's stored target names (relative targets are relative to the link's folder)."""
    if stored.startswith("/"):
        return posixpath.normpath(stored)
    return posixpath.normpath(posixpath.join(posixpath.dirname(link_path), stored))


def _is_null_or_empty(fs: Filesystem, path: str) -> bool:
    """systemd's null_or_empty_path_with_root: /dev/null by name, or an empty regular file."""
    stored = fs.readlink(path)
    if stored is not None and _destination(path, stored) == DEV_NULL:
        return True
    resolved = fs.resolve(path)
    if resolved == DEV_NULL:
        return True
    return resolved is not None and not fs.is_dir(resolved) and fs.size(resolved) == 0


def _listdir(fs: Filesystem, path: str) -> list[str]:
    return fs.listdir(path)[:MAX_DIR_ENTRIES] if fs.is_dir(path) else []


def find_unit(fs: Filesystem, name: str) -> UnitFile | None:
    """The unit file systemd would load for ``name``, or None when no folder of the search path has it."""
    for folder in UNIT_DIRS:
        path = f"{folder}/{name}"
        if not _entry_exists(fs, path):
            continue
        if _is_null_or_empty(fs, path):
            return UnitFile(name, path, path, True, InstallSection(), "")
        if fs.resolve(path) is None or fs.is_dir(path):
            continue  # a dangling link: systemd goes on to the next folder
        text = fs.read(path, MAX_UNIT_FILE).decode("utf-8", "replace")
        target = f"{fs.resolve(folder) or folder}/{name}"
        return UnitFile(name, path, target, False, parse_install(text, name), text)
    return None


def _points_at(fs: Filesystem, link_path: str, unit: UnitFile) -> bool:
    stored = fs.readlink(link_path)
    if stored is None:
        return False
    destination = _destination(link_path, stored)
    if posixpath.basename(destination) == unit.name:
        return True
    resolved = fs.resolve(link_path)
    return resolved is not None and resolved == fs.resolve(unit.path)


def is_enabled(fs: Filesystem, unit: UnitFile) -> bool:
    """Whether a link in /etc/systemd/system makes systemd start ``unit`` (see the module's rules)."""
    for entry in _listdir(fs, CONFIG_DIR):
        if entry.endswith(DEPENDENCY_DIRS) and fs.readlink(f"{CONFIG_DIR}/{entry}/{unit.name}") is not None:
            return True
    return any(_points_at(fs, f"{CONFIG_DIR}/{alias}", unit) for alias in unit.install.alias)


def _aliased_elsewhere(fs: Filesystem, unit: UnitFile) -> bool:
    for entry in _listdir(fs, CONFIG_DIR):
        if entry != unit.name and _points_at(fs, f"{CONFIG_DIR}/{entry}", unit):
            return True
    return False


def udev_started_units(fs: Filesystem) -> dict[str, str]:
    """{unit name: rules file} for every unit a udev rule starts through SYSTEMD_WANTS."""
    rules: dict[str, str] = {}
    for folder in UDEV_RULE_DIRS:
        for name in _listdir(fs, folder):
            if name.endswith(".rules") and name not in rules:
                rules[name] = f"{folder}/{name}"
    started: dict[str, str] = {}
    budget = MAX_RULES_BYTES
    for name in sorted(rules)[:MAX_RULES_FILES]:
        path = rules[name]
        if budget <= 0 or fs.resolve(path) is None or fs.is_dir(path) or _is_null_or_empty(fs, path):
            continue
        data = fs.read(path, min(MAX_RULES_FILE, budget))
        budget -= len(data)
        text = data.decode("utf-8", "replace")
        for unit in udev_wanted_units(text):
            started.setdefault(unit, path)
    return started


def unit_state(fs: Filesystem, unit: UnitFile | None, udev: dict[str, str]) -> str:
    """not-installed, masked, enabled, udev, indirect, disabled or static."""
    if unit is None:
        return "not-installed"
    if unit.masked:
        return "masked"
    if is_enabled(fs, unit):
        return "enabled"
    if unit.name in udev:
        return "udev"
    if _aliased_elsewhere(fs, unit):
        return "indirect"
    if unit.install.has_rules:
        return "disabled"
    return "indirect" if unit.install.also else "static"


def _closure(fs: Filesystem, unit: UnitFile) -> tuple[list[UnitFile], str | None]:
    """The unit and, transitively, its Also= units; or the name of one that is missing or masked."""
    out, queue, seen = [], [unit], {unit.name}
    while queue:
        u = queue.pop(0)
        out.append(u)
        for name in u.install.also:
            if name in seen or len(seen) >= MAX_ALSO:
                continue
            seen.add(name)
            also = find_unit(fs, name)
            if also is None or also.masked:
                return out, name
            queue.append(also)
    return out, None


def _wanted_links(u: UnitFile) -> list[str]:
    links = [f"{CONFIG_DIR}/{t}.wants/{u.name}" for t in u.install.wanted_by]
    links += [f"{CONFIG_DIR}/{t}.requires/{u.name}" for t in u.install.required_by]
    links += [f"{CONFIG_DIR}/{t}.upholds/{u.name}" for t in u.install.upheld_by]
    suffix = u.name.rsplit(".", 1)[-1]
    links += [f"{CONFIG_DIR}/{a}" for a in u.install.alias if a != u.name and a.endswith("." + suffix)]
    return links


def _refuse_unusable(fs: Filesystem, name: str, unit: UnitFile | None, action: str) -> LinkPlan | None:
    if unit is None:
        return LinkPlan(name, action, refusal=f"the guest has no unit file {name} in {', '.join(UNIT_DIRS)}",
                        hint="install the distribution's Hyper-V daemons package first")
    if unit.masked:
        return LinkPlan(name, action, refusal=f"{name} is masked ({unit.path})",
                        hint=f"unmask it first (systemctl unmask {name}, or remove {unit.path})")
    return None


def enable_plan(fs: Filesystem, name: str, udev: dict[str, str] | None = None) -> LinkPlan:
    """The links ``systemctl enable NAME`` would create that do not exist yet (none when enabled already)."""
    unit = find_unit(fs, name)
    refused = _refuse_unusable(fs, name, unit, "enable")
    if refused:
        return refused
    udev = udev_started_units(fs) if udev is None else udev
    if name in udev and not unit.install.has_rules:
        return LinkPlan(name, "enable", notes=(f"udev starts {name} ({udev[name]}): nothing to enable",))
    units, missing = _closure(fs, unit)
    if missing:
        return LinkPlan(name, "enable", refusal=f"{name} names Also={missing}, which is missing or masked",
                        hint=f"install or unmask {missing}, or enable the units one by one")
    changes: list[LinkChange] = []
    notes = [f"{name}: ignored [Install] value {v}" for v in unit.install.ignored]
    for u in units:
        for link in _wanted_links(u):
            stored = fs.readlink(link)
            if stored is not None and fs.resolve(link) == fs.resolve(u.path):
                continue  # already there: enabling again changes nothing
            if stored is not None and posixpath.dirname(link) != CONFIG_DIR:
                # systemctl 252 replaces another link of the unit's name in a .wants/.requires folder
                changes.append(LinkChange(link, "delete", stored))
            elif _entry_exists(fs, link):
                what = f"a link to {stored}" if stored is not None else "not a link"
                return LinkPlan(name, "enable", refusal=f"{link} exists and is {what}",
                                hint="remove it, or run systemctl enable --force in the guest")
            blocked = _make_parents(fs, posixpath.dirname(link), changes)
            if blocked:
                return LinkPlan(name, "enable", refusal=f"{blocked} exists and is not a folder",
                                hint="remove it, or run systemctl enable --force in the guest")
            changes.append(LinkChange(link, "create", u.target))
    if not any(u.install.has_rules for u in units):
        notes.append(f"{name} has no [Install] rules (static): nothing to enable")
    return LinkPlan(name, "enable", tuple(changes), notes=tuple(notes))


def _make_parents(fs: Filesystem, folder: str, changes: list[LinkChange]) -> str | None:
    """Queue a mkdir for each missing folder down to ``folder`` (systemctl makes them, 0755); or the path
    that is in the way."""
    missing: list[str] = []
    while folder != "/" and not fs.is_dir(folder):
        if _entry_exists(fs, folder):
            return folder
        missing.append(folder)
        folder = posixpath.dirname(folder)
    queued = {c.path for c in changes}
    changes.extend(LinkChange(f, "mkdir", None) for f in reversed(missing) if f not in queued)
    return None


def disable_plan(fs: Filesystem, name: str, udev: dict[str, str] | None = None) -> LinkPlan:
    """The links ``systemctl disable NAME`` would remove (none when it is disabled already)."""
    unit = find_unit(fs, name)
    refused = _refuse_unusable(fs, name, unit, "disable")
    if refused:
        return refused
    udev = udev_started_units(fs) if udev is None else udev
    if name in udev:
        return LinkPlan(name, "disable", refusal=f"udev starts {name} ({udev[name]}), not a link",
                        hint=f"mask it to keep it from starting (systemctl mask {name})")
    units, _ = _closure(fs, unit)
    names = {u.name for u in units}
    files = {fs.resolve(u.path) for u in units}
    changes = []
    for path in _config_links(fs):
        stored = fs.readlink(path)
        destination = _destination(path, stored)
        own_name = posixpath.basename(path)
        if posixpath.dirname(path) == CONFIG_DIR and (destination == DEV_NULL or own_name in names):
            continue  # a mask, or a unit file linked into /etc: neither is an enablement
        if own_name in names or posixpath.basename(destination) in names or fs.resolve(path) in files:
            changes.append(LinkChange(path, "delete", stored))
    # systemctl disable removes a folder it emptied (never one that was empty before, nor /etc/systemd/system).
    emptied = {posixpath.dirname(c.path) for c in changes} - {CONFIG_DIR}
    deleted = {c.path for c in changes}
    for folder in sorted(emptied):
        if fs.readlink(folder) is None and all(f"{folder}/{e}" in deleted for e in fs.listdir(folder)):
            changes.append(LinkChange(folder, "rmdir", None))
    return LinkPlan(name, "disable", tuple(changes))


def _config_links(fs: Filesystem) -> list[str]:
    """Every symlink at the top of /etc/systemd/system and one folder down (where enable puts them), in a
    ``.wants``/``.requires``/``.upholds`` folder that is itself a link to a folder too (the guest's systemd follows
    it, as is_enabled does), unless it leads to a folder listed already under its own name."""
    out: list[str] = []
    folders: list[str] = []
    for entry in _listdir(fs, CONFIG_DIR):
        path = f"{CONFIG_DIR}/{entry}"
        if fs.readlink(path) is not None and not (entry.endswith(DEPENDENCY_DIRS) and fs.is_dir(path)):
            out.append(path)
        elif fs.is_dir(path):
            folders.append(path)
    seen: set[str | None] = set()
    for path in sorted(folders, key=lambda f: fs.readlink(f) is not None):  # real folders first
        if fs.resolve(path) in seen or len(out) >= MAX_CONFIG_LINKS:
            continue
        seen.add(fs.resolve(path))
        out.extend(f"{path}/{e}" for e in _listdir(fs, path)[:MAX_CONFIG_LINKS - len(out)]
                   if fs.readlink(f"{path}/{e}") is not None)
    return sorted(out[:MAX_CONFIG_LINKS])
