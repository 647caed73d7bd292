"""VHD writer: one operation's changes to a fixed, dynamic or differencing VHD, committed through a copy.

The VHD format (Virtual Hard Disk Image Format Specification, 2006) has no log,
so nothing written in place could be undone by a crash. The change is made in a
copy beside the image instead, and the copy replaces the image by a rename, the
one step a filesystem makes atomic.

Everything is decided before anything is written: ``plan_commit`` reads the
footer, dynamic header and BAT of the image as it is (``layout.read_layout``:
every offset and count in them treated as hostile and bounded), and says which
bytes of the new file differ from the old one: data in place (fixed disk,
allocated blocks), sector bitmaps with the written sectors' bits set, new
blocks at the end of the file, their BAT entries, and the footer (with a new
Unique Id) at the new end and in its copy at offset 0. ``commit`` then
runs, in this order, one method of ``VhdCommit`` per step (its docstring says
again why stopping after it is safe):

 1. The image is locked exclusively (``WritableFile``: refused with ImageInUse
    while a VM, qemu or another vhdtool has it; or the caller's lock, taken
    before it opened the image, is used) and stays open and locked until after
    step 7. The path must still name the file the plan was made from, unchanged
    (same inode, size and mtime), else the plan is stale. Nothing is written.
 2. Temp files of ours that a killed commit left behind for this image are
    removed (see ``temps.remove_stale_temps`` for why any found now are stale).
    Interrupted: the image was never touched; leftovers go next time.
 3. A temp file ``.<name>.vhdtool-<16 hex>.tmp`` is created in the image's folder
    (O_EXCL, mode 0600), and the image is copied into it: a reflink clone
    (FICLONE) where the filesystem shares extents, else a sparse copy of the data extents only (SEEK_DATA /
    SEEK_HOLE, copy_file_range, plain reads and writes as a last resort).
    Interrupted: the image is untouched; a temp file may be left. Its name starts
    with a dot and ends in ``.vhdtool-<hex>.tmp``: it is never the image's name
    and no parent locator names it, so nothing that looks for the image (the
    user's path, a child's locator, vhdtool's chain) is led to a stale temp, and
    the name alone is enough to tell it for what it is. Step 2 of the next
    commit of this image removes it.
 4. The plan is written into the temp: the old footer cut off (its bytes read as
    zeros from then on) and the file extended when blocks are added, data,
    bitmaps, BAT entries and the footer at the new end. Every write is checked.
    Interrupted: as 3.
 5. The temp gets the image's owner (when root), extended attributes (an ACL, a
    label) and mode, and is flushed (fsync, checked) so that its content is on
    stable storage before any name points at it. Interrupted: as 3.
 6. The path is checked once more to name the locked file, then the temp is
    renamed over it. This is the commit point: before it every reader sees the
    old image, after it the new one, and a process that already had the old file
    open goes on reading the old content (its inode is never written).
 7. The folder is flushed (fsync), so that the rename survives a power loss.
    Interrupted before this: after a power loss the name holds the old or the new
    image, each complete (step 5). A failure here is reported as WriteFailed
    saying the change is made.

Any failure before step 6 removes the temp (try/finally); the image is then
byte-identical to before. Differencing disks: only the child is written; its
parents are opened read-only by the chain and never locked or copied.

Sector bitmaps (spec, "Block Bitmap"): in a dynamic disk a set bit means the
sector holds valid data and a clear bit that it was never modified (and its 512
bytes on disk must be zeros); in a differencing disk a set bit means the sector
is in this file and a clear one that it is read from the parent. So a new block
gets the bits of the sectors written in it and nothing else, the rest of its
data zero, in both kinds: a differencing child keeps reading the other sectors
from its parent, and a dynamic disk reads them as the zeros they are. (Hyper-V
and qemu's vpc driver set every bit of a new dynamic block; readers that ignore
the bitmap, as qemu and libvhdi do for dynamic disks, read the same bytes
either way because the unwritten sectors are zero.) A sector written into an
allocated block gets its bit set if it was not.

New blocks start where the footer was, placed so that each block's data begins
on a 4 KiB boundary as Windows places them (the bitmap just before it), one
after another; the 512-byte footer follows the last one. The dynamic header is
not changed. The footer (at the end, and its copy at offset 0 on a dynamic or
differencing disk) gets a new Unique Id and the checksum that goes with it, and
keeps every other byte: a differencing disk names its parent by that id, so a
child that this commit cannot see (in another folder, its parent reached through
a symlink) is refused by every reader once its parent has changed, as a VHDX
write changes the DataWriteGuid a child's parent_linkage names.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from vhdtool.container.filecopy import Copied, copy_file, unchanged_failure
from vhdtool.container.overlay import CommitResult, Extent
from vhdtool.container.source import SourceChanged, SourceRange, pieces
from vhdtool.container.vhd.layout import VhdLayout, read_layout
from vhdtool.container.vhd.reader import VhdDisk
from vhdtool.container.vhd.structs import (
    BAT_ENTRY,
    DISK_FIXED,
    FOOTER_SIZE,
    SECTOR,
    UNALLOCATED,
    with_new_unique_id,
)
from vhdtool.container.vhd.temps import create_temp, give_owner_and_mode, remove_stale_temps, temp_prefix
from vhdtool.container.writefile import WritableFile
from vhdtool.errors import ImageInUse, UnsupportedImage, WriteFailed
from vhdtool.units import KiB

DATA_ALIGN = 4 * KiB  # where Windows starts each block's data


# A failure before the commit point (the rename) leaves the image as it was.
_failed = unchanged_failure


# -- the plan ----------------------------------------------------------------------------

@dataclass
class VhdPlan:
    """What the new file holds that the old one does not; decided before anything is written."""

    writes: list[tuple[int, bytes | SourceRange]] = field(default_factory=list)  # (file offset, bytes), sorted, merged
    cut_at: int | None = None  # where the old footer starts, when blocks are appended (the copy is cut there)
    new_size: int = 0  # the new file's size
    new_blocks: int = 0

    @property
    def empty(self) -> bool:
        return not self.writes


def _set_bits(bitmap: bytearray, first: int, last: int) -> None:
    """Set the bits of sectors [first, last), most significant bit first (spec, "Block Bitmap")."""
    s = first
    while s < last and s % 8:
        bitmap[s // 8] |= 0x80 >> (s % 8)
        s += 1
    whole = (last - s) // 8
    if whole:
        bitmap[s // 8 : s // 8 + whole] = b"\xff" * whole
        s += 8 * whole
    while s < last:
        bitmap[s // 8] |= 0x80 >> (s % 8)
        s += 1


def _merge(writes: list[tuple[int, bytes | SourceRange]]) -> list[tuple[int, bytes | SourceRange]]:
    """Sorted writes with adjacent ones joined (bytes to bytes; a local file's range stays whole and apart);
    overlapping ones are a bug in the planner."""
    out: list[tuple[int, bytearray | SourceRange]] = []
    for offset, data in sorted(writes, key=lambda w: w[0]):
        if out and out[-1][0] + len(out[-1][1]) > offset:
            raise RuntimeError(f"vhdtool bug: two planned writes overlap at file offset {offset}")
        if (out and out[-1][0] + len(out[-1][1]) == offset and isinstance(out[-1][1], bytearray)
                and not isinstance(data, SourceRange)):
            out[-1][1].extend(data)
        else:
            out.append((offset, data if isinstance(data, SourceRange) else bytearray(data)))
    return [(o, d if isinstance(d, SourceRange) else bytes(d)) for o, d in out]


def plan_commit(disk: VhdDisk, changes: list[Extent]) -> VhdPlan:
    """Which bytes of the new file differ from the old: decided on the read-only open, before any write."""
    if not isinstance(disk, VhdDisk):
        raise UnsupportedImage(disk.path, "not a VHD")
    if disk.needs_parent and disk.parent is None:
        raise UnsupportedImage(disk.path, "a differencing disk is written only with its parent chain open")
    plan = VhdPlan()
    changes = [c for c in changes if c.data]
    for c in changes:
        if c.offset < 0 or c.offset % SECTOR or len(c.data) % SECTOR or c.end > disk.size:
            raise ValueError(f"change of {len(c.data)} bytes at {c.offset} is not whole sectors inside the disk")
    if not changes:
        return plan
    layout = read_layout(disk)
    plan.new_size = layout.file_size
    # A new Unique Id: a child that names this disk as its parent (one this commit could not see,
    # in another folder) no longer opens over a parent changed under it.
    footer = with_new_unique_id(layout.footer, uuid.uuid4().bytes)
    footer_in_place = (layout.footer_start, footer[: layout.file_size - layout.footer_start])  # 511 bytes stay 511
    if layout.disk_type == DISK_FIXED:
        plan.writes = _merge([(c.offset, c.data) for c in changes] + [footer_in_place])
        return plan

    per_block: dict[int, list[tuple[int, bytes]]] = {}
    bs = layout.block_size
    for c in changes:
        pos = c.offset
        while pos < c.end:
            block, within = divmod(pos, bs)
            n = min(bs - within, c.end - pos)
            per_block.setdefault(block, []).append((within, c.data[pos - c.offset : pos - c.offset + n]))
            pos += n
    writes: list[tuple[int, bytes]] = []
    end = layout.footer_start  # where new blocks go: after everything (checked by read_layout), where the footer was
    for block in sorted(per_block):
        end = _plan_block(disk, layout, block, per_block[block], end, plan, writes)
    if plan.new_blocks:
        plan.cut_at = layout.footer_start
        plan.new_size = end + FOOTER_SIZE
    writes.append((end, footer) if plan.new_blocks else footer_in_place)
    writes.append((0, footer))  # the copy at offset 0
    plan.writes = _merge(writes)
    return plan


def _plan_block(disk: VhdDisk, layout: VhdLayout, block: int, pieces: list[tuple[int, bytes]], end: int,
                plan: VhdPlan, writes: list[tuple[int, bytes]]) -> int:
    """Add to ``writes`` the data, bitmap and BAT entry that ``pieces`` of ``block`` need; returns the new end."""
    bs, bitmap_size = layout.block_size, layout.bitmap_size
    sector = layout.block_sector(block)
    if sector == UNALLOCATED:
        # A new block: bitmap, then data, starting on a 4 KiB boundary when blocks are that large.
        align = DATA_ALIGN if bs >= DATA_ALIGN else SECTOR
        data_at = -(-(end + bitmap_size) // align) * align
        start = data_at - bitmap_size
        if start // SECTOR >= UNALLOCATED:
            raise UnsupportedImage(disk.path, "the VHD would grow past what its block table can address")
        bitmap = bytearray(bitmap_size)
        writes.append((layout.table_offset + BAT_ENTRY.size * block, BAT_ENTRY.pack(start // SECTOR)))
        end = data_at + bs
        plan.new_blocks += 1
    else:
        start = sector * SECTOR
        bitmap = bytearray(disk.image.read_exact(start, bitmap_size, f"VHD block {block} sector bitmap"))
    old_bitmap = bytes(bitmap)
    for within, data in pieces:
        _set_bits(bitmap, within // SECTOR, (within + len(data)) // SECTOR)
        writes.append((start + bitmap_size + within, data))
    if sector == UNALLOCATED:
        writes.append((start, bytes(bitmap)))
    elif bytes(bitmap) != old_bitmap:
        # Only the 512-byte sectors of the bitmap that changed.
        first = next(i for i in range(bitmap_size) if bitmap[i] != old_bitmap[i]) // SECTOR * SECTOR
        last = -(-(max(i for i in range(bitmap_size) if bitmap[i] != old_bitmap[i]) + 1) // SECTOR) * SECTOR
        writes.append((start + first, bytes(bitmap[first:last])))
    return end


# -- the commit ---------------------------------------------------------------------------------

def _same(a: os.stat_result, b: os.stat_result) -> bool:
    """The same file (device and inode)."""
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class VhdCommit:
    """Runs steps 1-7 of the module docstring for one plan; ``close`` undoes what a failed run left."""

    def __init__(self, disk: VhdDisk, plan: VhdPlan, progress: Callable[[int, int], None] | None = None):
        self.disk = disk
        self.plan = plan
        self.path = disk.path
        self.target = os.path.realpath(self.path)  # a symlink stays a symlink: the file it names is replaced
        self.folder, name = os.path.split(self.target)
        self.prefix = temp_prefix(name)
        self.progress = progress
        self.lock: WritableFile | None = None
        self.own_lock = False
        self.locked: os.stat_result | None = None
        self.locked_at = 0
        self.src: int | None = None
        self.temp_path: str | None = None
        self.temp_fd: int | None = None
        self.copied: Copied | None = None
        self.total = 0
        self.out: WritableFile | None = None
        self.renamed = False

    def _replaced(self, doing: str) -> ImageInUse:
        return ImageInUse(self.path, f"the image file was replaced while vhdtool was {doing} it", "run the command again")

    def lock_image(self, planned: os.stat_result, file: WritableFile | None) -> None:
        """Step 1. Nothing is written yet: interrupted, nothing happened."""
        self.own_lock = file is None
        self.lock = WritableFile(self.path) if self.own_lock else file
        self.locked_at = time.time_ns()
        locked = self.locked = self.lock.stat()
        try:
            here = os.stat(self.target)
        except OSError:
            here = None
        if not (_same(locked, planned) and here is not None and _same(here, locked)):
            raise self._replaced("reading")
        if (locked.st_size, locked.st_mtime_ns) != (planned.st_size, planned.st_mtime_ns) or (
            locked.st_size != self.disk.image.file_size
        ):
            raise ImageInUse(self.path, "the image file changed while vhdtool was reading it", "run the command again")
        if locked.st_nlink > 1:
            raise UnsupportedImage(
                self.path,
                f"the image file has {locked.st_nlink} hard links; replacing it would leave the others unchanged",
                "remove the other links, or write a copy with --output NEW",
            )

    def remove_leftovers(self) -> None:
        """Step 2. The image was never touched; what this leaves goes next time."""
        remove_stale_temps(self.folder, self.prefix, self.locked, self.locked_at)

    def copy_image(self, reflink: bool) -> None:
        """Step 3. The image is untouched; the temp, if left, is removed by step 2 of the next commit."""
        try:
            self.src = os.open(self.target, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise _failed(self.path, f"cannot read it ({e.strerror})") from None
        if not _same(os.fstat(self.src), self.locked):
            raise self._replaced("reading")
        self.temp_path, self.temp_fd = create_temp(self.folder, self.prefix, self.path)
        size = self.locked.st_size
        self.total = size + sum(len(data) for _offset, data in self.plan.writes)
        progress = self.progress
        self.copied = copy_file(self.src, self.temp_fd, size, self.path, reflink=reflink,
                                why="changing a VHD needs a copy of its data beside it",
                                progress=(lambda at: progress(at, self.total)) if progress is not None else None)

    def write_plan(self) -> None:
        """Step 4. As step 3: only the temp has changed. Every write checked (WritableFile)."""
        try:
            self.out = out = WritableFile(self.temp_path)
            if self.plan.cut_at is not None:
                out.truncate(self.plan.cut_at)  # the old footer goes: its place reads as zeros
                out.truncate(self.plan.new_size)
            for offset, data in self.plan.writes:
                for at, part in pieces(data):
                    out.pwrite(offset + at, part)
                    if self.progress is not None:
                        self.progress(self.locked.st_size + out.bytes_written, self.total)
        except SourceChanged:
            raise  # the local file's fault, named as such; the temp goes as for any failure
        except WriteFailed as e:
            raise self._writing_failed(e) from None
        # What was copied from local files is what was decided on, or the temp goes and the image stays.
        for source in {id(d.source): d.source for _o, d in self.plan.writes if isinstance(d, SourceRange)}.values():
            source.settle()

    def seal_copy(self) -> None:
        """Step 5. As step 3; after it the temp's content is on stable storage before any name points at it."""
        try:
            give_owner_and_mode(self.temp_fd, self.src, self.locked, self.path)
            self.out.flush()
        except WriteFailed as e:
            raise self._writing_failed(e) from None
        if self.out.size != self.plan.new_size:
            raise _failed(self.path, f"the new image is {self.out.size} bytes, not the planned {self.plan.new_size}")

    def _writing_failed(self, e: WriteFailed) -> WriteFailed:
        # WritableFile names the temp file; the user knows the image.
        return _failed(self.path, f"writing the changed copy failed: {e.problem}")

    def replace_image(self) -> None:
        """Step 6, the commit point: before it every reader sees the old image, after it the new, complete one.

        Stopped after it, the name holds the new image (on stable storage since step 5), and a
        process that had the old file open goes on reading the old content (its inode is never written).
        """
        try:
            if not _same(os.stat(self.target), self.locked):
                raise self._replaced("changing")
            os.rename(self.temp_path, self.target)
        except OSError as e:
            raise _failed(self.path, f"cannot replace it with the changed copy ({e.strerror})") from None
        self.renamed = True

    def flush_folder(self) -> None:
        """Step 7. Interrupted before it, a power loss leaves the old or the new image, each complete."""
        try:
            dfd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            raise WriteFailed(
                self.path, f"the change is made, but flushing its folder failed ({e.strerror})",
                "it may not survive a power loss: run `sync` or check the disk holding it",
            ) from None

    def result(self) -> CommitResult:
        return CommitResult(
            bytes_written=self.copied.bytes + self.out.bytes_written,
            writes=self.copied.calls + self.out.writes,
            flushes=self.out.flushes + 1,
        )

    def close(self) -> None:
        """Close what the commit opened; before the commit point, the temp goes too (the image is as it was)."""
        for fd in (self.src, self.temp_fd):
            if fd is not None:
                os.close(fd)
        if self.out is not None:
            self.out.close()
        if self.temp_path is not None and not self.renamed:
            try:
                os.unlink(self.temp_path)
            except OSError:
                pass
        if self.own_lock and self.lock is not None:
            self.lock.close()


def commit(
    disk: VhdDisk, changes: list[Extent], file: WritableFile | None = None, *, reflink: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> CommitResult | None:
    """Commit ``changes`` to the VHD ``disk`` was opened from, through a copy renamed over it.

    None when there is nothing to change: then nothing is locked, copied or written.
    ``disk`` must be the top of its chain (its parents are never written) and is
    stale afterwards: close it and open the file again to read the result.
    ``file`` is the caller's locked handle of the image (taken before ``disk`` was
    opened, so that nothing changed the file since it was read), which the caller
    keeps and closes; after the commit it holds the old file, no longer the image.
    Without it the image is locked here. ``reflink=False`` forces the sparse copy (tests).
    ``progress(done, total)`` follows the copy (by position, holes included) and then the writes.
    """
    try:
        planned = disk.image.stat()  # the file the plan is read from, as it is now
    except (AttributeError, ValueError, OSError):
        raise UnsupportedImage(disk.path, "the disk is closed") from None
    plan = plan_commit(disk, changes)
    if plan.empty:
        return None
    run = VhdCommit(disk, plan, progress)
    try:
        run.lock_image(planned, file)
        run.remove_leftovers()
        run.copy_image(reflink)
        run.write_plan()
        run.seal_copy()
        run.replace_image()
        run.flush_folder()
        return run.result()
    finally:
        run.close()
