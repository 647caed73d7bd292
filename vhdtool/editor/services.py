"""The guest's integration services: listed, or their start type set offline, in one edit."""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable
from dataclasses import replace

from vhdtool.editor import ChangeSet, edit
from vhdtool.errors import UnsupportedLayout
from vhdtool.guest.inspection import require_guest
from vhdtool.guest.systemd import CONFIG_DIR, LinkChange, LinkPlan

MANUAL, DISABLED = 3, 4  # Start values: Windows ships the IC services as manual (triggered) start
SCHEMA = 1


def wanted_starts(enable: Iterable[str], disable: Iterable[str]) -> list[tuple[str, int]]:
    """(service name, Start value) for ``--enable`` (manual start, as Windows ships them) and ``--disable``."""
    return [(n, MANUAL) for n in enable] + [(n, DISABLED) for n in disable]


def list_services(image: str | os.PathLike) -> dict:
    """``{schema, image, services: [...]}``: a Windows guest's ``{name, start, start_value}``, a Linux
    guest's Hyper-V daemons as ``{name, daemon, unit, start}``."""
    from vhdtool.guest.discover import inspect

    inspection = inspect(image)
    require_guest(inspection)
    if inspection.guest.os == "linux" and inspection.guest.linux is not None:
        services = [s.to_dict() for s in inspection.guest.linux.services]
        return {"schema": SCHEMA, "image": os.fspath(image), "services": services}
    ic = _services_of(image, inspection)
    return {"schema": SCHEMA, "image": os.fspath(image), "services": [s.to_dict() for s in ic.services]}


def linux_link_plans(image: str | os.PathLike, wanted: Iterable[tuple[str, int]]) -> list[LinkPlan]:
    """What enabling (MANUAL) or disabling each (name, Start value) of ``wanted`` changes in a Linux guest's
    /etc/systemd/system, as ``systemctl enable|disable`` would: the links to create or delete, or the refusal.
    Read-only; the ext4 writer applies the changes."""
    from vhdtool.guest.discover import with_linux_root
    from vhdtool.guest.hvdaemons import link_plans
    from vhdtool.guest.linux import os_release

    def plan(fs):
        release = os_release(fs)
        return link_plans(fs, release.get("ID"), release.get("ID_LIKE"), [(n, s == MANUAL) for n, s in wanted])

    return with_linux_root(image, plan)


def set_services(image: str | os.PathLike, wanted: Iterable[tuple[str, int]], dry_run: bool = False,
                 output: str | os.PathLike | None = None) -> ChangeSet:
    """Set each (service name, Start value) of ``wanted`` in one commit: on Windows the Start value in the
    current control set; on Linux the daemon's systemd links, as ``systemctl enable|disable`` makes them."""
    wanted = list(dict.fromkeys(wanted))
    with edit(image, dry_run=dry_run, output=output) as ed:
        if ed.inspection.guest.os == "linux":
            notes = _set_linux_daemons(image, ed, wanted)
        else:
            _set_windows_services(image, ed, wanted)
            notes = ()
    return replace(ed.result, notes=notes)


def _set_windows_services(image, ed, wanted: list[tuple[str, int]]) -> None:
    from vhdtool.guest.hvdaemons import windows_name

    ic = _services_of(image, ed.inspection)
    known = {s.name.lower(): s.name for s in ic.services}
    control_set = ed.inspection.guest.windows.control_set
    for name, start in wanted:
        # A Linux daemon's name (kvp, hv_vss_daemon...) names the Windows service of the same integration service.
        found = known.get(name.lower()) or known.get((windows_name(name) or "").lower())
        if found is None:
            raise UnsupportedLayout(image, f"the guest has no integration service named {name}",
                                    f"use one of: {', '.join(sorted(known.values())) or 'none installed'}")
        ed.set_value("SYSTEM", f"ControlSet{control_set:03d}\\Services\\{found}", "Start", start, "REG_DWORD")


def _set_linux_daemons(image, ed, wanted: list[tuple[str, int]]) -> tuple[str, ...]:
    """Each daemon's link plan (vhdtool.guest.systemd) decided on the guest's root as it is, every refusal
    before anything is written, then its links made and removed in the edit session; the plans' notes."""
    from vhdtool.guest.hvdaemons import daemon_key, link_plans
    from vhdtool.guest.linux import os_release

    keys: dict[str, tuple[str, int]] = {}
    unique = []  # one plan per daemon, however many of its names are given
    for name, start in wanted:
        key = daemon_key(name)
        if key is None or key not in keys:
            unique.append((name, start))
        if key is not None and keys.setdefault(key, (name, start))[1] != start:
            raise UnsupportedLayout(image, f"{keys[key][0]} and {name} are the same daemon ({key}), both enabled "
                                           "and disabled", "give it once")
    try:
        fs, unwritable = ed.ext_filesystem(), None
    except UnsupportedLayout as e:  # an XFS root: what needs no link (udev, Windows-only names) is still answered
        fs, unwritable = ed.guest_root(), e
        if fs is None:
            raise
    release = os_release(fs)
    plans = link_plans(fs, release.get("ID"), release.get("ID_LIKE"), [(n, s == MANUAL) for n, s in unique])
    refused = next((p for p in plans if p.refusal), None)
    if refused is not None:
        raise UnsupportedLayout(image, f"cannot {refused.action} {refused.unit}: {refused.refusal}", refused.hint)
    needs = next((p for p in plans if p.changes), None)
    if unwritable is not None and needs is not None:
        raise UnsupportedLayout(image, unwritable.problem, f"{needs.action} it from inside the guest "
                                                           f"(systemctl {needs.action} {needs.unit})")
    for plan in plans:
        for change in plan.changes:
            _apply_link_change(ed, change)
    # Each plan removes the folders it alone empties; systemctl disable A B also removes one that A's
    # and B's links emptied together (never /etc/systemd/system itself).
    for folder in sorted({posixpath.dirname(c.path) for p in plans for c in p.changes if c.action == "delete"}):
        entry = ed.entry(folder)
        if folder != CONFIG_DIR and entry is not None and entry.kind == "dir":  # a link to a folder is kept
            ed.rmdir(folder, if_empty=True)
    return tuple(n for p in plans for n in p.notes)


def _apply_link_change(ed, change: LinkChange) -> None:
    if change.action == "create":  # an absolute link, root's, as systemctl makes it
        ed.symlink(change.path, change.target)
    elif change.action == "delete":
        ed.unlink(change.path)
    elif change.action == "mkdir":
        ed.mkdir(change.path)
    elif change.action == "rmdir":
        ed.rmdir(change.path)
    else:
        raise ValueError(f"unknown link change {change.action!r}")


def _services_of(image, inspection):
    require_guest(inspection)
    ic = inspection.guest.integration_services
    if inspection.guest.os != "windows" or ic is None or inspection.guest.windows is None:
        raise UnsupportedLayout(image, "the guest is not Windows: it has no integration services to list",
                                "Linux guests get them from their kernel (see `vhdtool inspect`)")
    return ic
