"""Payloads that stay in their files: a byte range of a local file that the commit copies file to file.

A file copied into a guest (copy-in, a staged cab) can be larger than the memory
of the machine doing it. It is never read whole into memory: the editor hands a
``Source`` (an open, read-only descriptor of a regular file, or of a byte range of
one, such as a cab inside an ISO) down the layers, the overlay holds
``SourceRange`` pieces of it where the file's clusters went, and the container
writer copies each piece from the source's descriptor into the image file in
chunks (``copy_file_range``; plain reads and writes where that is refused).

The source must not change between the moment its bytes are decided on (hashed,
compared, allocated) and the commit. ``Source.check_unchanged`` compares the
descriptor's identity (device, inode, size, modification and change times, the
way tar and rsync tell "file changed as we read it"); the container writers call
it after the payload is written and before the commit point, so a source changed
underneath leaves the image as it was.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from vhdtool.errors import ImageNotFound, WriteFailed
from vhdtool.units import MiB

READ_CHUNK = 4 * MiB  # hashing and comparing read this much at a time
HASH_APART = 16 * MiB  # ranges at least this large are hashed in a process of their own
MAX_HASHERS = 4  # at most this many at once (each holds a READ_CHUNK buffer); the others hash when asked
COPY_PIECE = 16 * MiB  # the writers copy, and report progress, this much at a time


class SourceChanged(WriteFailed):
    """A local file being copied in changed while vhdtool copied it; the image is left as it was."""

    hint = "the image is unchanged; copy from a file nothing writes to, then run the command again"


class Source:
    """``length`` bytes at ``start`` of the regular file ``path``, open read-only for as long as the operation runs.

    ``label`` names it in messages (a cab inside an ISO: ``vmguest.iso:/support/...``)."""

    _hashers: tuple[int, set[int]] = (0, set())  # (this process, its background hashers still running)

    def __init__(self, path: str | os.PathLike, start: int = 0, length: int | None = None, label: str | None = None):
        self.path = os.fspath(path)
        self.label = label or self.path
        try:
            fd = _open_readonly(self.path)
        except FileNotFoundError:
            raise ImageNotFound(self.label, "no such local file") from None
        except OSError as e:
            hint = ("copy fewer files in one run: each stays open until the commit" if e.errno == errno.EMFILE
                    else "give a readable local file")
            raise ImageNotFound(self.label, f"cannot read it ({e.strerror})", hint) from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise ImageNotFound(self.label, "not a regular file", "give a regular local file")
        size = st.st_size - start if length is None else length
        if start < 0 or size < 0 or start + size > st.st_size:
            os.close(fd)
            raise ImageNotFound(self.label, f"bytes {start}..{start + size} lie outside the {st.st_size}-byte file")
        self._fd: int | None = fd
        self.start = start
        self.size = size
        self._identity = self._identity_of(st)
        self._sha256: str | None = None
        self._hasher: tuple[int, int] | None = None  # (pid, pipe) of a background hasher (start_sha256)

    @staticmethod
    def _identity_of(st: os.stat_result) -> tuple:
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns

    def fileno(self) -> int:
        if self._fd is None:
            raise ValueError(f"{self.label} is closed")
        return self._fd

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"Source({self.label!r}, start={self.start}, size={self.size})"

    def whole(self) -> SourceRange:
        return SourceRange(self, 0, self.size)

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` of the range (not of the file); short only at the range's end."""
        length = max(0, min(length, self.size - offset))
        pos = self.start + offset
        try:
            first = os.pread(self.fileno(), length, pos)
        except OSError as e:
            raise WriteFailed(self.label, f"reading it failed ({e.strerror})", "check the file and its disk") from None
        if len(first) == length:
            return first  # the usual case: one read, no copy
        out = bytearray(first)
        pos += len(first)
        try:
            while len(out) < length:
                chunk = os.pread(self.fileno(), length - len(out), pos)
                if not chunk:
                    raise SourceChanged(self.label, "the file became shorter while it was being copied")
                out += chunk
                pos += len(chunk)
        except OSError as e:
            raise WriteFailed(self.label, f"reading it failed ({e.strerror})", "check the file and its disk") from None
        return bytes(out)

    def chunks(self, chunk: int = READ_CHUNK) -> Iterator[memoryview]:
        """The whole range, in order, ``chunk`` bytes at a time: views of one buffer, each valid until the next."""
        buf = bytearray(min(chunk, max(self.size, 1)))
        view = memoryview(buf)
        at = 0
        while at < self.size:
            n = min(len(buf), self.size - at)
            got = 0
            try:
                while got < n:
                    k = os.preadv(self.fileno(), [view[got:n]], self.start + at + got)
                    if k <= 0:
                        raise SourceChanged(self.label, "the file became shorter while it was being copied")
                    got += k
            except OSError as e:
                raise WriteFailed(self.label, f"reading it failed ({e.strerror})", "check the file and its disk") from None
            yield view[:n]
            at += n

    def start_sha256(self) -> None:
        """Begin hashing the range in a forked process, beside the rest of the operation (on another
        core, while libntfs-3g allocates and the commit copies); sha256() collects the answer.

        A process, not a thread: the sandbox forks later, and a fork must not copy a thread's
        half-held locks. Small ranges are hashed when asked for, in this process."""
        if self._sha256 is not None or self._hasher is not None or self.size < HASH_APART:
            return
        if len(_running()) >= MAX_HASHERS:
            return  # a copy-in of many large files: sha256() hashes the rest here, one at a time
        read_end, write_end = os.pipe()
        try:
            pid = os.fork()
        except OSError:
            os.close(read_end)
            os.close(write_end)
            return  # sha256() hashes here instead
        if pid == 0:  # the hasher: never returns
            code = 1
            try:
                os.close(read_end)
                h = hashlib.sha256()
                for chunk in self.chunks():
                    h.update(chunk)
                os.write(write_end, h.hexdigest().encode())
                code = 0
            finally:
                os._exit(code)
        os.close(write_end)
        self._hasher = (pid, read_end)
        _running().add(pid)

    def _collect(self) -> str | None:
        """The background hasher's digest, or None when it failed (the range is then hashed here)."""
        pid, fd = self._hasher
        self._hasher = None
        _running().discard(pid)
        try:
            answer = b""
            while chunk := os.read(fd, 128):
                answer += chunk
            _, status = os.waitpid(pid, 0)
        finally:
            os.close(fd)
        text = answer.decode("ascii", "replace")
        ok = os.waitstatus_to_exitcode(status) == 0 and len(text) == 64
        return text if ok and all(c in "0123456789abcdef" for c in text) else None

    def sha256(self, progress: Callable[[int], object] | None = None) -> str:
        """The SHA-256 of the range, read once (and kept: check_unchanged tells whether it still holds).

        ``progress(done)`` is told the bytes hashed so far, after each chunk."""
        if self._sha256 is None and self._hasher is not None:
            digest = self._collect()
            if digest is not None:
                self.check_unchanged()
                self._sha256 = digest
        if self._sha256 is None:
            h = hashlib.sha256()
            done = 0
            for chunk in self.chunks():
                h.update(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done)
            self.check_unchanged()
            self._sha256 = h.hexdigest()
        return self._sha256

    def settle(self) -> None:
        """What a writer calls after copying the range and before its commit point: a background hash
        is collected (so the digest the change set reports is of the bytes committed), and the file
        must be unchanged (SourceChanged, the image left as it was)."""
        if self._hasher is not None:
            self.sha256()
        self.check_unchanged()

    def fingerprint(self) -> tuple:
        """What this range was when opened: the file's identity (see check_unchanged), start and size."""
        return self._identity, self.start, self.size

    def adopt_sha256(self, digest: str, fingerprint: tuple | None) -> bool:
        """Take ``digest``, computed earlier (in this process) by a Source whose fingerprint() was
        ``fingerprint``, as this range's, if the file is still exactly what it was then; whether it was
        taken. This is the trust check_unchanged gives the commit: a write or a replacement changes
        the identity, and the range is then hashed anew."""
        if fingerprint is None or fingerprint != self.fingerprint():
            return False
        self.check_unchanged()
        self._sha256 = digest
        return True

    def same_bytes(self, chunks: Iterator[bytes]) -> bool:
        """Whether ``chunks`` (another file's content, in order, in pieces of any size) hold exactly this range."""
        pos = 0
        for chunk in chunks:
            if not chunk:
                continue
            if pos + len(chunk) > self.size or self.read(pos, len(chunk)) != chunk:
                return False
            pos += len(chunk)
        return pos == self.size

    def check_unchanged(self) -> None:
        """SourceChanged when the file is no longer what it was when opened (written to, truncated)."""
        # The descriptor's file, not the path's: a file renamed or replaced meanwhile is still read
        # through the descriptor, with the bytes that were hashed.
        try:
            now = self._identity_of(os.fstat(self.fileno()))
        except OSError as e:
            raise SourceChanged(self.label, f"it can no longer be read ({e.strerror})") from None
        if now != self._identity:
            raise SourceChanged(self.label, "the file changed while it was being copied")

    def close(self) -> None:
        if self._hasher is not None:
            pid, fd = self._hasher
            self._hasher = None
            _running().discard(pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            os.close(fd)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc) -> None:
        self.close()



def _running() -> set[int]:
    """This process's background hashers (a forked worker starts with none of its parent's)."""
    owner, pids = Source._hashers
    if owner != os.getpid():
        Source._hashers = (os.getpid(), pids := set())
    return pids


def _open_readonly(path: str) -> int:
    """A read-only descriptor of ``path``. Each Source stays open until the commit, so a copy of more files
    than the soft limit of open descriptors (often 1024) raises that limit to the hard one, once."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        if e.errno != errno.EMFILE:
            raise
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        if soft != resource.RLIM_INFINITY and soft >= target:
            raise
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            raise e from None
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


class TemporarySource(Source):
    """A Source over a temporary file vhdtool made (a cab copied out of an ISO or an .msu), removed when closed."""

    def close(self) -> None:
        if self._fd is not None:
            super().close()
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


@dataclass(frozen=True)
class SourceRange:
    """``length`` bytes at ``offset`` of a Source's range: data that the commit copies, never holds.

    Sliced like bytes (``r[a:b]`` is a SourceRange), measured with ``len``; ``bytes(r)``
    reads it, for the few places that need the bytes themselves (a piece that has to go
    through the VHDX log)."""

    source: Source
    offset: int
    length: int

    def __post_init__(self):
        if self.offset < 0 or self.length < 0 or self.offset + self.length > self.source.size:
            raise ValueError(f"{self.length} bytes at {self.offset} lie outside {self.source!r}")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, item: slice) -> SourceRange:
        if not isinstance(item, slice) or item.step not in (None, 1):
            raise TypeError("a SourceRange is sliced with [a:b] only")
        lo, hi, _ = item.indices(self.length)
        return SourceRange(self.source, self.offset + lo, max(0, hi - lo))

    def __bytes__(self) -> bytes:
        return self.source.read(self.offset, self.length)

    @property
    def file_offset(self) -> int:
        """Where the range starts in the source file itself."""
        return self.source.start + self.offset

    def follows(self, other: SourceRange) -> bool:
        """Whether this range starts where ``other`` ends, in the same source."""
        return self.source is other.source and other.offset + other.length == self.offset


def pieces(data, piece: int | None = None) -> Iterator[tuple[int, bytes | SourceRange]]:
    """(offset in data, part) of ``data`` in parts a writer writes one at a time: a SourceRange in ``piece``
    parts (COPY_PIECE, read at each call, so that a crash test can make the pieces small), bytes whole."""
    if not isinstance(data, SourceRange):
        yield 0, data
        return
    piece = piece or COPY_PIECE
    for at in range(0, len(data), piece):
        yield at, data[at : at + piece]


def copy_range(dst: int, dst_offset: int, data: SourceRange) -> int:
    """Copy ``data`` into the descriptor ``dst`` at ``dst_offset``; the bytes copied. OSError on failure.

    copy_file_range first (the kernel copies page to page, or shares the blocks where the
    filesystem can); plain reads and writes where the kernel refuses it for these files."""
    src = data.source.fileno()
    pos, end, at = data.file_offset, data.file_offset + data.length, dst_offset
    use_cfr = hasattr(os, "copy_file_range")
    while pos < end:
        n = 0
        if use_cfr:
            try:
                n = os.copy_file_range(src, dst, end - pos, pos, at)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
                    raise
                use_cfr = False
        if not use_cfr:
            chunk = os.pread(src, min(end - pos, MiB), pos)
            n = len(chunk)
            view = memoryview(chunk)
            w = at
            while view:
                k = os.pwrite(dst, view, w)
                if k <= 0:
                    raise OSError(errno.EIO, "short write")
                view, w = view[k:], w + k
        if n <= 0:
            raise OSError(errno.EIO, "the source ended early")
        pos += n
        at += n
    return data.length
