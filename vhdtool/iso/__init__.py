"""ISO 9660 images (ECMA-119, Joliet, UDF) through pycdlib: the cabs of vmguest.iso, read in place.

A cab is handed on as a Source (vhdtool.container.source), never read into memory.
An ISO 9660 or Joliet file is one contiguous extent of the image (ECMA-119 9.1.3 and
9.1.4: location of extent, data length; no interleaving, 9.1.7 and 9.1.8; one
directory record, 9.1.6's multi-extent bit clear), so its Source is that byte range
of the ISO file itself. A file pycdlib gives no such extent for (UDF, whose
allocation descriptors may scatter it) is copied a chunk at a time into a temporary
file that its Source removes when closed.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from vhdtool.container.source import Source, TemporarySource
from vhdtool.errors import IsoError, translating
from vhdtool.units import MiB

MAX_ENTRIES = 100_000
SPILL_HINT = "set TMPDIR to a folder with room for the cab, or give the cabs as a folder"
SECTOR = 2048  # ECMA-119 logical block size, the only one pycdlib and vmguest.iso use
READ_CHUNK = 8 * MiB  # a read that reports its progress reads this much at a time
PROBE_CHUNK = 2 * MiB  # its first read, which tells whether it is slow enough to report


@dataclass(frozen=True)
class IsoFile:
    path: str  # as shown to users: "/support/amd64/Windows6.1-HyperVIntegrationServices-x64.cab"
    size: int


class IsoImage:
    def __init__(self, path: str | os.PathLike):
        import pycdlib

        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise IsoError(self.path, "no such file")
        self._iso = pycdlib.PyCdlib()
        with translating(IsoError, self.path, "not a readable ISO image"):
            self._iso.open(self.path)
        # The primary volume descriptor (ECMA-119 8.4) says how long the image is; a shorter
        # file was cut, even where the files needed still happen to be inside it.
        with open(self.path, "rb") as f:
            f.seek(16 * 2048)
            pvd = f.read(2048)
            size = os.fstat(f.fileno()).st_size
        blocks = int.from_bytes(pvd[80:84], "little")
        block_size = int.from_bytes(pvd[128:130], "little")
        if pvd[1:6] == b"CD001" and blocks * block_size > size:
            self.close()
            raise IsoError(self.path, f"truncated: the volume spans {blocks * block_size} bytes, the file has {size}")
        self._file_size = size
        self._block_size = block_size if pvd[1:6] == b"CD001" else 0
        # Joliet and UDF keep the real (mixed-case, long) names; plain ISO 9660 is the fallback.
        if self._iso.has_joliet():
            self._facet, self._key = self._iso.get_joliet_facade(), "joliet_path"
        elif self._iso.has_udf():
            self._facet, self._key = self._iso.get_udf_facade(), "udf_path"
        else:
            self._facet, self._key = self._iso.get_iso9660_facade(), "iso_path"

    def close(self) -> None:
        # Closing only drops pycdlib's handle and tables; a damaged image cannot make it fail usefully.
        with contextlib.suppress(Exception):
            self._iso.close()

    def __enter__(self) -> IsoImage:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def files(self) -> Iterator[tuple[IsoFile, str]]:
        """Every regular file, depth first, with the path pycdlib knows it by."""
        count = 0
        with translating(IsoError, self.path, "damaged directory structure"):
            for dirpath, _dirs, names in self._facet.walk("/"):
                for name in names:
                    count += 1
                    if count > MAX_ENTRIES:
                        raise IsoError(self.path, f"more than {MAX_ENTRIES} files")
                    shown = name.split(";")[0] if self._key == "iso_path" else name
                    full = dirpath.rstrip("/") + "/" + name
                    record = self._facet.get_record(full)
                    size = record.get_data_length() if hasattr(record, "get_data_length") else 0
                    yield IsoFile(dirpath.rstrip("/") + "/" + shown, size), full

    def support_cabs(self) -> list[tuple[IsoFile, str]]:
        """The .cab (and update .msu) files under /support, where vmguest.iso keeps one folder per architecture.

        An image with no /support folder at all is not an integration services disk.
        """
        entries = list(self.files())
        if not any(f.path.lower().startswith("/support/") for f, _ in entries):
            raise IsoError(self.path, "has no support folder: not an integration services disk (vmguest.iso)")
        return [(f, raw) for f, raw in entries
                if f.path.lower().startswith("/support/") and f.path.lower().endswith((".cab", ".msu"))]

    def source(self, entry: IsoFile, raw_path: str, limit: int,
               progress: Callable[[int], bool | None] | None = None) -> Source:
        """The bytes of ``entry`` as a Source labelled ``iso:path``, which the caller closes: a range of the
        ISO file where the record gives one extent, else a temporary copy (``progress(done)`` follows it)."""
        if entry.size > limit:
            raise IsoError(self.path, f"{entry.path} is larger than {limit} bytes")
        label = f"{self.path}:{entry.path}"
        with translating(IsoError, self.path, f"cannot read {entry.path} (the image may be truncated)"):
            start = self._extent_start(self._facet.get_record(raw_path))
        if start is None:
            return self._spill(entry, raw_path, label, progress)
        there = max(0, min(entry.size, self._file_size - start))
        if there != entry.size:
            raise IsoError(self.path, f"truncated: {entry.path} should hold {entry.size} bytes, {there} are there")
        return Source(self.path, start, entry.size, label=label)

    def _extent_start(self, record) -> int | None:
        """Where a file's one contiguous extent starts in the ISO file; None when the record is not
        a plain ISO 9660/Joliet one (UDF, interleaved, multi-extent) or the block size is unusual."""
        if self._key == "udf_path" or self._block_size != SECTOR:
            return None
        if not all(hasattr(record, a) for a in ("extent_location", "file_unit_size", "interleave_gap_size",
                                                 "data_continuation")):
            return None
        if record.file_unit_size or record.interleave_gap_size or record.data_continuation is not None:
            return None
        return record.extent_location() * SECTOR

    def _spill(self, entry: IsoFile, raw_path: str, label: str,
               progress: Callable[[int], bool | None] | None) -> Source:
        try:
            fd, path = tempfile.mkstemp(prefix="vhdtool-", suffix=".cab")
        except OSError as e:
            raise IsoError(self.path, f"cannot make a temporary copy of {entry.path} ({e.strerror})",
                           SPILL_HINT) from None
        try:
            with os.fdopen(fd, "wb") as out:
                with translating(IsoError, self.path, f"cannot read {entry.path} (the image may be truncated)"):
                    with self._iso.open_file_from_iso(**{self._key: raw_path}) as fh:
                        done = self._copy(fh, out, entry, progress)
            # pycdlib returns what is there: a short read means the image was cut.
            if done != entry.size:
                raise IsoError(self.path, f"truncated: {entry.path} should hold {entry.size} bytes, {done} are there")
            return SpilledSource(path, label=label)
        except BaseException:
            os.unlink(path)
            raise


    def _copy(self, fh, out, entry: IsoFile, progress: Callable[[int], bool | None] | None) -> int:
        """Copy ``entry`` (and at most one byte more) from ``fh`` to ``out`` a chunk at a time; how many there were."""
        done, limit = 0, entry.size + 1
        while done < limit:
            chunk = fh.read(min(READ_CHUNK, limit - done))
            if not chunk:
                break
            try:
                out.write(chunk)
            except OSError as e:
                raise IsoError(self.path, f"cannot make a temporary copy of {entry.path} ({e.strerror})",
                               SPILL_HINT) from None
            done += len(chunk)
            if progress is not None:
                progress(done)
        return done


class SpilledSource(TemporarySource):
    """A Source over a temporary copy of an ISO's file, removed when the Source is closed."""


def read_reporting(fh, limit: int, progress: Callable[[int], bool | None]) -> bytes:
    """Up to ``limit`` bytes of ``fh``, from where it stands to its end, in chunks, telling
    ``progress(done)`` how far it got.

    ``progress`` returning False says it will show nothing of this read (it is going fast):
    the read then starts over with one call for all of it, which costs a re-read of the
    first chunk but copies the data once, where joining chunks would copy it twice.
    """
    start = fh.tell()
    chunks, done = [], 0
    while done < limit:
        want = min(PROBE_CHUNK if not chunks else READ_CHUNK, limit - done)
        chunk = fh.read(want)
        chunks.append(chunk)
        done += len(chunk)
        wanted = progress(done)
        if len(chunk) < want:
            break  # the end (or a cut file: the caller compares the length)
        if wanted is False:
            fh.seek(start)
            return fh.read(limit)
    return b"".join(chunks)
