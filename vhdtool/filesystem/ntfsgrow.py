"""Allocating a file's clusters with libntfs-3g when the volume's free space is in many pieces.

libntfs-3g's allocator (lcnalloc.c, ``ntfs_cluster_alloc``) reads $Bitmap 4096 bytes (32768
clusters) at a time and takes from each such window the run that continues its guess, then
only the window's longest free run, before it moves on; after a pass over every zone it gives
up with ENOSPC. One call that needs more pieces than that fails while the volume has the
clusters (ntfs-3g's FUSE driver, writing 128 KiB at a time, never meets it). So a call that
fails with ENOSPC is tried again for less, halving down to one cluster, and the step doubles
again after each success; only a single cluster that cannot be had is a full volume.
"""

from __future__ import annotations

import errno
from collections.abc import Callable


def grow(extend: Callable[[int], int], size: int, unit: int, done: int = 0) -> int:
    """Extend an attribute of ``done`` bytes to ``size`` with ``extend(new_size)`` (0, or the errno of
    its failure): in one call when it can, else in steps of whole ``unit``s (the cluster size).
    Returns 0, or the errno that ended it (ENOSPC: not even one more cluster)."""
    step = size - done
    while done < size:
        want = min(size, done + step)
        err = extend(want)
        if err == 0:
            done, step = want, step * 2
        elif err == errno.ENOSPC and step > unit:
            step = max(unit, step // 2 // unit * unit)
        else:
            return err
    return 0
