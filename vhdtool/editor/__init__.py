"""Editing an offline guest: one session, one overlay, one commit.

``with vhdtool.edit(path) as ed:`` opens the image read-only, inspects it through
that handle, and collects what the caller asks for (``write_file``, ``mkdir``,
``delete``, and, through the hive layer, registry values), in order: a path deleted
and then written is written anew, one written and then deleted is gone. When the block ends normally the
operations run against an overlay over the virtual disk (libntfs-3g and libhivex
in the native sandbox write only into it), and the overlay's changes are
committed once, crash-atomically (vhdtool.container.commit). When the block
raises, nothing is written. ``dry_run`` stops before the commit and reports the
change set; ``output`` commits into a copy and never opens the original for
writing.

Every refusal is decided before anything is opened for writing, and a refused
image is byte-identical afterwards: an image another process holds, a read-only
file, a disk that differencing disks in its folder depend on, a hibernated guest,
an NTFS volume not shut down cleanly, BitLocker, XFS, an ext2/3/4 volume not unmounted
cleanly or on a non-linear LVM volume (vhdtool.editor.extedit).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from vhdtool.editor.changes import ChangeSet, FileChange, RegistryChange
from vhdtool.editor.session import EditSession
from vhdtool.errors import VhdtoolError

__all__ = ["ChangeSet", "EditSession", "FileChange", "RegistryChange", "edit"]


@contextmanager
def edit(path: str | os.PathLike, dry_run: bool = False, output: str | os.PathLike | None = None) -> Iterator[EditSession]:
    """An edit session on the image at ``path``; commits when the block exits normally."""
    session = EditSession(os.fspath(path), dry_run=dry_run, output=os.fspath(output) if output else None)
    try:
        session.open()
        yield session
        session.commit()
    except VhdtoolError as e:
        session.name_the_output(e)  # never the temporary copy --output works in
        raise
    finally:
        session.close()

