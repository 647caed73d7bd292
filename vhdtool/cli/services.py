"""``vhdtool services IMAGE``: the guest's integration services, and their start type set offline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from vhdtool.cli.images import fail_line

MANUAL, DISABLED = 3, 4  # Start values: Windows ships the IC services as manual (triggered) start


def services(
    image: Path = typer.Argument(..., metavar="IMAGE", show_default=False, help="VHDX or VHD file"),
    enable: List[str] = typer.Option([], "--enable", metavar="NAME", show_default=False,
                                     help="Set service NAME to manual start, as Windows ships it; repeatable."),
    disable: List[str] = typer.Option([], "--disable", metavar="NAME", show_default=False,
                                      help="Set service NAME to disabled (Start=4); repeatable."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would change; write nothing."),
    output: Optional[Path] = typer.Option(None, "--output", metavar="NEW",
                                          help="Write a changed copy to NEW; the image is not opened for writing."),
    as_json: bool = typer.Option(False, "--json", help="Print the change set and the services as JSON."),
) -> None:
    """List the integration services of a guest; set how they start."""
    from vhdtool.cli.render import render_edit, render_services
    from vhdtool.editor import edit
    from vhdtool.errors import UnsupportedLayout
    from vhdtool.guest.discover import inspect

    wanted = [(n, MANUAL) for n in enable] + [(n, DISABLED) for n in disable]
    if not wanted:
        ins = inspect(image)
        ic = ins.guest.integration_services
        if ins.guest.os != "windows" or ic is None:
            raise UnsupportedLayout(image, "the guest is not Windows: it has no integration services to list",
                                    "Linux guests get them from their kernel (see `vhdtool inspect`)")
        if as_json:
            typer.echo(json.dumps({"schema": 1, "image": str(image), "services": [s.to_dict() for s in ic.services]},
                                  indent=2))
        else:
            typer.echo(render_services(str(image), ic.services))
        return
    with edit(image, dry_run=dry_run, output=output) as ed:
        ic = ed.inspection.guest.integration_services
        known = {s.name.lower(): s.name for s in (ic.services if ic else ())}
        control_set = ed.inspection.guest.windows.control_set if ed.inspection.guest.windows else None
        for name, start in wanted:
            if name.lower() not in known:
                raise UnsupportedLayout(image, f"the guest has no integration service named {name}",
                                        f"use one of: {', '.join(sorted(known.values())) or 'none installed'}")
            key = f"ControlSet{control_set:03d}\\Services\\{known[name.lower()]}"
            ed.set_value("SYSTEM", key, "Start", start, "REG_DWORD")
    result = ed.result
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        typer.echo(render_edit(result))
    if not result.registry:
        fail_line(f"{image}: nothing to change; the services already start that way")
