"""The virtual disk as a read-only, seekable binary stream.

Each container format implements ``read_at(offset, length)``; this class turns it
into the file-like object every upper layer consumes (``read``, ``readinto``,
``seek``, ``tell``), so nothing above the container knows which format it sits on.
"""

from __future__ import annotations

import io


class DiskStream(io.RawIOBase):
    format: str = ""
    size: int = 0
    block_size: int | None = None
    logical_sector_size: int = 512
    physical_sector_size: int = 512
    parent: DiskStream | None = None
    path: str = ""
    log_replayed: bool = False

    def __init__(self) -> None:
        super().__init__()
        self._pos = 0

    # -- format-specific ------------------------------------------------------
    def read_at(self, offset: int, length: int) -> bytes:  # pragma: no cover - abstract
        raise NotImplementedError

    def _close_backing(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    image = None  # the ImageFile every read of this disk goes through

    # -- differencing (vhdtool.container.chain opens the parent) ---------------------
    needs_parent: bool = False

    def parent_paths(self) -> list[tuple[str, bool]]:
        """Where the parent is, as (path, relative to this file?), in the order to try."""
        return []

    def attach_parent(self, parent: DiskStream) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def chain(self):
        """This disk, then its parent, its parent's parent..."""
        disk = self
        while disk is not None:
            yield disk
            disk = disk.parent

    @property
    def bytes_read(self) -> int:
        """Bytes read from this image file and its parents so far."""
        return sum(d.image.bytes_read for d in self.chain())

    @property
    def reads(self) -> int:
        return sum(d.image.reads for d in self.chain())

    # -- io.RawIOBase ---------------------------------------------------------
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self.size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise ValueError("negative seek position")
        self._pos = pos
        return pos

    def read(self, size: int = -1) -> bytes:
        if self.closed:
            raise ValueError("I/O operation on closed disk")
        if size is None or size < 0:
            size = max(0, self.size - self._pos)
        if self._pos >= self.size or size == 0:
            return b""
        size = min(size, self.size - self._pos)
        data = self.read_at(self._pos, size)
        self._pos += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            try:
                self._close_backing()
                if self.parent is not None:
                    self.parent.close()
            finally:
                super().close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path!r} format={self.format} size={self.size}>"
