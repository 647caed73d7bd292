"""vhdtool: service offline Hyper-V disk images from Linux.

The library API, which the CLI is a thin skin over:

- ``open_disk(path)``: the virtual disk of a VHDX/VHD (a differencing chain resolved) as a stream.
- ``inspect(path)``: an ``Inspection`` of the image, its partitions and the guest, read-only.
- ``edit(path, dry_run=False, output=None)``: a context manager; the session it yields collects
  ``write_file(path, data)``, ``mkdir(path)``, ``delete(path)`` (a file, or a folder with
  everything under it), ``set_value(hive, key, name, value, type)`` and
  ``delete_value(hive, key, name)``, in order, and commits them once, crash-atomically, when
  the block ends normally. Guest paths are ``C:\\Windows\\Temp`` or ``/Windows/Temp``; file
  operations take ``partition=N`` for a volume other than the guest's system volume. Each file
  operation returns the ``FileChange`` it queued, or None when it changes nothing (a file
  already there byte for byte, an existing folder, a missing path to delete).
  ``delete`` refuses the root folder, NTFS metadata files, and the registry hives under
  Windows\\System32\\config with the folders holding them. The session's ``result`` (a
  ``ChangeSet``) records what was done; ``result.to_dict()`` is the ``--json`` document.
"""

from vhdtool.container import open_disk
from vhdtool.errors import VhdtoolError

__all__ = ["open_disk", "VhdtoolError", "inspect", "Inspection", "edit"]
__version__ = "0.1.0"


def __getattr__(name):
    # The guest layer pulls in the filesystem and registry readers; load it on first use.
    if name == "inspect":
        from vhdtool.guest.discover import inspect

        return inspect
    if name == "edit":
        from vhdtool.editor import edit

        return edit
    if name == "Inspection":
        from vhdtool.guest.inspection import Inspection

        return Inspection
    raise AttributeError(name)
