"""``vhdtool stage`` and ``vhdtool status``: install the chosen integration services at next boot; read the outcome."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer

from vhdtool.cli.images import for_each_image
from vhdtool.cli.options import (CABS, DRY_RUN, HOST, IMAGES, JSON_PER_IMAGE, REQUIRE_SIGNED, REVISION, TRUST_ROOT,
                                 output_option)
from vhdtool.cli.plan import plan_inputs


def stage(
    images: List[Path] = IMAGES,
    host: str = HOST,
    cabs: List[Path] = CABS,
    dry_run: bool = DRY_RUN,
    output: Optional[Path] = output_option("Stage into a copy NEW (one image only); the image is not written."),
    as_json: bool = JSON_PER_IMAGE,
    revision: Optional[str] = REVISION,
    require_signed: bool = REQUIRE_SIGNED,
    trust_root: List[Path] = TRUST_ROOT,
) -> None:
    """Stage each IMAGE's integration services to install at next boot."""
    from vhdtool.cli.render import render_stage
    from vhdtool.plan.decide import SCHEMA
    from vhdtool.stage.session import stage as stage_image

    if output is not None and len(images) != 1:
        raise typer.BadParameter("--output takes one image", param_hint="--output")
    m, host_key, catalog = plan_inputs(host, cabs, revision, trust_root, require_signed)
    for_each_image(images, as_json, SCHEMA,
                   lambda image: stage_image(image, host_key, catalog, m, dry_run=dry_run, output=output),
                   render_stage, os.fspath)


def status(
    images: List[Path] = IMAGES,
    as_json: bool = JSON_PER_IMAGE,
) -> None:
    """Report whether what was staged in each IMAGE installed at boot."""
    from vhdtool.cli.render import render_status
    from vhdtool.stage.status import SCHEMA
    from vhdtool.stage.status import status as read_status

    for_each_image(images, as_json, SCHEMA, read_status, render_status, os.fspath)

