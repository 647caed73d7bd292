"""The edit session's ext2/3/4 volumes: which volume a path goes to, what is there as the session leaves it, and
the operations, collected and then run through libext2fs (vhdtool.filesystem.ext2fs) into the session's overlay.

A Linux guest's root filesystem is the volume without ``partition``; ``partition=N`` names an ext2/3/4
partition, or an LVM physical volume whose (linear) logical volume holds ext2/3/4, the guest's root
one first. Each operation that would change nothing (a file already holding the bytes, mode and owner
asked for; a link already pointing at its target; a missing path to remove) is no operation: running
the same edit again commits nothing. Refusals come before anything is written: a volume not unmounted
cleanly, a non-linear LVM volume, XFS, and what is not a file or link where one is to be replaced.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from vhdtool.container.overlay import Overlay
from vhdtool.container.source import READ_CHUNK, Source
from vhdtool.editor.changes import FileChange
from vhdtool.errors import GuestNotClean, UnsupportedLayout, VolumeFull
from vhdtool.filesystem.extsuper import INCOMPAT_INLINE_DATA, RECHECK, RO_COMPAT_BIGALLOC, blocks_needed
from vhdtool.filesystem.linuxfs import Entry, LinuxFilesystem, open_linux_filesystem
from vhdtool.guest.inspection import Inspection, require_guest
from vhdtool.units import MiB
from vhdtool.volume import Partition, open_partition, sniff_filesystem
from vhdtool.volume.lvm import logical_volumes
from vhdtool.volume.mapping import VolumeMap

EXT = ("ext2", "ext3", "ext4")
WRITES = "vhdtool writes ext2/3/4 and NTFS volumes only"
VERITY_FL = 0x100000  # EXT4_VERITY_FL: a file sealed by fs-verity
EXT_NAME_MAX = 255  # bytes in one name of a folder entry (ext4 disk layout, "Directory Entries")


def _ext2fs():
    """vhdtool.filesystem.ext2fs, imported when an ext2/3/4 volume is first used (an NTFS edit never does)."""
    from vhdtool.filesystem import ext2fs

    return ext2fs


@dataclass(frozen=True)
class ExtVolume:
    index: int  # the partition (the physical volume, for LVM)
    label: str  # "partition 1", "LVM volume vg0/root on partition 1"
    vmap: VolumeMap
    fs: LinuxFilesystem  # read through the overlay


def ext_path(path: str) -> str:
    parts = [x for x in path.strip().split("/") if x]
    if not path.strip().startswith("/") or any(x in (".", "..") for x in parts):
        raise UnsupportedLayout(None, f"{path}: give an absolute Linux path without '.' or '..'")
    return "/" + "/".join(parts)


class ExtEdits:
    """The ext2/3/4 side of one edit session; ``files`` is the session's list of file changes, appended to."""

    def __init__(self, path: str, overlay: Overlay, inspection: Inspection, files: list[FileChange]):
        self.path = path
        self.overlay = overlay
        self.inspection = inspection
        self.files = files
        self._volumes: dict[int | None, ExtVolume] = {}
        self._ops: dict[str, tuple[ExtVolume, list]] = {}  # volume label -> (volume, operations in order)
        self._free: dict[str, int] = {}  # volume label -> free blocks left for this session's writes

    def wants(self, partition: int | None) -> bool:
        """Whether a path on ``partition`` (None: the guest's system volume) is on a Linux filesystem."""
        if partition is None:
            return self.inspection.guest.os == "linux"
        part = next((p for p in self.inspection.partitions if p.index == partition), None)
        return part is not None and part.filesystem in (*EXT, "xfs", "lvm2")

    # -- the volume ------------------------------------------------------------------------
    def volume(self, partition: int | None) -> ExtVolume:
        if partition not in self._volumes:
            self._volumes[partition] = self._find(partition)
        return self._volumes[partition]

    def _find(self, partition: int | None) -> ExtVolume:
        ins = self.inspection
        if partition is None:
            require_guest(ins, "give --partition N to write into one of its volumes (see `vhdtool inspect`)")
            linux = ins.guest.linux
            if ins.guest.os != "linux" or linux is None:
                raise UnsupportedLayout(self.path, "symbolic links and Linux file modes are written only on ext2/3/4",
                                        "give --partition N of an ext2/3/4 volume")
            partition = linux.root_partition
        part = next((p for p in ins.partitions if p.index == partition), None)
        if part is None:
            raise UnsupportedLayout(self.path, f"the disk has no partition {partition}",
                                    "see `vhdtool inspect` for the partitions")
        found = self._candidates(part)
        if not found:
            raise UnsupportedLayout(self.path, f"partition {partition} holds {part.filesystem or 'no filesystem'}: "
                                               f"{WRITES}", "give an ext2/3/4 partition")
        from vhdtool.guest.linux import is_linux_root

        roots = [v for v in found if is_linux_root(v.fs)]
        if len(found) > 1 and len(roots) != 1:
            raise UnsupportedLayout(self.path, f"partition {partition} holds several ext2/3/4 volumes "
                                               f"({', '.join(v.label for v in found)}) and vhdtool cannot tell which "
                                               "is meant", "write into the guest's root volume without --partition")
        return roots[0] if len(found) > 1 else found[0]

    def _candidates(self, part: Partition) -> list[ExtVolume]:
        if part.filesystem in EXT:
            vmap = VolumeMap.whole(part.offset, part.size)
            label = f"partition {part.index}"
            return [ExtVolume(part.index, label, vmap, self._reader(vmap, part.filesystem, label))]
        if part.filesystem != "lvm2":
            return []
        out, other = [], []
        for lv in logical_volumes(open_partition(self.overlay, part), self.path, f"partition {part.index}"):
            label = f"{lv.label} on partition {part.index}"
            kind = None
            if lv.stream is not None:
                lv.stream.seek(0)
                kind = sniff_filesystem(lv.stream.read(8192))
            if lv.pv_map is None:
                other.append(f"{label} is {lv.layout}")
            elif kind in EXT:
                vmap = lv.pv_map.shifted(part.offset)
                out.append(ExtVolume(part.index, label, vmap, self._reader(vmap, kind, label)))
        if not out and other:
            raise UnsupportedLayout(self.path, f"{other[0]}: vhdtool writes only linear LVM volumes",
                                    "make it a linear volume in the guest (lvconvert), or change it from inside")
        return out

    def _reader(self, vmap: VolumeMap, kind: str, label: str) -> LinuxFilesystem:
        # Refused now, not at the commit: what the caller decides next depends on it.
        what = f"{kind} on {label}"
        sb = _ext2fs().read_superblock(self.overlay, vmap, self.path, what)
        sb.refuse_unwritable(self.path, what)
        # dissect.extfs reads a folder kept inside its inode as endless empty entries, and no bigalloc
        # volume at all: what is there (and so whether an edit changes anything) cannot be known.
        unreadable = ("keeps small files and folders inside their inodes (inline_data)"
                      if sb.incompat & INCOMPAT_INLINE_DATA else
                      "allocates blocks in clusters (bigalloc)" if sb.ro_compat & RO_COMPAT_BIGALLOC else None)
        if unreadable:
            raise UnsupportedLayout(self.path, f"{what} {unreadable}, which vhdtool cannot read",
                                    "change the guest from inside it")
        fs = open_linux_filesystem(vmap.open(self.overlay), kind, self.path, label)
        if fs.journal_start():
            # e2fsck offers to replay such a journal ("needs_recovery flag is clear, but journal has data"):
            # its old blocks would land over what vhdtool writes.
            raise GuestNotClean(self.path, f"{what} has transactions in its journal though it is marked clean",
                                RECHECK)
        return fs

    # -- state as this session's operations leave it -------------------------------------------
    def _pending(self, vol: ExtVolume, target: str) -> list:
        ops = self._ops.get(vol.label, (vol, []))[1]
        return [op for op in ops if op.path == target or op.path.startswith(target + "/")
                or target.startswith(op.path + "/")]

    def _state(self, vol: ExtVolume, target: str) -> str | None:
        """"file", "dir", "link", "other" or None for ``target`` (its last symlink not followed)."""
        ext2fs = _ext2fs()
        entry = vol.fs.entry(target)
        state = entry.kind if entry is not None else None
        for op in self._pending(vol, target):
            if op.path != target:
                state = "dir" if op.path.startswith(target + "/") else state
            elif isinstance(op, (ext2fs.Unlink, ext2fs.RemoveDir)):
                state = None
            else:
                state = {ext2fs.MakeDir: "dir", ext2fs.Symlink: "link", ext2fs.WriteFile: "file"}[type(op)]
        return state

    def _add(self, vol: ExtVolume, op, change: FileChange) -> FileChange:
        self._ops.setdefault(vol.label, (vol, []))[1].append(op)
        self.files.append(change)
        return change

    # -- operations -------------------------------------------------------------------------
    def write_file(self, path: str, data: bytes | Source, partition: int | None, mode: int | None,
                   uid: int | None, gid: int | None) -> FileChange | None:
        """A file written; a Source's bytes are never read into memory (compared a chunk at a time, copied
        file to file at the commit), and its FileChange's digest is the session's to fill in."""
        vol, target = self.volume(partition), self._target(path)
        if not isinstance(data, Source):
            data = bytes(data)
        state = self._state(vol, target)
        if state not in (None, "file"):
            raise UnsupportedLayout(self.path, f"{path} is a {self._kind(state)} in the guest", "give a file path")
        if state is None:
            self._refuse_new_path(vol, target)
        entry = vol.fs.entry(target) if state == "file" and not self._pending(vol, target) else None
        if entry is not None and entry.flags & VERITY_FL:
            # Its Merkle tree (past its end) would no longer match: the guest's kernel could not read the file.
            raise UnsupportedLayout(self.path, f"{path} is sealed by fs-verity, so its content cannot change",
                                    "remove or replace it from inside the guest")
        mode = mode if mode is not None else (entry.mode if entry is not None else 0o644)
        uid = uid if uid is not None else (entry.uid if entry is not None else 0)
        gid = gid if gid is not None else (entry.gid if entry is not None else 0)
        if entry is not None and (entry.mode, entry.uid, entry.gid) == (mode, uid, gid) and entry.size == len(data) \
                and self._holds(vol, target, data):
            return None
        self._check_room(vol, target, entry.size if state == "file" and entry is not None else 0, len(data))
        op = _ext2fs().WriteFile(target, data, mode, uid, gid)
        digest = None if isinstance(data, Source) else hashlib.sha256(data).hexdigest()
        return self._add(vol, op, FileChange(target, "add" if state is None else "replace", len(data), digest,
                                             vol.index))

    @staticmethod
    def _holds(vol: ExtVolume, target: str, data: bytes | Source) -> bool:
        if not isinstance(data, Source):
            return vol.fs.read(target, len(data) + 1) == data
        f = vol.fs.open(target)
        return data.same_bytes(iter(lambda: f.read(READ_CHUNK), b""))

    def _check_room(self, vol: ExtVolume, target: str, old_size: int, size: int) -> None:
        """VolumeFull, before anything is written, when the volume's free blocks (the superblock's count, less
        what this session's writes there take; a replaced file's blocks count as free) cannot hold ``size``
        bytes and their block map."""
        sb = _ext2fs().read_superblock(self.overlay, vol.vmap, self.path, vol.label)
        free = self._free.setdefault(vol.label, sb.free_blocks)
        need = blocks_needed(size, sb.block_size) - old_size // sb.block_size
        if need > free:
            raise VolumeFull(self.path, f"{target} needs {need * sb.block_size // MiB + 1} MiB and {vol.label} has "
                                        f"{free * sb.block_size // MiB} MiB free")
        self._free[vol.label] = free - max(need, 0)

    def mkdir(self, path: str, partition: int | None) -> FileChange | None:
        vol, target = self.volume(partition), self._target(path)
        state = self._state(vol, target)
        if state == "dir" or (state == "link" and vol.fs.is_dir(target)):
            return None
        if state is not None:
            raise UnsupportedLayout(self.path, f"{path} is a {self._kind(state)} in the guest", "give a folder path")
        self._refuse_new_path(vol, target)
        return self._add(vol, _ext2fs().MakeDir(target), FileChange(target, "mkdir", None, None, vol.index))

    def symlink(self, path: str, target_text: str, partition: int | None) -> FileChange | None:
        vol, target = self.volume(partition), self._target(path)
        state = self._state(vol, target)
        if state not in (None, "link"):
            raise UnsupportedLayout(self.path, f"{path} is a {self._kind(state)} in the guest, not a symbolic link",
                                    "remove it in the guest first")
        if state == "link" and not self._pending(vol, target) and vol.fs.entry(target).link == target_text:
            return None
        if state is None:
            self._refuse_new_path(vol, target)
        return self._add(vol, _ext2fs().Symlink(target, target_text),
                         FileChange(target, "symlink", None, None, vol.index, target=target_text))

    def unlink(self, path: str, partition: int | None) -> FileChange | None:
        vol, target = self.volume(partition), self._target(path)
        state = self._state(vol, target)
        if state is None:
            return None
        if state == "dir":
            raise UnsupportedLayout(self.path, f"{path} is a folder: vhdtool removes only files and symbolic links "
                                               "on Linux volumes")
        # A link removed is reported with what it pointed to (a link this session made has no old target).
        entry = vol.fs.entry(target) if state == "link" and not self._pending(vol, target) else None
        return self._add(vol, _ext2fs().Unlink(target), FileChange(target, "delete", None, None, vol.index,
                                                                target=entry.link if entry is not None else None))

    def rmdir(self, path: str, partition: int | None, if_empty: bool = False) -> FileChange | None:
        """Remove a folder this session leaves empty (its entries on disk all removed, nothing made in it); a
        folder not left empty is refused, or with ``if_empty`` kept (None)."""
        vol, target = self.volume(partition), self._target(path)
        state = self._state(vol, target)
        if state is None:
            return None
        if state != "dir" or vol.fs.readlink(target) is not None:
            raise UnsupportedLayout(self.path, f"{path} is a {self._kind(state)} in the guest, not a folder")
        names = vol.fs.listdir(target) if vol.fs.is_dir(target) else []
        left = [f"{target}/{n}" for n in names if self._state(vol, f"{target}/{n}") is not None]
        left += [op.path for op in self._pending(vol, target) if op.path.startswith(target + "/")
                 and not isinstance(op, (_ext2fs().Unlink, _ext2fs().RemoveDir))]
        if left and if_empty:
            return None
        if left:
            raise UnsupportedLayout(self.path, f"{path} is not empty ({left[0]} is in it)", "remove what is in it first")
        return self._add(vol, _ext2fs().RemoveDir(target), FileChange(target, "rmdir", None, None, vol.index))

    def _refuse_new_path(self, vol: ExtVolume, target: str) -> None:
        """Refuse a new path that libext2fs would stop at inside the commit, or write as the guest cannot use it.

        Its nearest parent that is there must be a folder (or a link to one), not a file or a dangling link;
        and a case-insensitive folder must not hold its name in another case already (libext2fs, comparing
        bytes, would add a second entry the guest's kernel cannot tell from the first)."""
        folder = target.rpartition("/")[0]
        while folder:
            state = self._state(vol, folder)
            if state == "dir" or (state == "link" and (vol.fs.is_dir(folder) or self._pending(vol, folder))):
                break
            if state is not None:
                what = "symbolic link that leads to no folder" if state == "link" else self._kind(state)
                raise UnsupportedLayout(self.path, f"{folder} is a {what} in the guest, not a folder",
                                        "remove it in the guest first")
            folder = folder.rpartition("/")[0]
        folder, _, name = target.rpartition("/")
        twin = vol.fs.case_twin(folder or "/", name)
        if twin is not None:
            raise UnsupportedLayout(self.path, f"{target}: the case-insensitive folder {folder or '/'} already holds "
                                               f"{twin}", f"give the name as the guest has it ({folder}/{twin})")

    def _target(self, path: str) -> str:
        try:
            target = ext_path(path)
        except UnsupportedLayout as e:
            raise UnsupportedLayout(self.path, e.problem, e.hint) from None
        if target == "/":
            raise UnsupportedLayout(self.path, f"{path} names the root folder", "give a path under it")
        long = next((p for p in target.split("/") if len(p.encode()) > EXT_NAME_MAX), None)
        if long is not None:  # refused now: libext2fs would meet it inside the commit
            raise UnsupportedLayout(self.path, f"{path}: the name {long[:40]}... is longer than ext4's {EXT_NAME_MAX} "
                                               "bytes", "give a shorter name")
        return target

    @staticmethod
    def _kind(state: str) -> str:
        return {"file": "file", "dir": "folder", "link": "symbolic link"}.get(state, "special file")

    def filesystem(self, partition: int | None) -> LinuxFilesystem:
        return self.volume(partition).fs

    def entry(self, path: str, partition: int | None = None) -> Entry | None:
        return self.volume(partition).fs.entry(self._target(path))

    # -- the commit -------------------------------------------------------------------------
    def run(self) -> None:
        """Every volume's operations through libext2fs, into the overlay."""
        from vhdtool.progress import phase, size_text

        for vol, ops in self._ops.values():
            amount = sum(op.size for op in ops if isinstance(op, _ext2fs().WriteFile))
            what = f"{vol.fs.kind} on {vol.label}"
            with phase(f"writing {size_text(amount)} to {vol.label} (libext2fs)", amount) as progress:
                _ext2fs().apply(self.overlay, vol.vmap, ops, self.path, what, tick=progress.tick)
        self._ops.clear()
