"""``vhdtool services IMAGE``: the guest's integration services, and their start type set offline."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

from vhdtool.cli.images import for_each_image
from vhdtool.cli.options import DRY_RUN, IMAGE, OUTPUT, disable_option, enable_option, json_option


def services(
    image: Path = IMAGE,
    enable: List[str] = enable_option("Windows: set service NAME to manual start, as Windows ships it. Linux: "
                                      "enable daemon NAME (kvp, vss, fcopy, a daemon or Windows name) as "
                                      "systemctl enable does. Repeatable."),
    disable: List[str] = disable_option("Windows: set service NAME to disabled (Start=4). Linux: disable daemon "
                                        "NAME as systemctl disable does. Repeatable."),
    dry_run: bool = DRY_RUN,
    output: Optional[Path] = OUTPUT,
    as_json: bool = json_option("Print JSON: the services, or with --enable/--disable the change set."),
) -> None:
    """List the integration services of a guest; set how they start."""
    from vhdtool.cli.render import render_edit, render_services
    from vhdtool.editor.services import SCHEMA as LIST_SCHEMA, list_services, set_services, wanted_starts
    from vhdtool.editor.changes import SCHEMA as EDIT_SCHEMA

    wanted = wanted_starts(enable, disable)
    if not wanted:
        for_each_image([image], as_json, LIST_SCHEMA, list_services, render_services, os.fspath)
    else:
        for_each_image([image], as_json, EDIT_SCHEMA, lambda i: set_services(i, wanted, dry_run=dry_run, output=output),
                       render_edit, os.fspath, note=_unchanged)


def _unchanged(image: Path, result) -> str | None:
    # The plans' notes (a udev-started daemon, a Windows-only name) are in the document itself.
    return None if result.registry or result.files else f"{image}: nothing to change; the services already start that way"
