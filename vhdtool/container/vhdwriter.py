"""VHD writer: one operation's changes to a fixed, dynamic or differencing VHD, committed through a copy.

The VHD format (Virtual Hard Disk Image Format Specification, 2006) has no log,
so nothing written in place could be undone by a crash. The change is made in a
copy beside the image instead, and the copy replaces the image by a rename, the
one step a filesystem makes atomic.

Everything is decided before anything is written: ``plan_commit`` reads the
footer, dynamic header and BAT of the image as it is (every offset and count in
them treated as hostile and bounded), and says which bytes of the new file
differ from the old one: data in place (fixed disk, allocated blocks), sector
bitmaps with the written sectors' bits set, new blocks at the end of the file,
their BAT entries, and the footer pushed back to the new end. ``commit`` then
runs, in this order; the note at each step says why stopping there is safe:

 1. The image is locked exclusively (``WritableFile``: refused with ImageInUse
    while a VM, qemu or another vhdtool has it; or the caller's lock, taken
    before it opened the image, is used) and stays open and locked until after
    step 7. The path must still name the file the plan was made from, unchanged
    (same inode, size and mtime), else the plan is stale. Nothing is written.
 2. Temp files of ours that a killed commit left behind for this image are
    removed (see ``_remove_stale_temps`` for why any found now are stale).
    Interrupted: the image was never touched; leftovers go next time.
 3. A temp file ``.<name>.vhdtool-<16 hex>.tmp`` is created in the image's folder
    (O_EXCL, mode 0600), and the image is copied into it: a reflink clone (FICLONE) where the filesystem
    shares extents, else a sparse copy of the data extents only (SEEK_DATA /
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
 5. The temp gets the image's owner (when root) and mode, and is flushed (fsync,
    checked) so that its content is on stable storage before any name points at
    it. Interrupted: as 3.
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
after another; the 512-byte footer follows the last one. The footer's bytes
and the copy of it at offset 0 are not changed (the footer only moves), nor is
the dynamic header, so their checksums stay right.
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import os
import re
import secrets
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from vhdtool.container.filecopy import copy_file, unchanged_failure
from vhdtool.container.overlay import CommitResult, Extent
from vhdtool.container.vhd import (
    DISK_DIFFERENCING,
    DISK_FIXED,
    FOOTER_COOKIE,
    FOOTER_SIZE,
    SECTOR,
    UNALLOCATED,
    VhdDisk,
    footer_checksum,
)
from vhdtool.container.writefile import WritableFile
from vhdtool.errors import CorruptImage, ImageInUse, ImageReadOnly, UnsupportedImage, WriteFailed
from vhdtool.units import KiB, MiB

HEADER_COOKIE = b"cxsparse"
HEADER_SIZE = 1024
LOCATOR_ENTRIES = 8
LOCATOR_TABLE = 576  # offset of the parent locator entries in the dynamic header
MAX_BAT_BYTES = 64 * MiB  # 16 Mi blocks; a real VHD (at most 2040 GiB) needs far fewer
DATA_ALIGN = 4 * KiB  # where Windows starts each block's data
TEMP_SUFFIX = re.compile(r"\.vhdtool-[0-9a-f]{16}\.tmp")


# A failure before the commit point (the rename) leaves the image as it was.
_failed = unchanged_failure


# -- the plan ----------------------------------------------------------------------------

@dataclass
class VhdPlan:
    """What the new file holds that the old one does not; decided before anything is written."""

    writes: list[tuple[int, bytes]] = field(default_factory=list)  # (file offset, bytes), sorted, merged
    cut_at: int | None = None  # where the old footer starts, when blocks are appended (the copy is cut there)
    new_size: int = 0  # the new file's size
    new_blocks: int = 0

    @property
    def empty(self) -> bool:
        return not self.writes


@dataclass
class _Layout:
    """The parts of a VHD file the writer needs, each bounded against the file."""

    file_size: int
    footer: bytes  # 512 bytes, as it is at the end of the file
    footer_start: int
    size: int
    disk_type: int
    block_size: int = 0
    bitmap_size: int = 0
    table_offset: int = 0
    entries: int = 0
    bat: bytes = b""  # the whole BAT, big-endian u32 sector numbers

    def block_sector(self, index: int) -> int:
        (sector,) = struct.unpack_from(">I", self.bat, 4 * index)
        return sector


def _corrupt(path: str, problem: str) -> CorruptImage:
    return CorruptImage(
        path, problem, "the image is damaged; vhdtool does not write to it (repair it on a Hyper-V host)"
    )


def _read_layout(disk: VhdDisk) -> _Layout:
    image, path = disk.image, disk.path
    file_size = image.file_size
    # The footer must be at the end: the reader accepts a VHD with only the copy at
    # offset 0, but a file that lost its end is not one to add blocks to.
    footer_start = None
    for length in (FOOTER_SIZE, FOOTER_SIZE - 1):  # Virtual PC once wrote 511-byte footers
        at = file_size - length
        if at >= 0 and image.raw_pread(at, len(FOOTER_COOKIE)) == FOOTER_COOKIE:
            footer_start = at
            footer = image.raw_pread(at, length).ljust(FOOTER_SIZE, b"\0")
            break
    if footer_start is None:
        raise _corrupt(path, "the VHD footer at the end of the file is missing")
    (checksum,) = struct.unpack_from(">I", footer, 64)
    if footer_checksum(footer) != checksum:
        raise _corrupt(path, "VHD footer checksum mismatch")
    if footer[84]:  # Saved State: the VM's memory was saved with this disk as it is
        raise UnsupportedImage(
            path, "the VM this disk belongs to is in a saved state",
            "discard the saved state, or shut the VM down first",
        )
    (size,) = struct.unpack_from(">Q", footer, 48)
    (disk_type,) = struct.unpack_from(">I", footer, 60)
    if size != disk.size or disk_type != disk.disk_type:
        raise ImageInUse(path, "the image changed since it was opened", "run the command again")
    if size == 0 or size % SECTOR:
        raise _corrupt(path, f"VHD current size {size} is not a whole number of sectors")
    layout = _Layout(file_size, footer, footer_start, size, disk_type)
    if disk_type == DISK_FIXED:
        if footer_start < size:
            raise _corrupt(path, "truncated: the fixed VHD is shorter than its size")
        return layout

    (data_offset,) = struct.unpack_from(">Q", footer, 16)
    if data_offset < FOOTER_SIZE or data_offset % SECTOR or data_offset + HEADER_SIZE > footer_start:
        raise _corrupt(path, f"VHD dynamic header offset {data_offset} lies outside the file")
    header = image.read_exact(data_offset, HEADER_SIZE, "VHD dynamic disk header")
    if header[:8] != HEADER_COOKIE:
        raise _corrupt(path, "VHD dynamic disk header not found")
    (hsum,) = struct.unpack_from(">I", header, 36)
    if ~(sum(header[:36]) + sum(header[40:])) & 0xFFFFFFFF != hsum:
        raise _corrupt(path, "VHD dynamic disk header checksum mismatch")
    table_offset, _version, entries, block_size = struct.unpack_from(">QIII", header, 16)
    if block_size != disk.block_size:
        raise ImageInUse(path, "the image changed since it was opened", "run the command again")
    if block_size < SECTOR or block_size & (block_size - 1) or block_size > 256 * MiB:
        raise _corrupt(path, f"VHD block size {block_size} is not allowed")
    if entries * block_size < size:
        raise _corrupt(path, "VHD block table is too small for the disk size")
    if 4 * entries > MAX_BAT_BYTES:
        raise UnsupportedImage(path, f"VHD block table of {entries} entries is larger than any real VHD's")
    if table_offset < FOOTER_SIZE or table_offset + 4 * entries > footer_start:
        raise _corrupt(path, "VHD block table lies outside the file")
    bitmap_size = -(-(block_size // SECTOR // 8) // SECTOR) * SECTOR
    layout.block_size = block_size
    layout.bitmap_size = bitmap_size
    layout.table_offset = table_offset
    layout.entries = entries
    layout.bat = image.read_exact(table_offset, 4 * entries, "VHD block table")

    # Every structure must lie before the footer and no block may overlap another
    # structure or block: a write into one must never land in another.
    reserved = [(0, FOOTER_SIZE, "the footer copy"), (data_offset, data_offset + HEADER_SIZE, "the dynamic header"),
                (table_offset, table_offset + 4 * entries, "the block table")]
    if disk_type == DISK_DIFFERENCING:
        for i in range(LOCATOR_ENTRIES):
            e = LOCATOR_TABLE + 24 * i
            code = header[e : e + 4]
            _space, length, _reserved, offset = struct.unpack_from(">IIIQ", header, e + 4)
            if code == b"\0\0\0\0" or length == 0:
                continue
            end = offset + -(-length // SECTOR) * SECTOR
            if offset < FOOTER_SIZE or end > footer_start:
                raise _corrupt(path, f"VHD parent locator {i} lies outside the file")
            reserved.append((offset, end, f"parent locator {i}"))
    span = bitmap_size + block_size
    starts = sorted(
        sector * SECTOR for sector in struct.unpack(f">{entries}I", layout.bat) if sector != UNALLOCATED
    )
    for start in starts:
        if start < FOOTER_SIZE or start + span > footer_start:
            raise _corrupt(path, f"a VHD block at offset {start} lies outside the file")
    for a, b in zip(starts, starts[1:]):
        if b - a < span:
            raise _corrupt(path, f"VHD blocks at offsets {a} and {b} overlap")
    for lo, hi, what in reserved:
        # The last block starting before ``hi`` is the only one that could overlap [lo, hi).
        i = bisect.bisect_left(starts, hi) - 1
        if i >= 0 and starts[i] + span > lo:
            raise _corrupt(path, f"a VHD block at offset {starts[i]} overlaps {what}")
    return layout


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


def _merge(writes: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    """Sorted writes with adjacent ones joined; overlapping ones are a bug in the planner."""
    out: list[tuple[int, bytearray]] = []
    for offset, data in sorted(writes, key=lambda w: w[0]):
        if out and out[-1][0] + len(out[-1][1]) == offset:
            out[-1][1].extend(data)
        elif out and out[-1][0] + len(out[-1][1]) > offset:
            raise RuntimeError(f"vhdtool bug: two planned writes overlap at file offset {offset}")
        else:
            out.append((offset, bytearray(data)))
    return [(o, bytes(d)) for o, d in out]


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
    layout = _read_layout(disk)
    plan.new_size = layout.file_size
    writes: list[tuple[int, bytes]] = []
    if layout.disk_type == DISK_FIXED:
        writes = [(c.offset, c.data) for c in changes]
        plan.writes = _merge(writes)
        return plan

    bs, bitmap_size = layout.block_size, layout.bitmap_size
    per_block: dict[int, list[tuple[int, bytes]]] = {}
    for c in changes:
        pos = c.offset
        while pos < c.end:
            block, within = divmod(pos, bs)
            n = min(bs - within, c.end - pos)
            per_block.setdefault(block, []).append((within, c.data[pos - c.offset : pos - c.offset + n]))
            pos += n

    end = layout.footer_start  # where new blocks go: after everything (checked above), where the footer was
    for block in sorted(per_block):
        pieces = per_block[block]
        sector = layout.block_sector(block)
        if sector == UNALLOCATED:
            # A new block: bitmap, then data, starting on a 4 KiB boundary when blocks are that large.
            align = DATA_ALIGN if bs >= DATA_ALIGN else SECTOR
            data_at = -(-(end + bitmap_size) // align) * align
            start = data_at - bitmap_size
            if start // SECTOR >= UNALLOCATED:
                raise UnsupportedImage(disk.path, "the VHD would grow past what its block table can address")
            bitmap = bytearray(bitmap_size)
            writes.append((layout.table_offset + 4 * block, struct.pack(">I", start // SECTOR)))
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
    if plan.new_blocks:
        plan.cut_at = layout.footer_start
        plan.new_size = end + FOOTER_SIZE
        writes.append((end, layout.footer))
    plan.writes = _merge(writes)
    return plan


# -- temp files ---------------------------------------------------------------------------------

def _temp_prefix(name: str) -> str:
    # A long image name would make the temp's name too long for the filesystem: keep a
    # part of it and a digest of all of it, so that temps of two images never share a prefix.
    if len(name) > 200:
        name = f"{name[:150]}~{hashlib.sha256(name.encode('utf-8', 'surrogateescape')).hexdigest()[:16]}"
    return f".{name}"


def _is_our_temp(entry: str, prefix: str) -> bool:
    return entry.startswith(prefix) and TEMP_SUFFIX.fullmatch(entry[len(prefix) :]) is not None


def _remove_stale_temps(folder: str, prefix: str, image: os.stat_result, locked_at: int) -> int:
    """Remove temps of ours for this image that a killed commit left; returns how many.

    Called only while this process holds the exclusive lock on the file the image's
    path names. A commit creates its temp only while it holds that lock on the
    file the path then names, and removes it (or renames it to be the image)
    before it lets the lock go; the path changes only by such a rename. So a temp
    for this image that exists now belongs to a process that died holding the
    lock. To be sure, only regular files last changed before this lock was taken
    are removed, never the image itself.
    """
    removed = 0
    try:
        entries = os.listdir(folder)
    except OSError:
        return 0
    for entry in entries:
        if not _is_our_temp(entry, prefix):
            continue
        path = os.path.join(folder, entry)
        try:
            st = os.lstat(path)
            if (not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) == (image.st_dev, image.st_ino)
                    or st.st_mtime_ns > locked_at):
                continue
            os.unlink(path)
            removed += 1
        except OSError:
            continue  # not ours to worry about: the commit does not depend on it
    return removed


def _create_temp(folder: str, prefix: str, image_path: str) -> tuple[str, int]:
    """A new, empty temp file in ``folder``, readable and writable by this process only."""
    for _ in range(8):
        path = os.path.join(folder, f"{prefix}.vhdtool-{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            continue
        except PermissionError:
            raise ImageReadOnly(
                image_path, "its folder is not writable (a VHD is changed through a copy beside it)"
            ) from None
        except OSError as e:
            if e.errno == errno.EROFS:
                raise ImageReadOnly(image_path, "the image file is on a read-only filesystem") from None
            raise _failed(image_path, f"cannot create a temporary copy in its folder ({e.strerror})") from None
        return path, fd
    raise _failed(image_path, "cannot find a free name for the temporary copy")


def _give_owner_and_mode(fd: int, like: os.stat_result, image_path: str) -> None:
    """The image's owner (when root; otherwise the copy is this user's) and permission bits."""
    try:
        if os.geteuid() == 0:
            os.fchown(fd, like.st_uid, like.st_gid)
        os.fchmod(fd, stat.S_IMODE(like.st_mode))  # after chown, which clears set-id bits
    except OSError as e:
        raise _failed(image_path, f"cannot give the changed copy the image's owner and mode ({e.strerror})") from None


# -- copying ------------------------------------------------------------------------------------

# -- the commit ---------------------------------------------------------------------------------

def _same(a: os.stat_result, b: os.stat_result) -> bool:
    """The same file (device and inode)."""
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


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
        planned = os.fstat(disk.image._fd)  # the file the plan is read from, as it is now
    except (AttributeError, TypeError, OSError):
        raise UnsupportedImage(disk.path, "the disk is closed") from None
    plan = plan_commit(disk, changes)
    if plan.empty:
        return None
    path = disk.path
    target = os.path.realpath(path)  # a symlink stays a symlink: the file it names is replaced
    folder, name = os.path.split(target)
    prefix = _temp_prefix(name)

    # Step 1: lock; the path must still name the planned-on file, unchanged.
    own = file is None
    lock = WritableFile(path) if own else file
    temp_path, temp_fd, out, src, renamed = None, None, None, None, False
    try:
        locked_at = time.time_ns()
        locked = os.fstat(lock._fd)
        try:
            here = os.stat(target)
        except OSError:
            here = None
        if not (_same(locked, planned) and here is not None and _same(here, locked)):
            raise ImageInUse(path, "the image file was replaced while vhdtool was reading it", "run the command again")
        if (locked.st_size, locked.st_mtime_ns) != (planned.st_size, planned.st_mtime_ns) or (
            locked.st_size != disk.image.file_size
        ):
            raise ImageInUse(path, "the image file changed while vhdtool was reading it", "run the command again")
        if locked.st_nlink > 1:
            raise UnsupportedImage(
                path, f"the image file has {locked.st_nlink} hard links; replacing it would leave the others unchanged",
                "remove the other links, or write a copy with --output NEW",
            )

        # Step 2: leftovers of a killed commit of this image.
        _remove_stale_temps(folder, prefix, locked, locked_at)

        # Step 3: the copy.
        try:
            src = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise _failed(path, f"cannot read it ({e.strerror})") from None
        if not _same(os.fstat(src), locked):
            raise ImageInUse(path, "the image file was replaced while vhdtool was reading it", "run the command again")
        temp_path, temp_fd = _create_temp(folder, prefix, path)
        total = locked.st_size + sum(len(data) for _offset, data in plan.writes)
        copied = copy_file(src, temp_fd, locked.st_size, path, reflink=reflink,
                           why="changing a VHD needs a copy of its data beside it",
                           progress=(lambda at: progress(at, total)) if progress is not None else None)

        try:
            # Step 4: the plan, into the copy. Every write checked (WritableFile).
            out = WritableFile(temp_path)
            if plan.cut_at is not None:
                out.truncate(plan.cut_at)  # the old footer goes: its place reads as zeros
                out.truncate(plan.new_size)
            for offset, data in plan.writes:
                out.pwrite(offset, data)
                if progress is not None:
                    progress(locked.st_size + out.bytes_written, total)

            # Step 5: the image's owner and mode, and the copy on stable storage before a name points at it.
            _give_owner_and_mode(temp_fd, locked, path)
            out.flush()
        except WriteFailed as e:
            # WritableFile names the temp file; the user knows the image.
            raise _failed(path, f"writing the changed copy failed: {e.problem}") from None
        if out.size != plan.new_size:
            raise _failed(path, f"the new image is {out.size} bytes, not the planned {plan.new_size}")

        # Step 6: the commit point.
        try:
            if not _same(os.stat(target), locked):
                raise ImageInUse(
                    path, "the image file was replaced while vhdtool was changing it", "run the command again"
                )
            os.rename(temp_path, target)
        except OSError as e:
            raise _failed(path, f"cannot replace it with the changed copy ({e.strerror})") from None
        renamed = True

        # Step 7: the rename on stable storage.
        try:
            dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            raise WriteFailed(
                path, f"the change is made, but flushing its folder failed ({e.strerror})",
                "it may not survive a power loss: run `sync` or check the disk holding it",
            ) from None
        return CommitResult(
            bytes_written=copied.bytes + out.bytes_written,
            writes=copied.calls + out.writes,
            flushes=out.flushes + 1,
        )
    finally:
        for fd in (src, temp_fd):
            if fd is not None:
                os.close(fd)
        if out is not None:
            out.close()
        if temp_path is not None and not renamed:
            try:
                os.unlink(temp_path)
            except OSError:
                pass
        if own:
            lock.close()
