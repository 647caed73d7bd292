"""``vhdtool plan IMAGE... --host H``: how each guest gets its integration services, and which cab to stage."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

from vhdtool.cli.images import for_each_image
from vhdtool.cli.options import CABS, HOST, IMAGES, JSON_PER_IMAGE, REQUIRE_SIGNED, REVISION, TRUST_ROOT


def plan(
    images: List[Path] = IMAGES,
    host: str = HOST,
    cabs: List[Path] = CABS,
    as_json: bool = JSON_PER_IMAGE,
    revision: Optional[str] = REVISION,
    require_signed: bool = REQUIRE_SIGNED,
    trust_root: List[Path] = TRUST_ROOT,
) -> None:
    """Decide how each IMAGE's guest gets integration services on HOST.

    Where the answer is a cab (the integration services disk, or KB3071740 for
    guests without Data Exchange), choose it from the --cabs sources, verified
    against the guest and by its signature (update.cat).
    """
    from vhdtool.cli.render import render_plan
    from vhdtool.guest.discover import inspect
    from vhdtool.plan.decide import SCHEMA, plan_for_host

    m, host_key, catalog = plan_inputs(host, cabs, revision, trust_root, require_signed)
    for_each_image(
        images, as_json, SCHEMA, lambda image: plan_for_host(inspect(image), host_key, catalog, m), render_plan, os.fspath
    )


def plan_inputs(host: str, cabs: List[Path], revision: Optional[str], trust_root: List[Path] = (),
                require_signed: bool = False):
    """(matrix, host key or None for --host auto, cab catalog): what plan and stage decide from."""
    from vhdtool.plan.matrix import load_matrix
    from vhdtool.plan.sources import load_sources

    m = load_matrix(revision)
    host_key = None if host.strip().lower() == "auto" else m.resolve_host(host)
    return m, host_key, load_sources(cabs, trust_root, require_signed)
