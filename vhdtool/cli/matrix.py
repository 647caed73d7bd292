"""``vhdtool matrix``: Microsoft's host/guest OS matrix for integration services, as held in cabs/."""

from __future__ import annotations

import json
from typing import Optional

import typer

from vhdtool.cli.options import REVISION, host_option, json_option


def matrix(
    host: Optional[str] = host_option(None, "Only this host: win8, win8.1, win10 or an alias (2012, 2012r2, 2016...)."),
    as_json: bool = json_option("Print a JSON list of rows."),
    revision: Optional[str] = REVISION,
) -> None:
    """Show how each guest gets its integration services on each host."""
    from vhdtool.cli.render import render_matrix
    from vhdtool.plan.matrix import load_matrix

    m = load_matrix(revision)
    hosts = [m.resolve_host(host)] if host else [h.key for h in m.hosts]
    rows = [r for h in hosts for r in m.table(h)]
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in rows], indent=2))
    else:
        typer.echo(render_matrix(m, hosts))
