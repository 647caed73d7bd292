"""The guest's integration services: listed, or their start type set offline, in one edit."""

from __future__ import annotations

import os
from collections.abc import Iterable

from vhdtool.editor import ChangeSet, edit
from vhdtool.errors import UnsupportedLayout
from vhdtool.guest.inspection import require_guest
from vhdtool.guest.systemd import LinkPlan

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
    """Set each (service name, Start value) of ``wanted`` in the current control set, in one commit."""
    with edit(image, dry_run=dry_run, output=output) as ed:
        if ed.inspection.guest.os == "linux":
            raise UnsupportedLayout(image, "enabling or disabling a Linux guest's Hyper-V daemons is not supported "
                                    "yet: it needs the ext4 writer, which is coming",
                                    "`vhdtool services IMAGE` shows how each daemon starts")
        ic = _services_of(image, ed.inspection)
        known = {s.name.lower(): s.name for s in ic.services}
        control_set = ed.inspection.guest.windows.control_set
        for name, start in wanted:
            if name.lower() not in known:
                raise UnsupportedLayout(image, f"the guest has no integration service named {name}",
                                        f"use one of: {', '.join(sorted(known.values())) or 'none installed'}")
            key = f"ControlSet{control_set:03d}\\Services\\{known[name.lower()]}"
            ed.set_value("SYSTEM", key, "Start", start, "REG_DWORD")
    return ed.result


def _services_of(image, inspection):
    require_guest(inspection)
    ic = inspection.guest.integration_services
    if inspection.guest.os != "windows" or ic is None or inspection.guest.windows is None:
        raise UnsupportedLayout(image, "the guest is not Windows: it has no integration services to list",
                                "Linux guests get them from their kernel (see `vhdtool inspect`)")
    return ic
