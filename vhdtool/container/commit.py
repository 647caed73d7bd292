"""Committing an overlay's changes to the image file it sits on, whatever the format.

VHDX is written in place through its log (vhdtool.container.vhdx.writer); VHD,
which has no log, is written into a copy that replaces the original only when
complete (vhdtool.container.vhd.writer). Either way the result is all of the
changes or none of them.
"""

from __future__ import annotations

from collections.abc import Callable

from vhdtool.container.overlay import CommitResult, Extent
from vhdtool.container.stream import DiskStream
from vhdtool.container.writefile import WritableFile

__all__ = ["CommitResult", "commit"]


def commit(
    disk: DiskStream,
    changes: list[Extent],
    file: WritableFile | None = None,
    unreachable: list[tuple[int, int]] = (),
    progress: Callable[[int, int], None] | None = None,
) -> CommitResult | None:
    """Write ``changes`` into the top disk of ``disk``'s chain; None when there is nothing to change.

    ``file``: the image already open for writing (and locked) by the caller, who keeps
    it; without it the commit opens and locks the file itself. ``unreachable``: the
    overlay's ranges no structure of the old state points into. ``disk`` is stale
    afterwards: close it and open the file again to read the result. ``progress(done,
    total)``: bytes written so far of those the commit will write, after each write.
    """
    if disk.format == "vhdx":
        from vhdtool.container.vhdx.writer import commit as commit_vhdx

        return commit_vhdx(disk, changes, file, unreachable, progress=progress)
    from vhdtool.container.vhd.writer import commit as commit_vhd

    # A VHD is written into a copy renamed over it: every change lands at once, so there
    # is nothing to gain from writing unreachable clusters first.
    return commit_vhd(disk, changes, file, progress=progress)
