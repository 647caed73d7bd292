"""NTFS writes through libntfs-3g (ctypes), on a device whose reads and writes go to an overlay, in the sandbox.

No mount, no FUSE, no root: libntfs-3g is given a ``struct ntfs_device`` whose
operations are Python callbacks over one partition of the overlay
(vhdtool.filesystem.ntfsdevice). It runs in the native sandbox's forked child,
which keeps only read-only descriptors of the image; what libntfs-3g writes lands
in the child's copy of the overlay, and the child answers with the sectors that
changed, which the parent puts into its own overlay. A crash of the C library loses nothing but the child.

The volume is mounted with NTFS_MNT_FORENSIC: libntfs-3g then neither resets
$LogFile nor sets the dirty bit on mount, so a volume whose $LogFile is clean
stays so, and only the structures an operation touches change. It still refuses
a volume whose $LogFile is not clean or that is hibernated (volume.c). New files
and folders get the security id libntfs-3g derives from their parent folder's
inheritable ACEs (ntfs_inherited_id), as Windows would give them. Names are
looked up without regard to case, as Windows looks them up.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from vhdtool.container.overlay import Overlay
from vhdtool.container.source import Source, SourceRange
from vhdtool.errors import CorruptFilesystem, MissingLibrary, NativeError, UnsupportedLayout, VolumeFull
from vhdtool.filesystem.answer import decode_extents, encode_extents
from vhdtool.filesystem.ntfsacl import mark_inherited
from vhdtool.filesystem.ntfsanswer import decode_sources
from vhdtool.filesystem.ntfsbitmap import free_clusters
from vhdtool.filesystem.ntfscalls import FILLDIR, declare
from vhdtool.filesystem.ntfsdevice import OverlayDevice, s64
from vhdtool.filesystem.ntfsgrow import grow
from vhdtool.native import Refusal, load_libc, load_library, run_isolated
from vhdtool.native.libraries import LIBNTFS_3G
from vhdtool.units import MiB

LIBRARY = LIBNTFS_3G
CHILD_TIMEOUT = 120.0
NTFS_MNT_FORENSIC = 0x04000000
AT_DATA = 0x80
S_IFREG, S_IFDIR = stat.S_IFREG, stat.S_IFDIR
MAX_ANSWER = 1024 * MiB  # metadata and in-memory files (hives); a Source's bytes never cross the pipe
WINDOW, TAIL_ALIGN = 64 * MiB, 64 * 1024  # a Source is mapped this much at a time; 64 KiB: every usual cluster
PROT_READ, MAP_SHARED = 1, 1
MAP_FAILED = ctypes.c_void_p(-1).value
FILE_FIRST_USER = 16  # layout.h: records below this are the volume's metadata files ($MFT ... $Extend)
FILE_NAME_DOS = 2  # layout.h FILE_NAME_TYPE_FLAGS: the 8.3 twin of a Win32 name, deleted with it
MFT_RECORD_IS_DIRECTORY = 0x0002  # layout.h MFT_RECORD flags (u16 at 0x16)
MREF_MASK = (1 << 48) - 1  # an MFT reference is 48 bits of record number, 16 of sequence number
DOTS = (".".encode("utf-16-le"), "..".encode("utf-16-le"))  # the entries ntfs_readdir makes up
MAX_DELETED = 1_000_000  # entries under one deleted folder: a cycle in a corrupt index must end


class SecurityContext(ctypes.Structure):  # struct SECURITY_CONTEXT (security.h), no user mapping
    _fields_ = [("vol", ctypes.c_void_p), ("mapping", ctypes.c_void_p * 2), ("pseccache", ctypes.c_void_p),
                ("uid", ctypes.c_uint32), ("gid", ctypes.c_uint32), ("tid", ctypes.c_int32),
                ("umask", ctypes.c_uint32)]


@dataclass(frozen=True)
class WriteFile:
    """Put ``data`` at ``path`` (absolute, '/'-separated), creating or replacing the file.

    ``data`` is bytes, or a Source (a local file): its bytes are never copied through the
    sandbox (see ``_Volume.write_source``)."""

    path: str
    data: bytes | Source

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class MakeDir:
    """Create the folder ``path`` and any missing parents; an existing folder is left as it is."""

    path: str


@dataclass(frozen=True)
class Delete:
    """Delete the file or folder ``path``, a folder with everything under it; a missing path is no change."""

    path: str


def _bind(label: str) -> ctypes.CDLL:
    try:
        lib = load_library(LIBRARY, label)
    except MissingLibrary:
        raise  # its own code (14): install the package it names
    except NativeError as e:
        raise CorruptFilesystem(label, e.problem, hint=e.hint) from None
    return declare(lib)


class _Volume:
    """One mounted volume in the child, and the few operations vhdtool needs of it."""

    def __init__(self, lib: ctypes.CDLL, device: OverlayDevice, cluster: int):
        self.lib = lib
        self.device = device
        self.cluster = cluster
        self.dev = lib.ntfs_device_alloc(b"vhdtool", 0, ctypes.addressof(device.ops), None)
        if not self.dev:
            raise Refusal("libntfs-3g could not allocate a device")
        self.vol = lib.ntfs_device_mount(self.dev, NTFS_MNT_FORENSIC)
        if not self.vol:
            err = ctypes.get_errno()
            lib.ntfs_device_free(self.dev)
            raise Refusal(f"libntfs-3g cannot open the volume for writing ({os.strerror(err) if err else 'refused'})")
        # Names compare as Windows compares them (the volume's $UpCase): C:\windows\temp is C:\Windows\Temp,
        # never a second folder beside it. libntfs-3g mounts case-sensitive, as POSIX would.
        lib.ntfs_set_ignore_case(self.vol)
        lib.ntfs_open_secure(self.vol)
        self.cache = ctypes.c_void_p(None)
        self._replacing = False  # writing a replacement under its temporary name (_replace)
        self.scx = SecurityContext(vol=self.vol)
        self.scx.pseccache = ctypes.addressof(self.cache)

    def unmount(self) -> None:
        self.lib.ntfs_close_secure(self.vol)
        if self.lib.ntfs_umount(self.vol, 0) != 0:
            raise Refusal("libntfs-3g could not write back the volume's structures")

    def inode(self, path: str):
        return self.lib.ntfs_pathname_to_inode(self.vol, None, path.encode("utf-8") or b"/")

    def _name(self, name: str) -> tuple[ctypes.c_void_p, int]:
        out = ctypes.c_void_p()
        n = self.lib.ntfs_mbstoucs(name.encode("utf-8"), ctypes.byref(out))
        if n <= 0 or n > 255:
            raise Refusal(f"'{name}' is not a valid NTFS file name")
        return out, n

    def create(self, parent_path: str, name: str, is_dir: bool):
        parent = self.inode(parent_path)
        if not parent:
            raise Refusal(f"the folder {parent_path or '/'} does not exist")
        try:
            securid = self.lib.ntfs_inherited_id(ctypes.byref(self.scx), parent, int(is_dir))
            uname, n = self._name(name)
            ni = self.lib.ntfs_create(parent, securid, uname, n, S_IFDIR if is_dir else S_IFREG)
            if not ni:
                self._failed(f"create {parent_path}/{name}")  # ENOSPC: no room for its record (the $MFT grows)
            if securid:
                mark_inherited(self.lib, self.scx, ni, parent)
            return ni
        finally:
            self.lib.ntfs_inode_close(parent)

    def mkdir(self, path: str) -> None:
        parts = [p for p in path.split("/") if p]
        for i in range(len(parts)):
            here = "/" + "/".join(parts[: i + 1])
            ni = self.inode(here)
            if not ni:
                ni = self.create("/" + "/".join(parts[:i]), parts[i], True)
            elif not self._is_dir(ni):
                self.lib.ntfs_inode_close(ni)
                raise _PathRefused(f"{here} is a file in the guest", "give a folder path")
            self.lib.ntfs_inode_close(ni)

    def _is_dir(self, ni) -> bool:
        # struct ntfs_inode (inode.h) starts with u64 mft_no and MFT_RECORD *mrec, the record as read.
        mrec = ctypes.c_void_p.from_address(ni + 8).value
        return bool(mrec) and bool(ctypes.c_uint16.from_address(mrec + 0x16).value & MFT_RECORD_IS_DIRECTORY)

    def write_file(self, path: str, data: bytes | Source) -> None:
        parent, _, name = path.rstrip("/").rpartition("/")
        self.mkdir(parent)
        ni = self.inode(path)
        if ni and self._is_dir(ni):
            # The editor's reading (dissect.ntfs) can miss a name libntfs-3g finds (their collations differ):
            # a replacement would delete the folder with all it holds.
            self.lib.ntfs_inode_close(ni)
            raise _PathRefused(f"{path} is a folder in the guest", "give a file path")
        if ni and isinstance(data, Source) and not self._replacing:
            self.lib.ntfs_inode_close(ni)
            if self._replace(parent, name, data):
                return
            ni = self.inode(path)
        ni = ni or self.create(parent, name, False)
        try:
            unnamed = ctypes.c_uint16.in_dll(self.lib, "AT_UNNAMED")
            na = self.lib.ntfs_attr_open(ni, AT_DATA, ctypes.addressof(unnamed), 0)
            if not na:
                raise Refusal(f"libntfs-3g cannot open the data of {path}")
            try:
                if isinstance(data, Source):
                    self._write_source(na, path, data)
                    return
                if self.lib.ntfs_attr_truncate(na, len(data)) != 0:
                    self._failed(f"size {path} to {len(data)} bytes")
                buf = ctypes.create_string_buffer(data, len(data)) if data else None
                self._pwrite(na, path, 0, len(data), ctypes.addressof(buf) if buf is not None else 0)
            finally:
                self.lib.ntfs_attr_close(na)
        finally:
            self.lib.ntfs_inode_close(ni)

    def _replace(self, parent: str, name: str, data: Source) -> bool:
        """A file replaced by a local file's bytes: written under a temporary name first, so that its
        clusters are taken while the old file still holds its own, then the old file deleted and its
        name given to the new one (ntfs_link). Clusters freed and taken again in one operation are
        reachable from the old state: they would have to go through the VHDX log, and memory. The
        new file has the folder's inherited security, as a new file has. False: no room for both."""
        temp = f"~vhdtool-{os.getpid()}.tmp"
        try:
            self._replacing = True
            self.write_file(f"{parent}/{temp}", data)
        except _VolumeFullHere:
            # No room for both: the old file's clusters are freed first after all (and, being
            # reachable from the old state, that part goes through the VHDX log and memory).
            self.delete(f"{parent}/{temp}")
            return False
        finally:
            self._replacing = False
        self.delete(f"{parent}/{name}")
        ni, dir_ni = self.inode(f"{parent}/{temp}"), self.inode(parent)
        try:
            uname, n = self._name(name)
            if not ni or not dir_ni or self.lib.ntfs_link(ni, dir_ni, uname, n) != 0:
                self._failed(f"name the new {parent}/{name}")
            record, folder = self._record(ni), self._record(dir_ni)
        finally:
            for handle in (ni, dir_ni):
                if handle:
                    self.lib.ntfs_inode_close(handle)
        self._unlink(folder, temp.encode("utf-16-le"), record, f"{parent}/{temp}")
        return True

    def _failed(self, doing: str):
        err = ctypes.get_errno()
        if err == errno.ENOSPC:
            raise _VolumeFullHere(f"libntfs-3g cannot {doing}: the volume is full")
        raise Refusal(f"libntfs-3g cannot {doing} ({os.strerror(err) if err else 'refused'})")

    def _pwrite(self, na, path: str, pos: int, count: int, address: int) -> None:
        done, step = 0, count
        while done < count:
            n = self.lib.ntfs_attr_pwrite(na, pos + done, min(step, count - done), address + done)
            if n <= 0 and ctypes.get_errno() == errno.ENOSPC and step > self.cluster:
                step = max(self.cluster, step // 2 // self.cluster * self.cluster)  # filling a hole: see ntfsgrow
                continue
            if n <= 0:
                self._failed(f"write {path}")
            done += n

    def _write_source(self, na, path: str, source: Source) -> None:
        """A local file's bytes, as libntfs-3g would write them from memory, without copying them.

        The old data goes first (its clusters freed), then the new size is allocated whole
        (ntfs_attr_truncate_solid: real clusters, no sparse runs), then the file is written
        from read-only mappings of the source, ``WINDOW`` bytes at a time. libntfs-3g hands
        the device a pointer into the mapping for each run of clusters; the device records
        "these volume bytes are those source bytes" instead of copying them (ntfsdevice).
        Whatever libntfs-3g writes from its own buffers (a resident file, the last partial
        cluster, compressed data) is copied as any other write. A call that ends inside a cluster
        goes through those buffers whole, so a window's tail (past whole TAIL_ALIGN units) is apart."""
        if self.lib.ntfs_attr_truncate(na, 0) != 0:
            self._failed(f"empty {path}")
        def extend(size: int) -> int:
            return 0 if self.lib.ntfs_attr_truncate_solid(na, size) == 0 else ctypes.get_errno() or errno.EIO

        if source.size and grow(extend, source.size, self.cluster) != 0:  # free space in pieces: see ntfsgrow
            self._failed(f"allocate {source.size} bytes for {path}")
        libc = load_libc()
        mmap, munmap = libc.mmap, libc.munmap
        mmap.restype, mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                                                         ctypes.c_int, ctypes.c_int64]
        munmap.argtypes, page = [ctypes.c_void_p, ctypes.c_size_t], os.sysconf("SC_PAGE_SIZE")
        for at in range(0, source.size, WINDOW):
            n = min(WINDOW, source.size - at)
            file_at = source.start + at
            skew = file_at % page  # mappings start on a page of the file
            address = mmap(None, n + skew, PROT_READ, MAP_SHARED, source.fileno(), file_at - skew)
            if address in (None, MAP_FAILED):
                raise Refusal(f"cannot map {source.label} ({os.strerror(ctypes.get_errno())})")
            try:
                self.device.window = (address + skew, n, source.whole()[at : at + n])
                for lo, hi in ((0, b), (b, n)) if 0 < (b := n - n % TAIL_ALIGN) < n else ((0, n),):
                    self._pwrite(na, path, at + lo, hi - lo, address + skew + lo)
            finally:
                self.device.window = None
                munmap(address, n + skew)

    # -- deleting: ntfs_delete (dir.c) unlinks one name, and frees the record and its clusters with the
    # last name; it refuses a folder that is not empty, so a tree goes deepest first.
    def _record(self, ni) -> int:
        return ctypes.c_uint64.from_address(ni).value  # struct ntfs_inode starts with u64 mft_no

    def _entries(self, record: int) -> list[tuple[bytes, int]] | None:
        """(UTF-16LE name, record) of each entry of folder ``record``, 8.3 twins left out; None for a file."""
        ni = self.lib.ntfs_inode_open(self.vol, record)
        if not ni:
            raise Refusal(f"libntfs-3g cannot open MFT record {record}")
        found: list[tuple[bytes, int]] = []

        def fill(_dirent, name, length, name_type, _pos, mref, _dt_type):
            try:
                text = ctypes.string_at(name, length * 2)
                if name_type != FILE_NAME_DOS and text not in DOTS:
                    found.append((text, mref & MREF_MASK))
                return 0
            except Exception:  # noqa: BLE001 - never raise into C
                return -1

        try:
            if self.lib.ntfs_readdir(ni, ctypes.byref(s64(0)), None, FILLDIR(fill)) != 0:
                err = ctypes.get_errno()
                if err == errno.ENOTDIR:
                    return None
                raise Refusal(f"libntfs-3g cannot list MFT record {record} ({os.strerror(err) if err else 'failed'})")
        finally:
            self.lib.ntfs_inode_close(ni)
        return found

    def _unlink(self, parent: int, name: bytes, record: int, path: str) -> None:
        ni = self.lib.ntfs_inode_open(self.vol, record)
        dir_ni = self.lib.ntfs_inode_open(self.vol, parent) if ni else None
        if not ni or not dir_ni:
            if ni:
                self.lib.ntfs_inode_close(ni)
            raise Refusal(f"libntfs-3g cannot open the records of {path}")
        # ntfs_delete closes both inodes, whatever it returns. No path: the inode cache then
        # forgets every path it holds for this record, whatever case it was looked up in.
        if self.lib.ntfs_delete(self.vol, None, ni, dir_ni, name, len(name) // 2) != 0:
            raise Refusal(f"libntfs-3g could not delete {path} ({os.strerror(ctypes.get_errno())})")

    def delete(self, path: str) -> None:
        parent_path, _, name = path.rstrip("/").rpartition("/")
        ni = self.inode(path)
        if not ni:
            return  # nothing there: no change
        record = self._record(ni)
        self.lib.ntfs_inode_close(ni)
        dir_ni = self.inode(parent_path)
        if not dir_ni:
            raise Refusal(f"libntfs-3g cannot open the folder of {path}")
        parent = self._record(dir_ni)
        self.lib.ntfs_inode_close(dir_ni)
        if not name or record < FILE_FIRST_USER or parent == record:
            raise Refusal(f"{path} is part of the volume's own structures: it is never deleted")
        uname = name.encode("utf-16-le")
        if len(uname) // 2 > 255:
            raise Refusal(f"'{name}' is not a valid NTFS file name")
        # Post-order walk without recursion: an entry is deleted after everything under it.
        stack, seen = [(parent, uname, record, path, False)], 0
        while stack:
            parent, uname, record, where, expanded = stack.pop()
            if expanded:
                self._unlink(parent, uname, record, where)
                continue
            entries = self._entries(record)
            stack.append((parent, uname, record, where, True))
            for child_name, child in entries or ():
                seen += 1
                if child < FILE_FIRST_USER or child == record or seen > MAX_DELETED:
                    raise Refusal(f"the folder {where} holds an entry that cannot be one (MFT record {child})")
                stack.append((record, child_name, child, f"{where}/{child_name.decode('utf-16-le', 'replace')}",
                              False))


class _VolumeFullHere(Refusal):
    """In the child: libntfs-3g ran out of clusters (ENOSPC); the parent raises VolumeFull."""


class _PathRefused(Refusal):
    """In the child: a path the volume cannot take as asked (problem, hint); the parent raises UnsupportedLayout."""


def apply(overlay: Overlay, start: int, size: int, operations: list, label: str, what: str,
          tick: Callable[[], None] | None = None) -> int:
    """Run ``operations`` (WriteFile, MakeDir, Delete), in order, with libntfs-3g on the volume at [start, start + size) of
    ``overlay``; the sectors it changes go into ``overlay``. Returns how many bytes changed.

    A WriteFile of a Source puts source ranges into ``overlay`` (Overlay.write_source): the
    child says where libntfs-3g put the file's bytes, and the bytes stay in the file.
    ``tick()`` is called now and then while libntfs-3g works in the sandbox child (see run_isolated)."""
    lib = _bind(label)
    sources = [op.data for op in operations if isinstance(op, WriteFile) and isinstance(op.data, Source)]
    keep = tuple(d.image.fileno() for d in overlay.base.chain() if d.image is not None and not d.image.closed)
    keep += tuple(src.fileno() for src in sources)
    free = free_clusters(overlay, start, size, label)

    def job() -> dict:
        device = OverlayDevice(overlay, start, size, free=lambda lo, hi: free.runs(lo, hi))
        before = {e.offset: e.data for e in overlay.changes()}
        volume = _Volume(lib, device, free.unit)
        try:
            for op in operations:
                if isinstance(op, MakeDir):
                    volume.mkdir(op.path)
                elif isinstance(op, Delete):
                    volume.delete(op.path)
                else:
                    volume.write_file(op.path, op.data)
        except _VolumeFullHere as e:
            return {"full": str(e)}
        except _PathRefused as e:
            return {"path": [str(a) for a in e.args]}
        volume.unmount()  # ntfs_umount frees the device too
        # Only what this run changed, inside the volume.
        changed = [e for e in overlay.changes() if before.get(e.offset) != e.data and start <= e.offset < start + size]
        held = [e for e in changed if not isinstance(e.data, SourceRange)]
        ranges = [[e.offset, len(e.data), next(i for i, s in enumerate(sources) if s is e.data.source), e.data.offset]
                  for e in changed if isinstance(e.data, SourceRange)]
        return {"extents": len(held), "sources": ranges, "payload": encode_extents(held)}

    try:
        head, payload = run_isolated(
            job, label, library="libntfs-3g", subject=what, cap=MAX_ANSWER, timeout=CHILD_TIMEOUT, keep_fds=keep,
            tick=tick,
        )
    except NativeError as e:
        raise CorruptFilesystem(label, f"{what}: {e.problem}", hint=e.hint or None) from None
    if head.get("full"):
        raise VolumeFull(label, f"{what}: {head['full']}")
    if isinstance(head.get("path"), list) and head["path"]:
        raise UnsupportedLayout(label, *[str(a) for a in head["path"][:2]])
    extents = decode_extents(payload or b"", lambda at, n: start <= at and at + n <= start + size,
                             overlay.logical_sector_size, label, "libntfs-3g")
    if len(extents) != head.get("extents"):
        raise CorruptFilesystem(label, "the libntfs-3g child sent a malformed answer")
    extents += decode_sources(head.get("sources"), sources, start, start + size, overlay.logical_sector_size, label)
    for e in extents:
        if isinstance(e.data, SourceRange):
            overlay.write_source(e.offset, e.data)
        else:
            overlay.write_at(e.offset, e.data)
        for lo, hi in free.runs(e.offset - start, e.end - start):
            overlay.mark_unreachable(start + lo, hi - lo)
    return sum(len(e.data) for e in extents)
