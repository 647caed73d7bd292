"""The ext2/3/4 superblock fields a writer must check first (ext4 disk layout, "The Super Block"), and the refusals.

Read with our own bounded parsing: 1024 bytes at byte 1024 of the volume, every field at a
fixed offset inside them. A volume is written only when it was unmounted cleanly: no journal
to replay, no orphan inode to finish deleting, no error recorded.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vhdtool.errors import CorruptFilesystem, GuestNotClean, UnsupportedLayout

SUPERBLOCK_OFFSET = 1024
SUPERBLOCK_SIZE = 1024
EXT2_MAGIC = 0xEF53
VALID_FS, ERROR_FS, ORPHAN_FS = 0x1, 0x2, 0x4  # s_state
COMPAT_ORPHAN_FILE = 0x1000
INCOMPAT_RECOVER, INCOMPAT_JOURNAL_DEV, INCOMPAT_EXTENTS = 0x4, 0x8, 0x40
INCOMPAT_64BIT, INCOMPAT_MMP, INCOMPAT_INLINE_DATA = 0x80, 0x100, 0x8000
RO_COMPAT_QUOTA, RO_COMPAT_BIGALLOC, RO_COMPAT_ORPHAN_PRESENT = 0x100, 0x200, 0x10000
RECHECK = "boot the guest once and shut it down cleanly, or run e2fsck -f on the volume, then try again"


@dataclass(frozen=True)
class Superblock:
    state: int
    error_count: int
    compat: int
    incompat: int
    ro_compat: int
    last_orphan: int
    block_size: int
    inode_size: int
    free_blocks: int = 0  # s_free_blocks_count (hi half with 64bit): exact after a clean unmount

    @classmethod
    def parse(cls, data: bytes, path: str | None, where: str) -> Superblock:
        if len(data) < SUPERBLOCK_SIZE or struct.unpack_from("<H", data, 56)[0] != EXT2_MAGIC:
            raise CorruptFilesystem(path, f"{where} holds no ext2/3/4 superblock")
        log_block = struct.unpack_from("<I", data, 24)[0]
        state, _errors = struct.unpack_from("<HH", data, 58)
        rev = struct.unpack_from("<I", data, 76)[0]
        inode_size = struct.unpack_from("<H", data, 88)[0] if rev else 128
        compat, incompat, ro_compat = struct.unpack_from("<III", data, 92)
        if log_block > 6 or inode_size < 128 or inode_size & (inode_size - 1):
            raise CorruptFilesystem(path, f"the ext2/3/4 superblock of {where} is damaged",
                                    "run e2fsck on the volume")
        free = struct.unpack_from("<I", data, 12)[0]
        if incompat & INCOMPAT_64BIT:
            free += struct.unpack_from("<I", data, 0x158)[0] << 32
        return cls(state=state, error_count=struct.unpack_from("<I", data, 404)[0], compat=compat,
                   incompat=incompat, ro_compat=ro_compat, last_orphan=struct.unpack_from("<I", data, 232)[0],
                   block_size=1024 << log_block, inode_size=inode_size, free_blocks=free)

    def refuse_unwritable(self, path: str | None, where: str) -> None:
        """GuestNotClean unless the volume was unmounted cleanly; UnsupportedLayout for what is never written."""
        if self.incompat & INCOMPAT_RECOVER:
            raise GuestNotClean(path, f"{where} needs journal recovery (it was not unmounted cleanly)", RECHECK)
        if self.last_orphan or self.state & ORPHAN_FS or self.ro_compat & RO_COMPAT_ORPHAN_PRESENT:
            raise GuestNotClean(path, f"{where} has orphan inodes (files deleted while open when it was last "
                                      "mounted) waiting to be freed", RECHECK)
        if self.state & ERROR_FS or self.error_count:
            raise GuestNotClean(path, f"{where} records filesystem errors", RECHECK)
        if not self.state & VALID_FS:
            raise GuestNotClean(path, f"{where} was not unmounted cleanly", RECHECK)
        if self.incompat & INCOMPAT_JOURNAL_DEV:
            raise UnsupportedLayout(path, f"{where} is an external journal device, not a filesystem",
                                    "give the partition that holds the filesystem")
        if self.ro_compat & RO_COMPAT_QUOTA:
            # libext2fs's own writes do not update the quota files (e2fsprogs keeps that code out of the library):
            # the usage they record would no longer match.
            raise UnsupportedLayout(path, f"{where} keeps disk quotas (the quota feature), which vhdtool cannot "
                                          "keep up to date", "change the guest from inside it")
        if self.incompat & INCOMPAT_MMP:
            raise UnsupportedLayout(path, f"{where} uses multiple-mount protection (mmp): vhdtool does not write it",
                                    "turn mmp off in the guest (tune2fs -O ^mmp) and try again")

    def features_text(self) -> str:
        return f"compat 0x{self.compat:x}, incompat 0x{self.incompat:x}, ro_compat 0x{self.ro_compat:x}"


def blocks_needed(size: int, block_size: int) -> int:
    """Blocks a ``size``-byte file takes: its data, and an estimate of its map (a block of map per
    block_size/4 data blocks, the double and triple indirect blocks, and a few to spare)."""
    data = -(-size // block_size)
    per = block_size // 4
    return data + -(-data // per) + -(-data // (per * per)) + 3 if data else 0
