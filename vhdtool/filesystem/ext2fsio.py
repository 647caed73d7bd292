"""libext2fs (e2fsprogs 1.47, ``libext2fs.so.2``) through ctypes: its entry points, and an I/O manager over an overlay.

The I/O manager is ``struct struct_io_manager`` of ext2_io.h, its channel ``struct
struct_io_channel``; both are laid out here field for field as e2fsprogs 1.47.0 declares
them (the 64-bit block callbacks, ``discard``, ``cache_readahead`` and ``zeroout`` after
``get_stats``, 14 reserved longs). Every callback is Python: byte ``pos`` of the volume is
found through a VolumeMap (a partition, or the segments of a linear LVM volume) and read
from or written into the overlay. A callback returns an error code instead of raising into C.
"""

from __future__ import annotations

import ctypes

from vhdtool.container.overlay import Overlay
from vhdtool.errors import CorruptFilesystem, MissingLibrary, NativeError
from vhdtool.native import Refusal, bind_library, load_library
from vhdtool.native.libraries import LIBCOM_ERR, LIBEXT2FS
from vhdtool.volume.mapping import VolumeMap

LIBRARY, COM_ERR = LIBEXT2FS, LIBCOM_ERR

# ext2_err.h (e2fsprogs 1.47.0): the error table starts at EXT2_ET_BASE.
EXT2_ET_BASE = 2133571328
EXT2_ET_MAGIC_IO_CHANNEL = EXT2_ET_BASE + 5
EXT2_ET_MAGIC_IO_MANAGER = EXT2_ET_BASE + 7
EXT2_ET_SHORT_READ = EXT2_ET_BASE + 36
EXT2_ET_SHORT_WRITE = EXT2_ET_BASE + 37
EXT2_ET_DIR_NO_SPACE = EXT2_ET_BASE + 38
EXT2_ET_UNSUPP_FEATURE = EXT2_ET_BASE + 67
EXT2_ET_RO_UNSUPP_FEATURE = EXT2_ET_BASE + 68
EXT2_ET_INVALID_ARGUMENT = EXT2_ET_BASE + 71
EXT2_ET_BLOCK_ALLOC_FAIL = EXT2_ET_BASE + 72
EXT2_ET_INODE_ALLOC_FAIL = EXT2_ET_BASE + 73
EXT2_ET_FILE_NOT_FOUND = EXT2_ET_BASE + 76
EXT2_ET_UNIMPLEMENTED = EXT2_ET_BASE + 80
EXT2_ET_DIR_NO_SPACE_FOR_CSUM = EXT2_ET_BASE + 149
EXT2_ET_EXTENT_NO_NEXT = EXT2_ET_BASE + 124
FULL = (EXT2_ET_BLOCK_ALLOC_FAIL, EXT2_ET_INODE_ALLOC_FAIL)


class VolumeFullHere(Refusal):
    """In the child: libext2fs found no free block or inode; the parent raises VolumeFull."""


class UnsupportedHere(Refusal):
    """In the child: libext2fs does not know a feature of the volume; the parent raises UnsupportedLayout."""

errcode_t = ctypes.c_long
c_void = ctypes.c_void_p
u64 = ctypes.c_ulonglong
OPEN = ctypes.CFUNCTYPE(errcode_t, ctypes.c_char_p, ctypes.c_int, ctypes.POINTER(c_void))
CLOSE = ctypes.CFUNCTYPE(errcode_t, c_void)
SET_BLKSIZE = ctypes.CFUNCTYPE(errcode_t, c_void, ctypes.c_int)
BLOCK_IO = ctypes.CFUNCTYPE(errcode_t, c_void, ctypes.c_ulong, ctypes.c_int, c_void)
FLUSH = ctypes.CFUNCTYPE(errcode_t, c_void)
SET_OPTION = ctypes.CFUNCTYPE(errcode_t, c_void, ctypes.c_char_p, ctypes.c_char_p)
BLOCK_IO64 = ctypes.CFUNCTYPE(errcode_t, c_void, u64, ctypes.c_int, c_void)
# ext2fs_dir_iterate2's callback: (dir, entry, struct ext2_dir_entry *, offset, blocksize, buf, priv) -> DIRENT_* flags
DIR_ENTRY = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_uint32, ctypes.c_int, c_void, ctypes.c_int, ctypes.c_int, c_void,
                             c_void)


class IoChannel(ctypes.Structure):  # struct struct_io_channel
    _fields_ = [("magic", errcode_t), ("manager", c_void), ("name", ctypes.c_char_p), ("block_size", ctypes.c_int),
                ("read_error", c_void), ("write_error", c_void), ("refcount", ctypes.c_int), ("flags", ctypes.c_int),
                ("reserved", ctypes.c_long * 14), ("private_data", c_void), ("app_data", c_void),
                ("align", ctypes.c_int)]


class IoManager(ctypes.Structure):  # struct struct_io_manager
    _fields_ = [("magic", errcode_t), ("name", ctypes.c_char_p), ("open", OPEN), ("close", CLOSE),
                ("set_blksize", SET_BLKSIZE), ("read_blk", BLOCK_IO), ("write_blk", BLOCK_IO), ("flush", FLUSH),
                ("write_byte", BLOCK_IO), ("set_option", SET_OPTION), ("get_stats", c_void),
                ("read_blk64", BLOCK_IO64), ("write_blk64", BLOCK_IO64), ("discard", c_void),
                ("cache_readahead", c_void), ("zeroout", c_void), ("reserved", ctypes.c_long * 14)]


class OverlayIo:
    """One I/O manager and its channel: byte ``pos`` of the volume is where ``vmap`` puts it in ``overlay``."""

    def __init__(self, overlay: Overlay, vmap: VolumeMap):
        self.overlay = overlay
        self.vmap = vmap
        self.channel = IoChannel()
        self.manager = IoManager(
            magic=EXT2_ET_MAGIC_IO_MANAGER, name=b"vhdtool overlay", open=OPEN(self._open), close=CLOSE(self._close),
            set_blksize=SET_BLKSIZE(self._set_blksize), read_blk=BLOCK_IO(self._read), write_blk=BLOCK_IO(self._write),
            flush=FLUSH(lambda _ch: 0), write_byte=BLOCK_IO(self._write_byte),
            set_option=SET_OPTION(lambda _ch, _opt, _arg: EXT2_ET_INVALID_ARGUMENT),
            read_blk64=BLOCK_IO64(self._read), write_blk64=BLOCK_IO64(self._write),
        )

    def _open(self, _name, _flags, out):
        ch = self.channel
        ctypes.memset(ctypes.addressof(ch), 0, ctypes.sizeof(ch))
        ch.magic = EXT2_ET_MAGIC_IO_CHANNEL
        ch.manager = ctypes.addressof(self.manager)
        ch.name = b"vhdtool"
        ch.block_size = 1024
        ch.refcount = 1
        out[0] = ctypes.addressof(ch)
        return 0

    def _close(self, _ch):
        self.channel.refcount -= 1  # the channel's memory is ours: nothing to free
        return 0

    def _set_blksize(self, _ch, size):
        if size <= 0:
            return EXT2_ET_INVALID_ARGUMENT
        self.channel.block_size = size
        return 0

    def _span(self, block: int, count: int) -> tuple[int, int]:
        """(offset, length) of ``count`` blocks at ``block``; a negative count is a length in bytes (ext2_io.h)."""
        size = -count if count < 0 else count * self.channel.block_size
        return block * self.channel.block_size, size

    def _read(self, _ch, block, count, data):
        try:
            offset, size = self._span(block, count)
            if offset + size > self.vmap.size:
                ctypes.memset(data, 0, size)
                return EXT2_ET_SHORT_READ
            for disk, at, n in self.vmap.pieces(offset, size):
                piece = self.overlay.read_at(disk, n)
                if len(piece) != n:
                    return EXT2_ET_SHORT_READ
                ctypes.memmove(data + at, piece, n)
            return 0
        except Exception:  # noqa: BLE001 - never raise into C
            return EXT2_ET_SHORT_READ

    def _write(self, _ch, block, count, data):
        offset, size = self._span(block, count)
        return self._put(offset, size, data)

    def _write_byte(self, _ch, offset, size, data):
        return self._put(offset, size, data)

    def _put(self, offset: int, size: int, data: int) -> int:
        try:
            if size < 0 or offset + size > self.vmap.size:
                return EXT2_ET_SHORT_WRITE
            for disk, at, n in self.vmap.pieces(offset, size):
                new = ctypes.string_at(data + at, n)
                # libext2fs writes every initialised group's bitmaps and every descriptor block (and their backups)
                # back at close, most of them unchanged: only a changed block takes a page of the child's memory.
                if self.overlay.read_at(disk, n) != new:
                    self.overlay.write_at(disk, new)
            return 0
        except Exception:  # noqa: BLE001
            return EXT2_ET_SHORT_WRITE


def bind(label: str | None) -> ctypes.CDLL:
    """libext2fs with the entry points vhdtool calls typed, once per process."""
    try:
        return bind_library(LIBRARY, label, _bind)
    except MissingLibrary:
        raise  # its own code (14): install the package it names
    except NativeError as e:
        raise CorruptFilesystem(label, e.problem, hint=e.hint) from None


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    c, ino, s = c_void, ctypes.c_uint32, ctypes.c_char_p
    pino = ctypes.POINTER(ino)
    for name, restype, argtypes in (
        ("ext2fs_open2", errcode_t, [s, s, ctypes.c_int, ctypes.c_int, ctypes.c_uint, c, ctypes.POINTER(c)]),
        ("ext2fs_read_bitmaps", errcode_t, [c]),
        ("ext2fs_close2", errcode_t, [c, ctypes.c_int]),
        ("ext2fs_free", None, [c]),
        ("ext2fs_namei_follow", errcode_t, [c, ino, ino, s, pino]),
        ("ext2fs_lookup", errcode_t, [c, ino, s, ctypes.c_int, c, pino]),
        ("ext2fs_mkdir", errcode_t, [c, ino, ino, s]),
        ("ext2fs_expand_dir", errcode_t, [c, ino]),
        ("ext2fs_dir_iterate2", errcode_t, [c, ino, ctypes.c_int, c, DIR_ENTRY, c]),
        ("ext2fs_symlink", errcode_t, [c, ino, ino, s, s]),
        ("ext2fs_link", errcode_t, [c, ino, s, ino, ctypes.c_int]),
        ("ext2fs_unlink", errcode_t, [c, ino, s, ino, ctypes.c_int]),
        ("ext2fs_new_inode", errcode_t, [c, ino, ctypes.c_int, c, pino]),
        ("ext2fs_write_new_inode", errcode_t, [c, ino, c]),
        ("ext2fs_read_inode_full", errcode_t, [c, ino, c, ctypes.c_int]),
        ("ext2fs_write_inode_full", errcode_t, [c, ino, c, ctypes.c_int]),
        ("ext2fs_inode_alloc_stats2", None, [c, ino, ctypes.c_int, ctypes.c_int]),
        ("ext2fs_inode_has_valid_blocks2", ctypes.c_int, [c, c]),
        ("ext2fs_punch", errcode_t, [c, ino, c, c, u64, u64]),
        ("ext2fs_free_ext_attr", errcode_t, [c, ino, c]),
        ("ext2fs_extent_open2", errcode_t, [c, ino, c, ctypes.POINTER(c)]),
        ("ext2fs_extent_free", None, [c]),
        ("ext2fs_inline_data_init", errcode_t, [c, ino]),
        ("ext2fs_file_open", errcode_t, [c, ino, ctypes.c_int, ctypes.POINTER(c)]),
        ("ext2fs_file_write", errcode_t, [c, c, ctypes.c_uint, ctypes.POINTER(ctypes.c_uint)]),
        ("ext2fs_file_set_size2", errcode_t, [c, u64]),
        ("ext2fs_file_close", errcode_t, [c]),
        # streaming (vhdtool.filesystem.ext2stream): blocks allocated without data, and the old bitmap
        ("ext2fs_fallocate", errcode_t, [c, ctypes.c_int, ino, c, u64, u64, u64]),
        ("ext2fs_new_range", errcode_t, [c, ctypes.c_int, u64, u64, c, ctypes.POINTER(u64), ctypes.POINTER(u64)]),
        ("ext2fs_block_alloc_stats_range", None, [c, u64, ctypes.c_uint, ctypes.c_int]),
        ("ext2fs_iblk_add_blocks", errcode_t, [c, c, u64]),
        ("ext2fs_bmap2", errcode_t, [c, ino, c, c, ctypes.c_int, u64, c, ctypes.POINTER(u64)]),
        ("ext2fs_extent_get", errcode_t, [c, ctypes.c_int, c]),
        ("ext2fs_extent_replace", errcode_t, [c, ctypes.c_int, c]),
        ("ext2fs_copy_bitmap", errcode_t, [c, ctypes.POINTER(c)]),
        ("ext2fs_free_block_bitmap", None, [c]),
        ("ext2fs_get_block_bitmap_range2", errcode_t, [c, u64, ctypes.c_size_t, c]),
        ("ext2fs_mark_block_bitmap_range2", None, [c, u64, ctypes.c_uint]),
        ("ext2fs_unmark_block_bitmap_range2", None, [c, u64, ctypes.c_uint]),
        ("ext2fs_find_first_set_block_bitmap2", errcode_t, [c, u64, u64, ctypes.POINTER(u64)]),
        ("ext2fs_find_first_zero_block_bitmap2", errcode_t, [c, u64, u64, ctypes.POINTER(u64)]),
        ("ext2fs_free_blocks_count", u64, [c]),
        ("initialize_ext2_error_table", None, []),
    ):
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
    return lib


def error_text(code: int) -> str:
    """com_err's text for a libext2fs error code (or errno), for messages."""
    try:
        lib = load_library(LIBRARY)
        com_err = load_library(COM_ERR)
        lib.initialize_ext2_error_table()
        com_err.error_message.restype = ctypes.c_char_p
        com_err.error_message.argtypes = [errcode_t]
        return com_err.error_message(code).decode("utf-8", "replace")
    except Exception:  # noqa: BLE001 - a message is all this is for
        return f"libext2fs error {code}"
