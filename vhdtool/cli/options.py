"""The arguments and options several commands share, each defined once; a command that needs other words
passes its own help to the option's function."""

from __future__ import annotations

from typing import Any

import typer

HOST_HELP = (
    "The Hyper-V host: win8, win8.1, win10, an alias (2012, 2012r2, 2016...), "
    "or auto for the host each guest last ran on."
)
CABS_HELP = "A folder, a .cab or the host's vmguest.iso to take cabs from; repeatable."


def host_option(default: Any = ..., help: str = HOST_HELP) -> Any:
    """``--host HOST`` (``...``: required)."""
    return typer.Option(default, "--host", metavar="HOST", help=help)


def cabs_option(help: str = CABS_HELP) -> Any:
    return typer.Option([], "--cabs", metavar="PATH", show_default=False, help=help)


def output_option(help: str) -> Any:
    return typer.Option(None, "--output", metavar="NEW", help=help)


def json_option(help: str) -> Any:
    return typer.Option(False, "--json", help=help)


def enable_option(help: str) -> Any:
    return typer.Option([], "--enable", metavar="NAME", show_default=False, help=help)


def disable_option(help: str) -> Any:
    return typer.Option([], "--disable", metavar="NAME", show_default=False, help=help)


IMAGE = typer.Argument(..., metavar="IMAGE", show_default=False, help="VHDX or VHD file")
IMAGES = typer.Argument(..., metavar="IMAGE...", show_default=False, help="VHDX or VHD files")
HOST = host_option()
CABS = cabs_option()
REVISION = typer.Option(None, "--matrix-revision", metavar="REV",
                        help="Revision of the source document (default: the one cabs/matrix.json names as its default).")
REQUIRE_SIGNED = typer.Option(False, "--require-signed",
                              help="Choose only a cab whose update.cat is a valid catalog, signed by a chain to a "
                                   "Microsoft root (or a --trust-root), that lists its update.mum. Recommended.")
TRUST_ROOT = typer.Option([], "--trust-root", metavar="PEM", show_default=False,
                          help="Also accept catalog signatures that chain to this root certificate; repeatable.")
DRY_RUN = typer.Option(False, "--dry-run", help="Show what would change; write nothing.")
OUTPUT = output_option("Write a changed copy to NEW; the image is not opened for writing.")
JSON_PER_IMAGE = json_option("Print one JSON document per image (a list for several).")
