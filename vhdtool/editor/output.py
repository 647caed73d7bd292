"""``--output NEW``: the image copied beside NEW under a hidden temporary name, changed there, then named NEW.

The original is only ever read. The copy (a reflink or sparse copy, container.filecopy) gets its
name by a rename once the commit into it is complete, and the folder is flushed so that the name
survives a power loss; until then a failure removes it and NEW never exists.
"""

from __future__ import annotations

import os
import tempfile

from vhdtool.container.chain import open_one
from vhdtool.editor.images import copy_image
from vhdtool.errors import UnsupportedImage, UnsupportedLayout, VhdtoolError, WriteFailed


class OutputCopy:
    def __init__(self, image: str, output: str):
        self.image = image
        self.output = output
        self.tmp: str | None = None  # the copy under its temporary name, until it is named (or removed)

    def start(self) -> str:
        """Refuse an output that exists or would lose a differencing disk's parent; copy; the path to work on."""
        out = os.path.abspath(self.output)
        if os.path.exists(out):
            raise UnsupportedLayout(out, "the output file exists", "give a new file name for --output")
        # The folder of the file itself, a symlink's target: where its parent locator is resolved from.
        if os.path.realpath(os.path.dirname(out)) != os.path.dirname(os.path.realpath(self.image)):
            probe = open_one(self.image)
            try:
                if probe.needs_parent:
                    raise UnsupportedImage(self.image, "a differencing disk's --output must be in the same folder",
                                           "so that its parent locator still finds the parent")
            finally:
                probe.close()
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(out)}.", suffix=".vhdtool-tmp", dir=os.path.dirname(out))
        os.close(fd)
        self.tmp = tmp
        copy_image(self.image, tmp)
        # The copy keeps the original's extension, so that its format probe and locators agree.
        return tmp

    def finish(self) -> None:
        """The finished copy becomes --output's file, and its folder is flushed so that the name survives a power loss."""
        try:
            os.replace(self.tmp, self.output)
        except OSError as e:
            raise WriteFailed(self.output, f"cannot give the finished copy its name ({e.strerror})",
                              "the image is unchanged; check the folder of the output and run the command again") from None
        self.tmp = None
        try:
            dfd = os.open(os.path.dirname(os.path.abspath(self.output)), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            raise WriteFailed(self.output, f"the copy is written, but flushing its folder failed ({e.strerror})",
                              "it may not survive a power loss: run `sync` or check the disk holding it") from None

    def rename_error(self, e: VhdtoolError) -> None:
        """Make an error about the temporary copy name a path the user gave: the output when writing it
        failed (it is not left behind either), else the image it is a copy of."""
        tmp = self.tmp
        if tmp is None:
            return
        name = self.output if isinstance(e, WriteFailed) else self.image
        if e.path == tmp:
            e.path = name
        e.problem = e.problem.replace(tmp, name)
        e.args = (e.message,)

    def discard(self) -> None:
        """An unfinished copy goes; NEW was never created."""
        if self.tmp is not None:
            try:
                os.unlink(self.tmp)
            except FileNotFoundError:
                pass
            self.tmp = None
