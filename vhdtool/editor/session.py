"""The edit session: refusals first, then operations into an overlay, then one commit (see the package docstring)."""

from __future__ import annotations

import os
from dataclasses import replace

from vhdtool.container.chain import open_image
from vhdtool.container.commit import commit as commit_changes
from vhdtool.container.overlay import Overlay
from vhdtool.container.source import READ_CHUNK, Source
from vhdtool.container.stream import DiskStream
from vhdtool.container.writefile import WritableFile
from vhdtool.editor.changes import ChangeSet, FileChange, RegistryChange
from vhdtool.editor.extedit import ExtEdits
from vhdtool.editor.hiveedit import HiveEdits
from vhdtool.editor.output import OutputCopy
from vhdtool.editor.images import dependent_children
from vhdtool.editor.images import digest as payload_digest
from vhdtool.editor.paths import LINUX_FILESYSTEMS, guest_path, ntfs_name_problem, protected
from vhdtool.errors import (
    CorruptFilesystem,
    EncryptedVolume,
    GuestNotClean,
    ImageHasChildren,
    ImageNotFound,
    UnsupportedLayout,
    VhdtoolError,
    VolumeFull,
)
from vhdtool.filesystem import NtfsFilesystem, ntfs3g
from vhdtool.guest.discover import survey_disk
from vhdtool.guest.inspection import Inspection, require_guest
from vhdtool.units import MiB
from vhdtool.volume import Partition, open_partition

class EditSession:
    def __init__(self, path: str, dry_run: bool = False, output: str | None = None):
        self.path = path
        self.dry_run = dry_run
        self.output = output
        self.work_path = path
        self._out: OutputCopy | None = None  # --output's copy, while it has its temporary name
        self._lock: WritableFile | None = None
        self.disk: DiskStream | None = None
        self.overlay: Overlay | None = None
        self.inspection: Inspection | None = None
        self._ops: dict[int, list] = {}  # partition index -> ntfs3g operations, in order
        self._hives = HiveEdits(self)  # registry edits of the system volume's hives
        # Each volume is opened and checked once: the overlay changes only at the commit.
        self._volumes: dict[int, tuple[Partition, NtfsFilesystem]] = {}
        self._files: list[FileChange] = []
        self._sources: list[Source] = []  # local files being copied in (all the session's): closed with it
        self._free: dict[int, int] = {}
        self._digests: dict[int, Source] = {}  # index in _files -> the local file whose digest it awaits  # partition index -> free clusters left for this session's writes
        self._registry: list[RegistryChange] = []
        self._ext: ExtEdits | None = None  # the ext2/3/4 volumes' operations (editor.extedit)
        self.result: ChangeSet | None = None

    # -- opening, and the refusals that need no guest ----------------------------------------
    def open(self) -> None:
        if not os.path.exists(self.path):
            raise ImageNotFound(self.path, "no such file")
        if self.output is None and not self.dry_run:
            children = dependent_children(self.path)
            if children:
                raise ImageHasChildren(self.path, f"differencing disk {children[0]} depends on it (parent_linkage would break)")
        if self.output is not None and not self.dry_run:
            self._out = OutputCopy(self.path, self.output)
            self.work_path = self._out.start()
        if not self.dry_run:
            # The lock is held for the whole session: nobody changes the image between what
            # is decided on the read-only view and the commit.
            self._lock = WritableFile(self.work_path)
        self.disk = open_image(self.work_path)
        # A disk without a guest is no refusal here: --partition N writes into any NTFS volume;
        # what needs the guest refuses in _volume(None).
        ins = survey_disk(self.disk)
        # Refusals read from it (plan's, require_guest's) name the image asked about, not the
        # temporary copy --output works in.
        self.inspection = replace(ins, image=replace(ins.image, path=self.path))
        self.overlay = Overlay(self.disk)
        self._ext = ExtEdits(self.path, self.overlay, self.inspection, self._files)

    def name_the_output(self, e: VhdtoolError) -> None:
        """An error about the temporary copy --output works in names a path the user gave instead."""
        if self._out is not None:
            self._out.rename_error(e)

    # -- what the operations act on ----------------------------------------------------------
    def _volume(self, partition: int | None) -> tuple[Partition, NtfsFilesystem]:
        ins = self.inspection
        if partition is None:
            require_guest(ins, "give --partition N to write into one of its NTFS volumes (see `vhdtool inspect`)")
            if ins.guest.os != "windows" or ins.guest.windows is None:
                raise UnsupportedLayout(self.path, f"the guest is {ins.guest.os}: vhdtool writes only Windows guests' NTFS volumes",
                                        "give --partition N for an NTFS data volume")
            w = ins.guest.windows
            if w.hibernated:
                raise GuestNotClean(self.path, "the guest is hibernated (hiberfil.sys holds a hibernation image)")
            if not w.ntfs_clean:
                raise GuestNotClean(self.path, "the system volume was not shut down cleanly (NTFS dirty bit or $LogFile)")
            partition = w.system_partition
        if partition in self._volumes:
            return self._volumes[partition]
        part = next((p for p in ins.partitions if p.index == partition), None)
        if part is None:
            raise UnsupportedLayout(self.path, f"the disk has no partition {partition}",
                                    "see `vhdtool inspect` for the partitions")
        if part.filesystem == "bitlocker":
            raise EncryptedVolume(self.path, f"partition {partition} is BitLocker-encrypted")
        if part.filesystem in LINUX_FILESYSTEMS:
            raise UnsupportedLayout(self.path, f"partition {partition} holds {part.filesystem}: vhdtool writes NTFS and "
                                               "ext2/3/4 volumes only", "give an NTFS or ext2/3/4 partition")
        if part.filesystem != "ntfs":
            raise UnsupportedLayout(self.path, f"partition {partition} holds no NTFS volume", "give an NTFS partition")
        fs = NtfsFilesystem(open_partition(self.overlay, part), self.path, f"partition {partition}", ntfs_names=True)
        if fs.volume_dirty() or not fs.logfile_clean():
            raise GuestNotClean(self.path, f"the NTFS volume on partition {partition} was not shut down cleanly")
        if fs.hibernated():
            raise GuestNotClean(self.path, f"partition {partition} holds a hibernated system")
        self._volumes[partition] = (part, fs)
        return part, fs

    def _guest_path(self, path: str, partition: int | None) -> str:
        try:
            return guest_path(path, self._drive(partition))
        except UnsupportedLayout as e:
            if e.path is not None:
                raise
            raise UnsupportedLayout(self.path, e.problem, e.hint) from None

    def _drive(self, partition: int | None) -> str | None:
        w = self.inspection.guest.windows
        return w.drive_letter if partition is None and w is not None else None

    # -- operations -------------------------------------------------------------------------
    def write_file(self, path: str, data: bytes | str | os.PathLike | Source, partition: int | None = None,
                   mode: int | None = None, uid: int | None = None, gid: int | None = None) -> FileChange | None:
        """Put ``data`` at guest ``path``; None when it is already there.

        ``data``: bytes, a local file's path, or a Source (a byte range of a local file), which is the
        session's from then on: it closes it when it ends. A local file is never read into memory: its
        bytes go to the image file at the commit (vhdtool.container.source) and must not change before.
        On ext2/3/4 (a Linux guest, or such a ``partition``) ``mode``, ``uid`` and ``gid`` are the
        file's (default: a replaced file's own, else 0644 root's) and the bytes are read (editor.extedit)."""
        if not isinstance(data, (bytes, bytearray, Source)):
            data = Source(data)
        if isinstance(data, Source):
            self._sources.append(data)
        if self._ext.wants(partition):
            change = self._ext.write_file(path, data, partition, mode, uid, gid)
            if change is not None and isinstance(data, Source):
                data.start_sha256()  # as below: hashed beside the rest, the digest filled in at the commit
                self._digests[len(self._files) - 1] = data
            return change
        part, fs = self._volume(partition)
        target = self._guest_path(path, partition)
        if target == "/":
            raise UnsupportedLayout(self.path, f"{path} names the root folder, not a file", "give a file path")
        self._check_new_path(part.index, fs, target)
        state = self._state(part.index, fs, target)
        if state == "dir":
            raise UnsupportedLayout(self.path, f"{path} is a folder in the guest", "give a file path")
        action = "add" if state is None else "replace"
        # Already there, byte for byte, and untouched by this session: no change.
        if state == "file" and not self._pending(part.index, target) and self._holds(fs, target, data):
            return None
        self._check_room(part.index, fs, target, state, len(data))
        if isinstance(data, Source):
            # Hashed beside the rest of the operation; the change set gets the digest at the commit.
            data.start_sha256()
            self._digests[len(self._files)] = data
            digest = None
        else:
            digest = payload_digest(data)
        self._ops.setdefault(part.index, []).append(
            ntfs3g.WriteFile(target, data if isinstance(data, Source) else bytes(data)))
        change = FileChange(target, action, len(data), digest, part.index)
        self._files.append(change)
        return change

    def _check_new_path(self, index: int, fs: NtfsFilesystem, target: str) -> None:
        """UnsupportedLayout for a path NTFS cannot take, or Windows not open, or under a file (as this session
        leaves it: libntfs-3g would refuse it only in the sandbox) or a junction (what libntfs-3g wrote in it,
        Windows would never show)."""
        problem = ntfs_name_problem(target)
        if problem is not None:
            raise UnsupportedLayout(self.path, f"{target}: {problem}", "give a guest path Windows can use")
        parts = target.split("/")[1:-1]
        for i in range(len(parts)):
            folder = "/" + "/".join(parts[: i + 1])
            state = self._state(index, fs, folder)
            if state == "file":
                raise UnsupportedLayout(self.path, f"{folder} is a file in the guest", "give a folder path")
            if state == "dir" and fs.is_link(folder):  # Windows would look where it points; libntfs-3g in it
                raise UnsupportedLayout(self.path, f"{folder} is a junction or symbolic link in the guest",
                                        "give the path it points to")

    @staticmethod
    def _holds(fs: NtfsFilesystem, target: str, data: bytes | Source) -> bool:
        """Whether the guest file ``target`` holds exactly ``data``, read a chunk at a time."""
        if fs.size(target) != len(data):
            return False
        if not isinstance(data, Source):
            return fs.read(target, len(data) + 1) == data
        return data.same_bytes(fs.chunks(target, READ_CHUNK))

    def _check_room(self, index: int, fs: NtfsFilesystem, target: str, state: str | None, size: int) -> None:
        """VolumeFull, before anything is written, when the volume's free clusters cannot hold ``size``
        more bytes on top of what this session already writes there (a replaced file's clusters count
        as free: libntfs-3g frees them first)."""
        cluster = fs.cluster_size()
        need = -(-size // cluster)
        if state == "file" and fs.exists(target) and not fs.is_dir(target):  # not one this session writes first
            need -= -(-fs.size(target) // cluster)
        free = self._free.get(index)
        if free is None:
            free = self._free[index] = fs.free_clusters()
        if need > free:
            raise VolumeFull(self.path, f"{target} needs {need * cluster // MiB + 1} MiB and the volume on partition "
                                        f"{index} has {free * cluster // MiB} MiB free")
        self._free[index] = free - max(need, 0)

    def mkdir(self, path: str, partition: int | None = None) -> FileChange | None:
        if self._ext.wants(partition):
            return self._ext.mkdir(path, partition)
        part, fs = self._volume(partition)
        target = self._guest_path(path, partition)
        self._check_new_path(part.index, fs, target)
        state = self._state(part.index, fs, target)
        if state == "file":
            raise UnsupportedLayout(self.path, f"{path} is a file in the guest", "give a folder path")
        if state == "dir":
            return None
        self._ops.setdefault(part.index, []).append(ntfs3g.MakeDir(target))
        change = FileChange(target, "mkdir", None, None, part.index)
        self._files.append(change)
        return change

    def delete(self, path: str, partition: int | None = None) -> FileChange | None:
        """Delete the file or folder (with everything under it) at guest ``path``; None when it is not there.

        The root folder, the registry hives (and the folders that hold them) are refused. On ext2/3/4
        it is ``unlink``: files and symbolic links only."""
        if self._ext.wants(partition):
            return self._ext.unlink(path, partition)
        part, fs = self._volume(partition)
        target = self._guest_path(path, partition)
        if protected(target):
            raise UnsupportedLayout(self.path, f"{path} is the volume's root, a registry hive or a folder holding "
                                               "one, or an NTFS metadata file: vhdtool never deletes it",
                                    "give a path of a file or folder that Windows can do without")
        if self._state(part.index, fs, target) is None:
            return None
        self._ops.setdefault(part.index, []).append(ntfs3g.Delete(target))
        change = FileChange(target, "delete", None, None, part.index)
        self._files.append(change)
        return change

    def symlink(self, path: str, target: str, partition: int | None = None) -> FileChange | None:
        """Make ``path`` a symbolic link to ``target`` on an ext2/3/4 volume (root's, 0777, as systemctl makes
        them), replacing a link there; None when it already points there."""
        return self._ext.symlink(path, target, partition)

    def unlink(self, path: str, partition: int | None = None) -> FileChange | None:
        """Remove a file or symbolic link on an ext2/3/4 volume; None when nothing is there."""
        return self._ext.unlink(path, partition)

    def rmdir(self, path: str, partition: int | None = None, if_empty: bool = False) -> FileChange | None:
        """Remove a folder of an ext2/3/4 volume that this session leaves empty; None when it is not there (or,
        with ``if_empty``, when the session leaves something in it)."""
        return self._ext.rmdir(path, partition, if_empty)

    def ext_filesystem(self, partition: int | None = None):
        """The ext2/3/4 volume's files as they stand on disk (pending changes not applied): a
        ``vhdtool.filesystem.linuxfs.LinuxFilesystem``, the guest's root volume without ``partition``."""
        return self._ext.filesystem(partition)

    def guest_root(self):
        """The Linux guest's root filesystem, read-only, whatever it is (XFS too), for decisions that may
        need no write; None when there is none."""
        from vhdtool.guest.discover import find_linux_root

        return find_linux_root(self.disk)

    def entry(self, path: str, partition: int | None = None):
        """What ``path`` names on an ext2/3/4 volume as it stands on disk, a last symlink not followed:
        a ``vhdtool.filesystem.linuxfs.Entry`` (kind, mode, uid, gid, size, link target), or None."""
        return self._ext.entry(path, partition)

    def _pending(self, index: int, target: str) -> list:
        """This session's operations on partition ``index`` that touch ``target``, its parents or what is under it."""
        t = target.casefold()
        return [op for op in self._ops.get(index, []) if
                op.path.casefold() == t or t.startswith(op.path.casefold() + "/") or op.path.casefold().startswith(t + "/")]

    def _state(self, index: int, fs: NtfsFilesystem, target: str) -> str | None:
        """"file", "dir" or None (absent) for ``target`` as this session's operations so far leave it."""
        state = ("dir" if fs.is_dir(target) else "file") if fs.exists(target) else None
        t = target.casefold()
        for op in self._pending(index, target):
            p = op.path.casefold()
            if isinstance(op, ntfs3g.Delete):
                state = None if p == t or t.startswith(p + "/") else state
            elif p != t:
                state = "dir" if p.startswith(t + "/") else state  # a write or mkdir below makes its parents
            else:
                state = "dir" if isinstance(op, ntfs3g.MakeDir) else "file"
        return state

    def set_value(self, hive: str, key: str, name: str, value, type: str | int) -> None:
        """Set value ``name`` of ``key`` in the system volume's ``hive`` (SYSTEM, SOFTWARE...), creating the key."""
        self._hives.set_value(hive, key, name, value, type)

    def delete_value(self, hive: str, key: str, name: str) -> None:
        self._hives.delete_value(hive, key, name)

    def read_value(self, hive: str, key: str, name: str, default=None):
        """A value of the system volume's ``hive`` as Windows would see it at boot (its logs replayed)."""
        return self._hives.read_value(hive, key, name, default)

    def file_content(self, path: str, partition: int | None = None) -> bytes | None:
        """A file of the guest as it stands in this session (pending changes not yet applied), or None."""
        _part, fs = (None, self._ext.filesystem(partition)) if self._ext.wants(partition) else self._volume(partition)
        target = self._guest_path(path, partition)
        if not fs.exists(target) or fs.is_dir(target):
            return None
        return fs.read(target, fs.size(target))

    def listdir(self, path: str, partition: int | None = None) -> list[str]:
        """The names in a folder of the guest as it stands on disk (pending changes not applied); [] for none."""
        _part, fs = (None, self._ext.filesystem(partition)) if self._ext.wants(partition) else self._volume(partition)
        target = self._guest_path(path, partition)
        return fs.listdir(target) if fs.is_dir(target) else []

    @property
    def changes(self) -> tuple[tuple[FileChange, ...], tuple[RegistryChange, ...]]:
        return tuple(self._files), tuple(self._registry)

    # -- the commit -----------------------------------------------------------------------
    def _run_operations(self) -> None:
        from vhdtool.progress import phase, size_text

        queued = self._hives.run(self._registry)
        if queued:
            part, _fs = self._volume(None)
            self._ops[part.index] = queued + self._ops.get(part.index, [])
        for index, ops in self._ops.items():
            part = next(p for p in self.inspection.partitions if p.index == index)
            # libntfs-3g works in the sandbox child, which can report nothing: the bar says what
            # is being written and for how long.
            amount = sum(op.size for op in ops if isinstance(op, ntfs3g.WriteFile))
            with phase(f"writing {size_text(amount)} to partition {index} (libntfs-3g)", amount) as progress:
                try:
                    ntfs3g.apply(self.overlay, part.offset, part.size, ops, self.path, f"NTFS on partition {index}",
                                 tick=progress.tick)
                except CorruptFilesystem:
                    for source in self._sources:
                        source.check_unchanged()  # a local file cut short under libntfs-3g: SourceChanged
                    raise
        self._ops.clear()
        try:
            self._ext.run()
        except CorruptFilesystem:
            for source in self._sources:
                source.check_unchanged()  # a local file cut short under libext2fs: SourceChanged
            raise

    def commit(self) -> ChangeSet:
        self._run_operations()
        changes = self.overlay.changes()
        changed = sum(len(e.data) for e in changes)
        written, replayed, committed = 0, False, False
        # A log a crash left pending is replayed into the file even when nothing else changes.
        if (changes or self.disk.log_replayed) and not self.dry_run:
            from vhdtool.progress import bar

            # Its size is known once the container writer has planned it; the thread keeps the bar's
            # time running through the flushes, which report nothing (no fork happens in a commit).
            with bar(f"committing to {os.path.basename(self.output or self.path)}", None) as progress, \
                    progress.ticking():
                result = commit_changes(self.disk, changes, self._lock, self.overlay.unreachable(), progress=progress)
            if result is not None:
                written, replayed, committed = result.bytes_written, result.log_replayed, True
        if self._out is not None:
            self._out.finish()
            committed = True
        # A local file's digest was collected before the commit point (Source.settle); a dry run's now.
        files = tuple(replace(f, sha256=self._digests[i].sha256()) if i in self._digests else f
                      for i, f in enumerate(self._files))
        self.result = ChangeSet(
            image=self.path,
            output=self.output,
            dry_run=self.dry_run,
            committed=committed,
            files=files,
            registry=tuple(self._registry),
            bytes_written=written,
            log_replayed=replayed,
            changed_bytes=changed,
        )
        return self.result

    def close(self) -> None:
        for source in self._sources:
            source.close()
        if self.overlay is not None:
            self.overlay.close()
        if self.disk is not None:
            self.disk.close()
        if self._lock is not None:
            self._lock.close()
        if self._out is not None:
            self._out.discard()
