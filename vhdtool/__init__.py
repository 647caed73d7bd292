"""vhdtool: service offline Hyper-V disk images from Linux."""

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
