"""A local file written into ext2/3/4 by the libext2fs child without its bytes: blocks allocated, data left in the file.

As for NTFS (vhdtool.filesystem.ntfs3g), a ``Source``'s bytes never cross the sandbox pipe and
are never held in memory. In the child (vhdtool.filesystem.ext2fs):

1. room: the blocks the file needs (its data, and an estimate of its block map) against the
   volume's free blocks, after a replaced file's content was freed; short is VolumeFull,
   before anything of the file is allocated;
2. blocks, without data: an extent-mapped file (ext4) gets them from ``ext2fs_fallocate`` as
   uninitialised extents (so libext2fs writes no zeros through the I/O manager), then every
   extent is marked initialised; a block-mapped file (ext2, ext3) takes runs from
   ``ext2fs_new_range`` and maps each block with ``ext2fs_bmap2(BMAP_ALLOC | BMAP_SET)``
   (BMAP_ALLOC makes the indirect blocks it needs, which are metadata and written as such);
3. blocks the old volume used and this operation freed (a replaced file's) are kept out of
   the allocation while it runs: they are marked in libext2fs's bitmap for that time, so the new
   data lands where nothing of the old state reads, and the VHDX writer can put it in place
   before its log. When the other free blocks cannot hold the file they are not kept out (that
   part then goes through the VHDX log, and memory, as any change to reachable bytes);
4. the data: each run of whole blocks goes into the child's overlay as a source range
   (``Overlay.write_source``: "these volume bytes are those source bytes"); the last partial
   block is written as bytes, the file's last bytes then zeros, so nothing stale shows past EOF.

The runs in blocks the old bitmap marks free are listed (``Streamer.free``); the parent keeps the
blocks its own reading of the old volume also calls free (vhdtool.filesystem.extbitmap) and marks
them unreachable where they meet a source range it accepted.
"""

from __future__ import annotations

import ctypes
import errno
import re
import struct

from vhdtool.container.source import Source
from vhdtool.filesystem import ext2fsio as io
from vhdtool.filesystem.extsuper import blocks_needed
from vhdtool.native import Refusal

FS_SUPER, FS_BLOCKSIZE, FS_BLOCK_MAP = 32, 40, 88  # struct struct_ext2_filsys (ext2fs.h, e2fsprogs 1.47)
FALLOCATE_FORCE_UNINIT = 0x4
BMAP_ALLOC, BMAP_SET = 0x1, 0x2
EXTENT_ROOT, EXTENT_NEXT = 0x1, 0x9  # ext2fs_extent_get operations
EXTENT_LEAF, EXTENT_UNINIT, EXTENT_SECOND_VISIT = 0x1, 0x2, 0x4
EXT4_EXTENTS_FL = 0x80000
FLAGS, BLOCKS_LO = 32, 28  # struct ext2_inode
BITMAP_CHUNK = 1 << 23  # bits of the block bitmaps compared at a time
_SET = re.compile(rb"[^\x00]+")
u64 = ctypes.c_uint64


class ExtentRecord(ctypes.Structure):  # struct ext2fs_extent
    _fields_ = [("e_pblk", u64), ("e_lblk", u64), ("e_len", ctypes.c_uint32), ("e_flags", ctypes.c_uint32)]


class Streamer:
    """The streaming writes of one libext2fs volume in the child: ``volume`` is ext2fs._Volume."""

    def __init__(self, volume):
        self.volume = volume
        self.lib = volume.lib
        self.fs = volume.fs.value
        sb = ctypes.string_at(self._field(FS_SUPER), 1024)
        # The struct offsets above are e2fsprogs 1.47's: checked against what they must hold.
        if struct.unpack_from("<H", sb, 56)[0] != 0xEF53 or \
                ctypes.c_uint.from_address(self.fs + FS_BLOCKSIZE).value != volume.sb.block_size:
            raise Refusal("this libext2fs lays out its filesystem handle differently from e2fsprogs 1.47")
        self.first = struct.unpack_from("<I", sb, 20)[0]
        self.count = struct.unpack_from("<I", sb, 4)[0] + (struct.unpack_from("<I", sb, 0x150)[0] << 32
                                                          if volume.sb.incompat & 0x80 else 0) - self.first
        old = ctypes.c_void_p()
        volume._check(self.lib.ext2fs_copy_bitmap(self._field(FS_BLOCK_MAP), ctypes.byref(old)),
                      "copy the block bitmap")
        self.old = old.value  # the bitmap as the volume was opened: what the old state reaches
        self.free: list[list[int]] = []  # [first block, count] of data in blocks the old state does not use

    def _field(self, offset: int) -> int:
        return ctypes.c_void_p.from_address(self.fs + offset).value

    def close(self) -> None:
        if self.old:
            self.lib.ext2fs_free_block_bitmap(self.old)
            self.old = None

    # -- the write --------------------------------------------------------------------------
    def write(self, ino: int, path: str, source: Source) -> None:
        """``source``'s bytes as the content of ``ino``, which holds no blocks now."""
        bs = self.volume.sb.block_size
        need = blocks_needed(source.size, bs)
        free = self.lib.ext2fs_free_blocks_count(self._field(FS_SUPER))
        if need > free:
            raise io.VolumeFullHere(f"{path} needs {need} blocks of {bs} bytes and the volume has {free} free")
        blocks = -(-source.size // bs)
        if not blocks:
            return
        buf = self.volume.inode(ino)
        allocate = self._extents if struct.unpack_from("<I", buf, FLAGS)[0] & EXT4_EXTENTS_FL else self._blocks
        reserved = self._reserve()
        if free - sum(n for _, n in reserved) < need:
            # No room beside the old state's blocks: the blocks this operation freed are used after all.
            self._release(reserved)
            reserved = []
        try:
            runs = allocate(ino, buf, blocks, path)
        finally:
            self._release(reserved)
        self.volume.put_inode(ino, buf)
        self._place(source, runs, path)

    def _extents(self, ino: int, buf, blocks: int, path: str) -> list[tuple[int, int, int]]:
        """Uninitialised extents (no zeros written), then each marked initialised: (logical, physical, count)."""
        fs, lib = self.volume.fs, self.lib
        self.volume._check(lib.ext2fs_fallocate(fs, FALLOCATE_FORCE_UNINIT, ino, buf, (1 << 64) - 1, 0, blocks),
                           f"allocate {blocks} blocks for {path}")
        handle = ctypes.c_void_p()
        self.volume._check(lib.ext2fs_extent_open2(fs, ino, buf, ctypes.byref(handle)), f"open the extents of {path}")
        runs, ext, op = [], ExtentRecord(), EXTENT_ROOT
        try:
            while True:
                err = lib.ext2fs_extent_get(handle, op, ctypes.byref(ext))
                op = EXTENT_NEXT
                if err == io.EXT2_ET_EXTENT_NO_NEXT:
                    break
                self.volume._check(err, f"read the extents of {path}")
                if not ext.e_flags & EXTENT_LEAF or ext.e_flags & EXTENT_SECOND_VISIT:
                    continue
                if ext.e_flags & EXTENT_UNINIT:
                    ext.e_flags &= ~EXTENT_UNINIT
                    self.volume._check(lib.ext2fs_extent_replace(handle, 0, ctypes.byref(ext)),
                                       f"mark the extents of {path} written")
                runs.append((ext.e_lblk, ext.e_pblk, ext.e_len))
        finally:
            lib.ext2fs_extent_free(handle)
        return runs

    def _blocks(self, ino: int, buf, blocks: int, path: str) -> list[tuple[int, int, int]]:
        """Runs of free blocks, each block put in the block map (indirect blocks made as needed)."""
        fs, lib = self.volume.fs, self.lib
        runs, logical, goal = [], 0, 0
        start, count, phys = u64(), u64(), u64()
        while logical < blocks:
            self.volume._check(lib.ext2fs_new_range(fs, 0, goal, blocks - logical, None, ctypes.byref(start),
                                                    ctypes.byref(count)), f"allocate blocks for {path}")
            first, n = start.value, min(count.value, blocks - logical)
            if n <= 0:
                raise io.VolumeFullHere(f"libext2fs found no free block for {path}")
            lib.ext2fs_block_alloc_stats_range(fs, first, n, +1)
            self.volume._check(lib.ext2fs_iblk_add_blocks(fs, buf, n), f"count the blocks of {path}")
            for i in range(n):
                phys.value = first + i
                self.volume._check(lib.ext2fs_bmap2(fs, ino, buf, None, BMAP_ALLOC | BMAP_SET, logical + i, None,
                                                    ctypes.byref(phys)), f"map the blocks of {path}")
            runs.append((logical, first, n))
            logical, goal = logical + n, first + n
        return runs

    # -- keeping the old state's blocks out ----------------------------------------------------
    def _reserve(self) -> list[tuple[int, int]]:
        """Blocks the old volume used that are free now (freed by this operation), marked used in
        libext2fs's bitmap without counting them; the runs marked."""
        current, runs = self._field(FS_BLOCK_MAP), []
        if not self.volume.freed:
            return runs  # nothing freed yet: no bitmap to compare, on however large a volume
        for start in range(self.first, self.first + self.count, BITMAP_CHUNK):
            n = min(BITMAP_CHUNK, self.first + self.count - start)
            now, was = ctypes.create_string_buffer((n + 7) // 8), ctypes.create_string_buffer((n + 7) // 8)
            self.volume._check(self.lib.ext2fs_get_block_bitmap_range2(current, start, n, now), "read the bitmap")
            self.volume._check(self.lib.ext2fs_get_block_bitmap_range2(self.old, start, n, was), "read the bitmap")
            freed = (int.from_bytes(was.raw, "little") & ~int.from_bytes(now.raw, "little")) & ((1 << n) - 1)
            if not freed:
                continue
            raw = freed.to_bytes((n + 7) // 8, "little")
            for m in _SET.finditer(raw):  # only the bytes that hold a freed block are looked at bit by bit
                bits = int.from_bytes(m.group(), "little")
                while bits:
                    low = (bits & -bits).bit_length() - 1
                    length = ((bits >> low) ^ ((bits >> low) + 1)).bit_length() - 1
                    bits &= ~(((1 << length) - 1) << low)
                    at = start + m.start() * 8 + low
                    if runs and runs[-1][0] + runs[-1][1] == at:
                        runs[-1] = (runs[-1][0], runs[-1][1] + length)
                    else:
                        runs.append((at, length))
        for at, n in runs:
            self.lib.ext2fs_mark_block_bitmap_range2(current, at, n)
        return runs

    def _release(self, runs: list[tuple[int, int]]) -> None:
        current = self._field(FS_BLOCK_MAP)
        for at, n in runs:
            self.lib.ext2fs_unmark_block_bitmap_range2(current, at, n)

    def _old_runs(self, block: int, count: int):
        """(first, count, free in the old bitmap) for the runs of [block, block + count)."""
        end, out = block + count, u64()
        while block < end:
            err = self.lib.ext2fs_find_first_set_block_bitmap2(self.old, block, end - 1, ctypes.byref(out))
            if err not in (0, errno.ENOENT):
                raise Refusal(f"libext2fs cannot search the old block bitmap ({io.error_text(err)})")
            used = out.value if err == 0 else end
            if used > block:
                yield block, used - block, True
                block = used
                continue
            err = self.lib.ext2fs_find_first_zero_block_bitmap2(self.old, block, end - 1, ctypes.byref(out))
            if err not in (0, errno.ENOENT):
                raise Refusal(f"libext2fs cannot search the old block bitmap ({io.error_text(err)})")
            after = out.value if err == 0 else end
            yield block, after - block, False
            block = after

    # -- the data -------------------------------------------------------------------------------
    def _place(self, source: Source, runs: list[tuple[int, int, int]], path: str) -> None:
        """Whole blocks as source ranges in the child's overlay; the last partial block as bytes, zero-padded."""
        bs = self.volume.sb.block_size
        overlay, vmap = self.volume.channel.overlay, self.volume.channel.vmap
        whole = source.whole()
        for logical, physical, n in runs:
            at = logical * bs
            full = min(n, max(source.size - at, 0) // bs)
            if full < n - 1 or (full < n and at + n * bs - source.size >= bs):
                raise Refusal(f"libext2fs gave {path} blocks past its end")
            for block, count, free in self._old_runs(physical, full):
                data = whole[at + (block - physical) * bs : at + (block - physical + count) * bs]
                for disk, off, k in vmap.pieces(block * bs, len(data)):
                    overlay.write_source(disk, data[off : off + k])
                if free:
                    self.free.append([block, count])
            if full < n:
                tail_at = at + full * bs
                tail = source.read(tail_at, source.size - tail_at).ljust(bs, b"\0")
                for disk, off, k in vmap.pieces((physical + full) * bs, bs):
                    overlay.write_at(disk, tail[off : off + k])
