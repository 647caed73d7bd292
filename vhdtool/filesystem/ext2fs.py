"""ext2/3/4 writes through libext2fs (ctypes), on an I/O manager whose reads and writes go to an overlay, in the sandbox.

As for NTFS (vhdtool.filesystem.ntfs3g): no mount, no root. libext2fs opens the volume
through ``OverlayIo`` (vhdtool.filesystem.ext2fsio), in the native sandbox's forked child,
which keeps only read-only descriptors of the image; what it writes lands in the child's copy
of the overlay, and the child answers with the sectors that changed. The parent checks each
(whole sectors, inside the volume's runs of the disk) and puts them into its own overlay.

Before any of that the parent reads the superblock itself and refuses a volume that needs
journal recovery, has orphan inodes, records errors or was not unmounted cleanly
(vhdtool.filesystem.extsuper); libext2fs then refuses features it does not know
(EXT2_ET_UNSUPP_FEATURE, EXT2_ET_RO_UNSUPP_FEATURE), which becomes UnsupportedLayout.

libext2fs writes around the journal, as debugfs does: that is sound because the journal is
empty (no RECOVER flag), so nothing in it can be replayed over the change. Directory entries
are added and removed by ext2fs_link / ext2fs_unlink, which keep hashed (htree) directories
valid; a full directory block is met by ext2fs_expand_dir and a retry. ext2fs_close writes the
bitmaps, group descriptors and superblocks back, with their metadata_csum checksums.
Paths are resolved inside the volume, symlinks in their folders followed (ext2fs_namei_follow).
A file given as a local file (a Source) is written without its bytes (vhdtool.filesystem.ext2stream):
the child answers with source ranges beside its changed sectors, and the commit copies them file to file.
"""

from __future__ import annotations

import ctypes
import stat
import struct
import time
from collections.abc import Callable

from vhdtool.container.overlay import Extent, Overlay
from vhdtool.container.source import Source, SourceRange
from vhdtool.errors import CorruptFilesystem, NativeError, UnsupportedLayout, VolumeFull
from vhdtool.filesystem import ext2fsio as io
from vhdtool.filesystem.answer import decode_extents, decode_runs, decode_sources, encode_extents
from vhdtool.filesystem.ext2ops import MakeDir, RemoveDir, Symlink, Unlink, WriteFile
from vhdtool.filesystem.ext2stream import Streamer
from vhdtool.filesystem.extbitmap import old_free_ranges
from vhdtool.filesystem.extsuper import (INCOMPAT_EXTENTS, INCOMPAT_INLINE_DATA, RECHECK, SUPERBLOCK_OFFSET,
                                         SUPERBLOCK_SIZE, Superblock)
from vhdtool.native import Refusal, run_isolated
from vhdtool.units import MiB
from vhdtool.volume.mapping import VolumeMap

CHILD_TIMEOUT = 120.0  # and a second more per MAPPED_PER_SECOND bytes streamed (ext3 maps a block at a time)
MAPPED_PER_SECOND = 64 * MiB
MAX_ANSWER = 512 * MiB
MAX_BYTES = 64 * MiB  # a file given as bytes crosses the sandbox's answer: a local file (a Source) never does
EXT2_FLAG_RW, EXT2_FLAG_64BITS = 0x01, 0x20000
EXT2_FLAG_FLUSH_NO_SYNC = 1
EXT2_FILE_WRITE = 0x1
EXT2_FT_REG_FILE = 1
ROOT_INO = 2
INODE_BUF = 160  # sizeof(struct ext2_inode_large) in e2fsprogs 1.47
EXT4_EXTENTS_FL, EXT4_INLINE_DATA_FL, EXT4_ENCRYPT_FL = 0x80000, 0x10000000, 0x800
WRITE_CHUNK = 1 * MiB
DIRENT_ABORT = 2  # ext2fs.h: stop ext2fs_dir_iterate2
INLINE_MAX = 60  # bytes of i_block, where an inline-data file's first bytes live


_VolumeFullHere, _UnsupportedHere = io.VolumeFullHere, io.UnsupportedHere


# -- the inode fields vhdtool sets (struct ext2_inode, ext2_fs.h) -------------------------------
def _get(buf, fmt: str, offset: int) -> int:
    return struct.unpack_from(fmt, buf, offset)[0]


def _owner(buf, uid: int, gid: int) -> None:
    struct.pack_into("<H", buf, 2, uid & 0xFFFF)
    struct.pack_into("<H", buf, 120, uid >> 16)
    struct.pack_into("<H", buf, 24, gid & 0xFFFF)
    struct.pack_into("<H", buf, 122, gid >> 16)


def _times(buf, *offsets: int) -> None:
    now = int(time.time()) & 0xFFFFFFFF
    for at in offsets:
        struct.pack_into("<I", buf, at, now)


MODE, SIZE_LO, CTIME, MTIME, DTIME, LINKS, FLAGS, SIZE_HI = 0, 4, 12, 16, 20, 26, 32, 108


class _Volume:
    """One volume opened by libext2fs in the child, and the operations vhdtool needs of it."""

    def __init__(self, lib: ctypes.CDLL, channel: io.OverlayIo, sb: Superblock):
        self.lib = lib
        self.sb = sb
        self.channel = channel
        self.streamer: Streamer | None = None
        self.freed = False  # whether an operation has freed blocks (the streamer then keeps them out)
        fs = ctypes.c_void_p()
        err = lib.ext2fs_open2(b"vhdtool", None, EXT2_FLAG_RW | EXT2_FLAG_64BITS, 0, 0,
                               ctypes.addressof(channel.manager), ctypes.byref(fs))
        if err in (io.EXT2_ET_UNSUPP_FEATURE, io.EXT2_ET_RO_UNSUPP_FEATURE):
            raise _UnsupportedHere(io.error_text(err))
        self._check(err, "open the filesystem")
        self.fs = fs
        self._check(lib.ext2fs_read_bitmaps(fs), "read the allocation bitmaps")
        self.streamer = Streamer(self)  # the old block bitmap is copied now, before any change

    def close(self) -> None:
        """Bitmaps, group descriptors and superblocks written back; the handle freed."""
        self.streamer.close()
        self._check(self.lib.ext2fs_close2(self.fs, EXT2_FLAG_FLUSH_NO_SYNC), "write back the filesystem's structures")

    @staticmethod
    def _check(err: int, doing: str) -> None:
        if err == 0:
            return
        if err in io.FULL:
            raise _VolumeFullHere(f"libext2fs cannot {doing}: the volume is full ({io.error_text(err)})")
        raise Refusal(f"libext2fs cannot {doing} ({io.error_text(err)})")

    # -- finding things ----------------------------------------------------------------------
    def resolve(self, path: str) -> int | None:
        """The inode ``path`` names, every symlink in it followed inside the volume; None when it is not there."""
        ino = ctypes.c_uint32()
        err = self.lib.ext2fs_namei_follow(self.fs, ROOT_INO, ROOT_INO, (path or "/").encode(), ctypes.byref(ino))
        if err == io.EXT2_ET_FILE_NOT_FOUND:
            return None
        self._check(err, f"look up {path}")
        return ino.value

    def entry(self, folder: int, name: str) -> int | None:
        ino = ctypes.c_uint32()
        raw = name.encode()
        err = self.lib.ext2fs_lookup(self.fs, folder, raw, len(raw), None, ctypes.byref(ino))
        if err == io.EXT2_ET_FILE_NOT_FOUND:
            return None
        self._check(err, f"look up {name}")
        return ino.value

    def inode(self, ino: int):
        buf = (ctypes.c_char * INODE_BUF)()
        self._check(self.lib.ext2fs_read_inode_full(self.fs, ino, buf, INODE_BUF), f"read inode {ino}")
        return buf

    def put_inode(self, ino: int, buf) -> None:
        self._check(self.lib.ext2fs_write_inode_full(self.fs, ino, buf, INODE_BUF), f"write inode {ino}")

    def _touch(self, ino: int) -> None:
        buf = self.inode(ino)
        _times(buf, CTIME, MTIME)
        self.put_inode(ino, buf)

    def _into_folder(self, folder: int, doing: str, call: Callable[[], int]) -> None:
        """``call()`` adds an entry to ``folder``: a full directory is expanded by a block and the call made again."""
        buf = self.inode(folder)
        if _get(buf, "<I", FLAGS) & EXT4_ENCRYPT_FL:
            raise Refusal(f"cannot {doing}: its folder is encrypted")
        err = call()
        if err == io.EXT2_ET_DIR_NO_SPACE:
            self._check(self.lib.ext2fs_expand_dir(self.fs, folder), f"grow the folder to {doing}")
            err = call()
        self._check(err, doing)
        self._touch(folder)

    # -- operations ----------------------------------------------------------------------
    def mkdir(self, path: str) -> int:
        ino = ROOT_INO
        parts = [p for p in path.split("/") if p]
        for i, name in enumerate(parts):
            here = "/" + "/".join(parts[: i + 1])
            found = self.resolve(here)
            if found is None:
                parent = ino
                self._into_folder(parent, f"make the folder {here}",
                                  lambda: self.lib.ext2fs_mkdir(self.fs, parent, 0, name.encode()))
                found = self.resolve(here)
            if found is None or not stat.S_ISDIR(_get(self.inode(found), "<H", MODE)):
                raise Refusal(f"{here} is not a folder")
            ino = found
        return ino

    def _split(self, path: str) -> tuple[str, str]:
        parent, _, name = path.rstrip("/").rpartition("/")
        if not name or len(name.encode()) > 255 or name in (".", ".."):
            raise Refusal(f"{path} is not a valid ext4 file name")
        return parent or "/", name

    def unlink(self, path: str) -> None:
        parent, name = self._split(path)
        folder = self.resolve(parent)
        ino = self.entry(folder, name) if folder is not None else None
        if ino is None:
            return  # nothing there: no change
        if stat.S_ISDIR(_get(self.inode(ino), "<H", MODE)):
            raise Refusal(f"{path} is a folder: vhdtool removes only files and symbolic links")
        self._check(self.lib.ext2fs_unlink(self.fs, folder, name.encode(), ino, 0), f"remove {path}")
        self._touch(folder)
        self._drop_link(ino, path)

    def rmdir(self, path: str) -> None:
        """An empty folder removed as debugfs rmdir does: its entry, its inode and blocks, and the parent's
        link count its '..' held."""
        parent, name = self._split(path)
        folder = self.resolve(parent)
        ino = self.entry(folder, name) if folder is not None else None
        if ino is None:
            return
        if not stat.S_ISDIR(_get(self.inode(ino), "<H", MODE)):
            raise Refusal(f"{path} is not a folder")
        if self._holds_names(ino, path):
            raise Refusal(f"{path} is not empty")
        self._check(self.lib.ext2fs_unlink(self.fs, folder, name.encode(), ino, 0), f"remove {path}")
        buf = self.inode(folder)
        struct.pack_into("<H", buf, LINKS, max(_get(buf, "<H", LINKS) - 1, 1))
        _times(buf, CTIME, MTIME)
        self.put_inode(folder, buf)
        self._drop_link(ino, path, folder=True)

    def _holds_names(self, ino: int, path: str) -> bool:
        """Whether the folder ``ino`` has an entry other than '.' and '..' (unused slots are not passed on)."""
        found = []

        def each(_dir, _entry, dirent, _offset, _blocksize, _buf, _priv) -> int:
            name_len = ctypes.string_at(dirent, 8)[6]  # struct ext2_dir_entry_2: inode, rec_len, name_len, type
            if ctypes.string_at(dirent + 8, name_len) not in (b".", b".."):
                found.append(True)
                return DIRENT_ABORT
            return 0

        self._check(self.lib.ext2fs_dir_iterate2(self.fs, ino, 0, None, io.DIR_ENTRY(each), None), f"list {path}")
        return bool(found)

    def _drop_link(self, ino: int, path: str, folder: bool = False) -> None:
        """One name of ``ino`` is gone: its link count goes down (a folder's to 0: its '.' goes with it), and
        with the last one the inode, its extended attribute block and its data blocks are freed."""
        self.freed = True
        buf = self.inode(ino)
        links = 0 if folder else max(_get(buf, "<H", LINKS) - 1, 0)
        struct.pack_into("<H", buf, LINKS, links)
        _times(buf, CTIME)
        if links:
            self.put_inode(ino, buf)
            return
        _times(buf, DTIME)
        self._check(self.lib.ext2fs_free_ext_attr(self.fs, ino, buf), f"free the attributes of {path}")
        if self.lib.ext2fs_inode_has_valid_blocks2(self.fs, buf):
            # ext2fs_punch frees the blocks (extents, block maps or inline data) and writes the inode.
            self._check(self.lib.ext2fs_punch(self.fs, ino, buf, None, 0, (1 << 64) - 1), f"free the blocks of {path}")
        else:
            self.put_inode(ino, buf)
        self.lib.ext2fs_inode_alloc_stats2(self.fs, ino, -1, int(folder))

    def symlink(self, path: str, target: str) -> None:
        parent, name = self._split(path)
        if not target or "\0" in target or len(target.encode()) >= self.sb.block_size:
            raise Refusal(f"the link target of {path} must be 1 to {self.sb.block_size - 1} bytes")
        folder = self.mkdir(parent)
        old = self.entry(folder, name)
        if old is not None:
            if not stat.S_ISLNK(_get(self.inode(old), "<H", MODE)):
                raise Refusal(f"{path} exists and is not a symbolic link")
            self.unlink(path)
        self._into_folder(folder, f"make the link {path}",
                          lambda: self.lib.ext2fs_symlink(self.fs, folder, 0, name.encode(), target.encode()))

    def write_file(self, op: WriteFile) -> None:
        parent, name = self._split(op.path)
        folder = self.mkdir(parent)
        ino = self.entry(folder, name)
        if ino is None:
            ino = self._new_file(folder, name, op)
        elif not stat.S_ISREG(_get(self.inode(ino), "<H", MODE)):
            raise Refusal(f"{op.path} exists and is not a regular file")
        elif _get(self.inode(ino), "<I", FLAGS) & EXT4_INLINE_DATA_FL and op.size > INLINE_MAX:
            raise Refusal(f"{op.path} is kept inside its inode (inline_data): vhdtool does not grow such a file")
        else:
            self._empty(ino, op.path)
        if isinstance(op.data, Source) and not _get(self.inode(ino), "<I", FLAGS) & EXT4_INLINE_DATA_FL:
            self.streamer.write(ino, op.path, op.data)
        else:
            self._fill(ino, op.path, op.data if isinstance(op.data, bytes) else op.data.read(0, op.size))
        buf = self.inode(ino)
        # The size is set here: ext2fs_file_write leaves an inline-data file's size at its i_block's 60 bytes.
        struct.pack_into("<I", buf, SIZE_LO, op.size & 0xFFFFFFFF)
        struct.pack_into("<I", buf, SIZE_HI, op.size >> 32)
        struct.pack_into("<H", buf, MODE, stat.S_IFREG | (op.mode & 0o7777))
        _owner(buf, op.uid, op.gid)
        _times(buf, CTIME, MTIME)
        self.put_inode(ino, buf)

    def _new_file(self, folder: int, name: str, op: WriteFile) -> int:
        """An empty regular file linked as ``name`` in ``folder``, laid out as mke2fs -d lays out a new one."""
        out = ctypes.c_uint32()
        self._check(self.lib.ext2fs_new_inode(self.fs, folder, stat.S_IFREG | op.mode, None, ctypes.byref(out)),
                    f"allocate an inode for {op.path}")
        ino = out.value
        self._into_folder(folder, f"add {op.path}",
                          lambda: self.lib.ext2fs_link(self.fs, folder, name.encode(), ino, EXT2_FT_REG_FILE))
        self.lib.ext2fs_inode_alloc_stats2(self.fs, ino, +1, 0)
        buf = (ctypes.c_char * INODE_BUF)()
        struct.pack_into("<H", buf, MODE, stat.S_IFREG | (op.mode & 0o7777))
        struct.pack_into("<H", buf, LINKS, 1)
        _owner(buf, op.uid, op.gid)
        # Only what fits in i_block is made inline: libext2fs 1.47 crashes growing a new inline file
        # into blocks (ext2fs_file_write -> ext2fs_inline_data_expand).
        inline = bool(self.sb.incompat & INCOMPAT_INLINE_DATA) and op.size <= INLINE_MAX
        if inline:
            struct.pack_into("<I", buf, FLAGS, EXT4_INLINE_DATA_FL)
        elif self.sb.incompat & INCOMPAT_EXTENTS:
            handle = ctypes.c_void_p()
            self._check(self.lib.ext2fs_extent_open2(self.fs, ino, buf, ctypes.byref(handle)),
                        f"start the extent tree of {op.path}")
            self.lib.ext2fs_extent_free(handle)
        self._check(self.lib.ext2fs_write_new_inode(self.fs, ino, buf), f"write the inode of {op.path}")
        if inline:
            self._check(self.lib.ext2fs_inline_data_init(self.fs, ino), f"start the inline data of {op.path}")
        return ino

    def _empty(self, ino: int, path: str) -> None:
        """An existing file's content dropped, its blocks freed."""
        self.freed = True
        handle = ctypes.c_void_p()
        self._check(self.lib.ext2fs_file_open(self.fs, ino, EXT2_FILE_WRITE, ctypes.byref(handle)), f"open {path}")
        try:
            self._check(self.lib.ext2fs_file_set_size2(handle, 0), f"empty {path}")
        finally:
            err = self.lib.ext2fs_file_close(handle)
        self._check(err, f"close {path}")

    def _fill(self, ino: int, path: str, content: bytes) -> None:
        """An empty file's content written from memory (ext2fs_file_write grows the size as it goes; setting
        it again fails on an inline-data file)."""
        handle = ctypes.c_void_p()
        self._check(self.lib.ext2fs_file_open(self.fs, ino, EXT2_FILE_WRITE, ctypes.byref(handle)), f"open {path}")
        try:
            data = ctypes.create_string_buffer(content, len(content)) if content else None
            done, wrote = 0, ctypes.c_uint()
            while done < len(content):
                n = min(WRITE_CHUNK, len(content) - done)
                self._check(self.lib.ext2fs_file_write(handle, ctypes.addressof(data) + done, n, ctypes.byref(wrote)),
                            f"write {path}")
                if wrote.value == 0:
                    raise Refusal(f"libext2fs wrote nothing of {path}")
                done += wrote.value
        finally:
            err = self.lib.ext2fs_file_close(handle)
        self._check(err, f"close {path}")


def _run(volume: _Volume, operations: list) -> None:
    for op in operations:
        if isinstance(op, MakeDir):
            volume.mkdir(op.path)
        elif isinstance(op, Symlink):
            volume.symlink(op.path, op.target)
        elif isinstance(op, Unlink):
            volume.unlink(op.path)
        elif isinstance(op, RemoveDir):
            volume.rmdir(op.path)
        elif isinstance(op, WriteFile):
            volume.write_file(op)
        else:
            raise TypeError(f"not an ext2fs operation: {op!r}")


def _volume_changes(overlay: Overlay, vmap: VolumeMap) -> dict[int, bytes | SourceRange]:
    """The overlay's changed runs and source ranges, cut to the volume's runs of the disk, by disk offset."""
    out = {}
    for e in overlay.changes():
        for lo, hi in vmap.disk_ranges():
            a, b = max(lo, e.offset), min(hi, e.end)
            if a < b:
                out[a] = e.data[a - e.offset : b - e.offset]
    return out


def read_superblock(overlay: Overlay, vmap: VolumeMap, path: str | None, where: str) -> Superblock:
    data = b"".join(overlay.read_at(disk, n) for disk, _at, n in vmap.pieces(SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE))
    return Superblock.parse(data, path, where)


def apply(overlay: Overlay, vmap: VolumeMap, operations: list, label: str, what: str,
          tick: Callable[[], None] | None = None) -> int:
    """Run ``operations`` (WriteFile, MakeDir, Symlink, Unlink, RemoveDir), in order, with libext2fs on the volume ``vmap``
    places on ``overlay``'s disk; the sectors it changes go into ``overlay``. Returns how many bytes changed.

    ``what`` names the volume in messages ("ext4 on partition 1"). Nothing is put into ``overlay``
    unless every operation and the write-back succeeded."""
    sb = read_superblock(overlay, vmap, label, what)
    sb.refuse_unwritable(label, what)
    big = next((op for op in operations if isinstance(op, WriteFile) and isinstance(op.data, bytes)
                and op.size > MAX_BYTES), None)
    if big is not None:
        raise UnsupportedLayout(label, f"{big.path}: {big.size} bytes given in memory is more than vhdtool passes "
                                       f"to libext2fs that way ({MAX_BYTES // MiB} MiB)",
                                "give the file's path (a Source), whose bytes are copied file to file")
    lib = io.bind(label)
    sources = list({id(op.data): op.data for op in operations
                    if isinstance(op, WriteFile) and isinstance(op.data, Source)}.values())
    keep = tuple(d.image.fileno() for d in overlay.base.chain() if d.image is not None and not d.image.closed)
    keep += tuple(src.fileno() for src in sources)

    def job() -> dict:
        before = _volume_changes(overlay, vmap)
        channel = io.OverlayIo(overlay, vmap)
        try:
            volume = _Volume(lib, channel, sb)
            _run(volume, operations)
            free = volume.streamer.free
            volume.close()
        except _VolumeFullHere as e:
            return {"full": str(e)}
        except _UnsupportedHere as e:
            return {"unsupported": str(e)}
        changed = [Extent(at, data) for at, data in sorted(_volume_changes(overlay, vmap).items())
                   if before.get(at) != data]
        held = [e for e in changed if not isinstance(e.data, SourceRange)]
        ranges = [[e.offset, len(e.data), next(i for i, s in enumerate(sources) if s is e.data.source), e.data.offset]
                  for e in changed if isinstance(e.data, SourceRange)]
        return {"extents": len(held), "sources": ranges, "free": free, "payload": encode_extents(held)}

    try:
        head, payload = run_isolated(job, label, library="libext2fs", subject=what, cap=MAX_ANSWER,
                                     timeout=CHILD_TIMEOUT + sum(len(src) for src in sources) / MAPPED_PER_SECOND,
                                     keep_fds=keep, tick=tick)
    except NativeError as e:
        raise CorruptFilesystem(label, f"{what}: {e.problem}", hint=e.hint or RECHECK) from None
    if head.get("full"):
        raise VolumeFull(label, f"{what}: {head['full']}")
    if head.get("unsupported"):
        raise UnsupportedLayout(label, f"{what} carries features the installed libext2fs cannot write "
                                       f"({head['unsupported']}; {sb.features_text()})",
                                "vhdtool writes only what e2fsprogs 1.47 knows; change it from inside the guest")
    extents = decode_extents(payload or b"", vmap.holds, overlay.logical_sector_size, label, "libext2fs")
    if len(extents) != head.get("extents"):
        raise CorruptFilesystem(label, "the libext2fs child sent a malformed answer")
    ranges = decode_sources(head.get("sources", []), sources, vmap.holds, overlay.logical_sector_size, label,
                            "libext2fs")
    free = old_free_ranges(overlay, vmap, sb.block_size, decode_runs(head.get("free", []), label, "libext2fs"))
    for e in extents:
        overlay.write_at(e.offset, e.data)
    for e in ranges:
        overlay.write_source(e.offset, e.data)
        # Data in blocks the old volume leaves free: nothing of the old state reads it (the VHDX writer may
        # put it in place before its log). Only inside a source range this check accepted.
        for lo, hi in free:
            a, b = max(lo, e.offset), min(hi, e.end)
            if a < b:
                overlay.mark_unreachable(a, b - a)
    return sum(len(e.data) for e in extents + ranges)
