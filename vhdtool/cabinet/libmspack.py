"""libmspack's cab decompressor through ctypes (mspack.h: mspack_system, mscab_decompressor), run in the sandbox.

libmspack reads through a struct mspack_system whose "files" here are not its own:
the only file it can open for reading is the cabinet (bytes, or a local file read a
slice at a time through a read-only descriptor the child keeps, so that a cab of
several GiB is never copied into memory), and the only one it can open for writing
is a buffer capped at the caller's limit. Nothing is written to disk.

libmspack is C that parses hostile bytes, and its own test suite is a list of
crashes, over-reads and infinite loops it once had. So every call runs in
``vhdtool.native``'s forked, confined child; whatever happens to it becomes a
CabError here. A child that libmspack let an attacker take over can lie, but its
member list must still agree with the header the parent checked itself.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from vhdtool.cabinet.format import CabBytes, CabLayout
from vhdtool.errors import CabError, MissingLibrary, NativeError
from vhdtool.native import Refusal, bind_library, load_libc, run_isolated
from vhdtool.native.libraries import LIBMSPACK
from vhdtool.units import MiB

LIBRARY = LIBMSPACK

CHILD_TIMEOUT = 10.0  # seconds; a real servicing cab decodes in well under one
# A member larger than 16 MiB (an .msu's package cab) gets a second more per 16 MiB it may hold.
TIMEOUT_FREE_LIMIT = 16 * MiB
ANSWER_OVERHEAD = 32 * MiB  # the member list of 65535 files with 255-byte names fits in it
MAX_FILES = 0xFFFF  # CFHEADER.cFiles is 16 bits

# mspack.h
MSPACK_VER_SYSTEM = 1
MSPACK_VER_MSCABD = 2
MSPACK_SYS_OPEN_READ = 0
MSPACK_SYS_OPEN_WRITE = 1
MSPACK_SYS_SEEK_START, MSPACK_SYS_SEEK_CUR, MSPACK_SYS_SEEK_END = 0, 1, 2
MSPACK_ERR_OK = 0
MSPACK_ERRORS = {
    1: "bad arguments",
    2: "open failed",
    3: "read failed, the cabinet is cut short",
    4: "write failed",
    5: "seek failed",
    6: "out of memory",
    7: "bad signature",
    8: "bad or corrupt data format",
    9: "bad checksum",
    10: "compression error",
    11: "decompression error",
}

# off_t is 64-bit on x86-64 Linux (and every LP64 Linux); mspack_sys_selftest_internal
# confirms the library was built the same way before anything else is called.
off_t = ctypes.c_int64

OPEN_FN = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int)
CLOSE_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
READ_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)
WRITE_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)
SEEK_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, off_t, ctypes.c_int)
TELL_FN = ctypes.CFUNCTYPE(off_t, ctypes.c_void_p)
# message() is variadic in C. The SysV x86-64 and AArch64 ABIs pass the two fixed
# arguments in the same registers either way, so a two-argument callback is safe;
# the rest are never looked at.
MESSAGE_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)
ALLOC_FN = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
FREE_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
COPY_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)


class MspackSystem(ctypes.Structure):
    _fields_ = [
        ("open", OPEN_FN),
        ("close", CLOSE_FN),
        ("read", READ_FN),
        ("write", WRITE_FN),
        ("seek", SEEK_FN),
        ("tell", TELL_FN),
        ("message", MESSAGE_FN),
        ("alloc", ALLOC_FN),
        ("free", FREE_FN),
        ("copy", COPY_FN),
        ("null_ptr", ctypes.c_void_p),  # must be NULL: libmspack checks it marks the end
    ]


class MscabdFolder(ctypes.Structure):
    pass


MscabdFolder._fields_ = [
    ("next", ctypes.POINTER(MscabdFolder)),
    ("comp_type", ctypes.c_int),
    ("num_blocks", ctypes.c_uint),
]


class MscabdFile(ctypes.Structure):
    pass


MscabdFile._fields_ = [
    ("next", ctypes.POINTER(MscabdFile)),
    ("filename", ctypes.c_void_p),  # char *, NUL-terminated, at most 255 bytes
    ("length", ctypes.c_uint),
    ("attribs", ctypes.c_int),
    ("time_h", ctypes.c_byte),
    ("time_m", ctypes.c_byte),
    ("time_s", ctypes.c_byte),
    ("date_d", ctypes.c_byte),
    ("date_m", ctypes.c_byte),
    ("date_y", ctypes.c_int),
    ("folder", ctypes.POINTER(MscabdFolder)),
    ("offset", ctypes.c_uint),
]


class MscabdCabinet(ctypes.Structure):
    _fields_ = [
        ("next", ctypes.c_void_p),
        ("filename", ctypes.c_void_p),
        ("base_offset", off_t),
        ("length", ctypes.c_uint),
        ("prevcab", ctypes.c_void_p),
        ("nextcab", ctypes.c_void_p),
        ("prevname", ctypes.c_void_p),
        ("nextname", ctypes.c_void_p),
        ("previnfo", ctypes.c_void_p),
        ("nextinfo", ctypes.c_void_p),
        ("files", ctypes.POINTER(MscabdFile)),
        ("folders", ctypes.POINTER(MscabdFolder)),
        ("set_id", ctypes.c_ushort),
        ("set_index", ctypes.c_ushort),
        ("header_resv", ctypes.c_ushort),
        ("flags", ctypes.c_int),
    ]


class MscabDecompressor(ctypes.Structure):
    # Filenames are passed as addresses: libmspack keeps the pointer until close().
    _fields_ = [
        ("open", ctypes.CFUNCTYPE(ctypes.POINTER(MscabdCabinet), ctypes.c_void_p, ctypes.c_void_p)),
        ("close", ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(MscabdCabinet))),
        ("search", ctypes.CFUNCTYPE(ctypes.POINTER(MscabdCabinet), ctypes.c_void_p, ctypes.c_void_p)),
        ("append", ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)),
        ("prepend", ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)),
        ("extract", ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(MscabdFile), ctypes.c_void_p)),
        ("set_param", ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int)),
        ("last_error", ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)),
    ]


@dataclass(frozen=True)
class Library:
    """libmspack's entry points, and libc's allocator for the mspack_system."""

    create: ctypes._CFuncPtr
    destroy: ctypes._CFuncPtr
    malloc: ctypes._CFuncPtr
    free: ctypes._CFuncPtr
    copy: ctypes._CFuncPtr


def load(label: str) -> Library:
    """libmspack, opened on first use (inspect and plan never need it)."""
    try:
        return bind_library(LIBRARY, label, lambda lib: _bind(lib, label))
    except MissingLibrary:
        raise  # its own code (14): install the package it names
    except NativeError as e:
        raise CabError(label, e.problem, hint=e.hint) from None


def _bind(lib: ctypes.CDLL, label: str) -> Library:
    libc = load_libc(label)
    lib.mspack_sys_selftest_internal.argtypes = [ctypes.c_int]
    lib.mspack_sys_selftest_internal.restype = ctypes.c_int
    if lib.mspack_sys_selftest_internal(ctypes.sizeof(off_t)) != MSPACK_ERR_OK:
        raise CabError(label, "libmspack was built with a different off_t than this platform's",
                       hint=LIBRARY.install_hint())
    lib.mspack_version.argtypes = [ctypes.c_int]
    lib.mspack_version.restype = ctypes.c_int
    if lib.mspack_version(MSPACK_VER_SYSTEM) < 1 or lib.mspack_version(MSPACK_VER_MSCABD) < 1:
        raise CabError(label, "this libmspack cannot decompress cabinets", hint=LIBRARY.install_hint())
    create = lib.mspack_create_cab_decompressor
    create.argtypes = [ctypes.POINTER(MspackSystem)]
    create.restype = ctypes.c_void_p
    destroy = lib.mspack_destroy_cab_decompressor
    destroy.argtypes = [ctypes.c_void_p]
    destroy.restype = None
    malloc = libc.malloc
    malloc.argtypes = [ctypes.c_size_t]
    malloc.restype = ctypes.c_void_p
    return Library(
        create=create,
        destroy=destroy,
        malloc=malloc,
        # free(ptr) has mspack_system.free's signature exactly, and bcopy(src, dest, n)
        # has copy()'s argument order (memcpy's is the other way round), so libmspack
        # calls both straight into libc.
        free=ctypes.cast(libc.free, FREE_FN),
        copy=ctypes.cast(libc.bcopy, COPY_FN),
    )


# -- the mspack_system: files in memory -------------------------------------------

def _guarded(failure):
    """A callback must never raise into C: any exception becomes the callback's failure value."""

    def wrap(fn):
        def callback(*args):
            try:
                return fn(*args)
            except Exception:
                return failure

        return callback

    return wrap


class MemoryFiles:
    """The struct mspack_system handed to libmspack: reads come from the cabinet's first ``size``
    bytes (a slice of ``cabinet`` per read), writes go to a capped buffer."""

    def __init__(self, library: Library, cabinet: CabBytes, size: int, limit: int):
        self.library = library
        self.source = cabinet
        self.size = size
        self.limit = limit
        self.output = bytearray()
        self.overflow = False
        self.messages = 0
        self.handles: dict[int, list] = {}  # handle -> [kind, position]
        self.next_handle = 1
        # libmspack keeps the cabinet's "filename" pointer until close(): these buffers outlive it.
        self.input_name = ctypes.create_string_buffer(b"cabinet")
        self.output_name = ctypes.create_string_buffer(b"member")
        self._callbacks = (
            OPEN_FN(self._open),
            CLOSE_FN(self._close),
            READ_FN(self._read),
            WRITE_FN(self._write),
            SEEK_FN(self._seek),
            TELL_FN(self._tell),
            MESSAGE_FN(self._message),
            ALLOC_FN(self._alloc),
        )
        self.system = MspackSystem(*self._callbacks, library.free, library.copy, None)

    @_guarded(None)
    def _open(self, _system, filename, mode):
        if filename == self.input_name.value and mode == MSPACK_SYS_OPEN_READ:
            kind = "in"
        elif filename == self.output_name.value and mode == MSPACK_SYS_OPEN_WRITE:
            kind = "out"
            self.output = bytearray()
        else:
            return None
        handle = self.next_handle
        self.next_handle += 1
        self.handles[handle] = [kind, 0]
        return handle

    @_guarded(None)
    def _close(self, handle):
        self.handles.pop(handle, None)

    @_guarded(-1)
    def _read(self, handle, buffer, count):
        state = self.handles.get(handle)
        if state is None or state[0] != "in" or count < 0 or not buffer:
            return -1
        n = max(0, min(count, self.size - state[1]))
        if n:
            chunk = self.source[state[1] : state[1] + n]
            if len(chunk) != n:
                return -1
            ctypes.memmove(buffer, chunk, n)
            state[1] += n
        return n

    @_guarded(-1)
    def _write(self, handle, buffer, count):
        state = self.handles.get(handle)
        if state is None or state[0] != "out" or count < 0 or (count and not buffer):
            return -1
        if len(self.output) + count > self.limit:
            # A member larger than the caller allows fails the extraction here, whatever
            # the header said its size was.
            self.overflow = True
            return -1
        self.output += ctypes.string_at(buffer, count)
        return count

    @_guarded(-1)
    def _seek(self, handle, offset, mode):
        state = self.handles.get(handle)
        if state is None or state[0] != "in":
            return -1
        base = {MSPACK_SYS_SEEK_START: 0, MSPACK_SYS_SEEK_CUR: state[1], MSPACK_SYS_SEEK_END: self.size}.get(mode)
        if base is None or not 0 <= base + offset <= self.size:
            return -1
        state[1] = base + offset
        return 0

    @_guarded(-1)
    def _tell(self, handle):
        state = self.handles.get(handle)
        return -1 if state is None else state[1]

    @_guarded(None)
    def _message(self, _file, _format):
        # Warnings for a human at a terminal; the return codes say what matters.
        self.messages += 1

    @_guarded(None)
    def _alloc(self, _system, size):
        # The one callback libc cannot take directly: malloc has no self argument.
        return self.library.malloc(size) or None


# -- in the child: one cabinet, one decompressor ------------------------------------

def describe(code: int) -> str:
    return MSPACK_ERRORS.get(code, f"error {code}")


def decode_here(library: Library, cabinet: CabBytes, size: int, want: int | None, limit: int) -> dict:
    """List the cabinet (its first ``size`` bytes) with libmspack and extract member `want`; runs in the child."""
    files = MemoryFiles(library, cabinet, size, limit)
    handle = library.create(ctypes.byref(files.system))
    if not handle:
        raise Refusal("libmspack could not create a cab decompressor")
    try:
        cabd = ctypes.cast(handle, ctypes.POINTER(MscabDecompressor)).contents
        cab = cabd.open(handle, ctypes.addressof(files.input_name))
        if not cab:
            raise Refusal(f"corrupt cabinet (libmspack: {describe(cabd.last_error(handle))})")
        try:
            return _list_and_extract(cabd, handle, cab, files, want)
        finally:
            cabd.close(handle, cab)
    finally:
        library.destroy(handle)


def _list_and_extract(cabd, handle, cab, files: MemoryFiles, want: int | None) -> dict:
    members, nodes = [], []
    node = cab.contents.files
    while node:
        if len(nodes) >= MAX_FILES:
            raise Refusal("libmspack listed more files than a cabinet can hold")
        entry = node.contents
        raw = ctypes.string_at(entry.filename) if entry.filename else b""
        members.append([raw.decode("latin-1"), entry.length])
        nodes.append(node)
        node = entry.next
    payload = None
    if want is not None:
        if want >= len(nodes):
            raise Refusal("libmspack lists fewer files than the cabinet header")
        name = members[want][0]
        rc = cabd.extract(handle, nodes[want], ctypes.addressof(files.output_name))
        if files.overflow:
            raise Refusal(f"member {name} is larger than {files.limit} bytes")
        if rc != MSPACK_ERR_OK:
            raise Refusal(f"corrupt cabinet (libmspack: {describe(rc)} extracting {name})")
        payload = files.output
    return {"length": cab.contents.length, "members": members, "payload": payload}


# -- the fork -------------------------------------------------------------------------

def decode(layout: CabLayout, label: str, want: int | None, limit: int) -> bytes | None:
    """Have libmspack list the cabinet (and extract member `want`) in a child; check what it says."""
    library = load(label)
    # A cabinet in a local file is read in the child through its read-only descriptor.
    fileno = getattr(layout.cabinet, "fileno", None)
    try:
        answer, payload = run_isolated(
            lambda: decode_here(library, layout.cabinet, layout.length, want, limit),
            label,
            library="libmspack",
            subject="the cabinet",
            cap=limit + ANSWER_OVERHEAD,
            timeout=CHILD_TIMEOUT + max(0, limit - TIMEOUT_FREE_LIMIT) / TIMEOUT_FREE_LIMIT,
            keep_fds=(fileno(),) if fileno else (),
        )
    except NativeError as e:
        raise CabError(label, e.problem, hint=e.hint or None) from None
    _check_agreement(answer, payload, layout, label, want)
    return payload


def _check_agreement(answer: dict, payload: bytes | None, layout: CabLayout, label: str, want: int | None) -> None:
    members = answer.get("members")
    if answer.get("length") != layout.length or not isinstance(members, list):
        raise CabError(label, "libmspack read a different cabinet than the header describes")
    try:
        listed = [(name.encode("latin-1"), size) for name, size in members]
    except (TypeError, ValueError, AttributeError):
        raise CabError(label, "the libmspack child sent a malformed answer") from None
    if listed != [(e.raw_name, e.size) for e in layout.entries]:
        raise CabError(label, "libmspack and the cabinet header disagree about the member list")
    if want is None:
        return
    entry = layout.entries[want]
    if payload is None or len(payload) != entry.size:
        got = "nothing" if payload is None else f"{len(payload)} bytes"
        raise CabError(label, f"libmspack extracted {got} of member {entry.name}, the header gives {entry.size} bytes")
