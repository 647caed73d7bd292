"""``vhdtool doctor``: whether the system libraries vhdtool loads are there, and where they come from."""

from __future__ import annotations

import json

import typer

from vhdtool.cli.options import json_option


def doctor(as_json: bool = json_option("Print one JSON document.")) -> None:
    """Check that the system libraries vhdtool loads are installed.

    For each: found or not, its version, its packages, the commands that need it. Exits 0 when all are found, 14 when one is missing (naming the package to install)."""
    from vhdtool.native.probe import check_libraries, doctor_document, missing_error

    checks = check_libraries()
    if as_json:
        typer.echo(json.dumps(doctor_document(checks), indent=2))
    else:
        typer.echo(render_doctor(checks))
    error = missing_error(checks)
    if error is not None:
        raise error


def render_doctor(checks) -> str:
    lines = []
    for c in checks:
        lib = c.library
        state = f"found, {c.path}" if c.found and c.path else ("found" if c.found else "MISSING")
        lines.append(f"{lib.name:<16} {lib.soname}: {state}")
        if c.found:
            lines.append(f"  version      {c.version}" if c.version else f"  version      unknown: {c.version_from}")
        lines.append(f"  packages     {lib.debian} (Debian/Ubuntu), {lib.fedora} (Fedora/RHEL)")
        lines.append(f"  needed by    {', '.join(lib.commands)} (and batch running them): {lib.used_for}")
    found = sum(c.found for c in checks)
    lines.append(f"{found} of {len(checks)} libraries found; vhdtool runs no other programs")
    return "\n".join(lines)
