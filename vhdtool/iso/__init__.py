"""ISO 9660 images (ECMA-119, Joliet, UDF) through pycdlib: the cabs of vmguest.iso, read in place.

Nothing is extracted to disk: a cab is read into memory straight from the image.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from vhdtool.errors import IsoError, translating
from vhdtool.units import MiB

MAX_ENTRIES = 100_000
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
        """The .cab files under /support, where vmguest.iso keeps one folder per architecture.

        An image with no /support folder at all is not an integration services disk.
        """
        entries = list(self.files())
        if not any(f.path.lower().startswith("/support/") for f, _ in entries):
            raise IsoError(self.path, "has no support folder: not an integration services disk (vmguest.iso)")
        return [(f, raw) for f, raw in entries if f.path.lower().startswith("/support/") and f.path.lower().endswith(".cab")]

    def read(self, entry: IsoFile, raw_path: str, limit: int,
             progress: Callable[[int], bool | None] | None = None) -> bytes:
        """The bytes of ``entry``; ``progress(done)`` is told how many have been read so far (see read_reporting)."""
        if entry.size > limit:
            raise IsoError(self.path, f"{entry.path} is larger than {limit} bytes")
        with translating(IsoError, self.path, f"cannot read {entry.path} (the image may be truncated)"):
            with self._iso.open_file_from_iso(**{self._key: raw_path}) as fh:
                data = fh.read(limit + 1) if progress is None else read_reporting(fh, limit + 1, progress)
        # pycdlib returns what is there: a short read means the image was cut.
        if len(data) != entry.size:
            raise IsoError(self.path, f"truncated: {entry.path} should hold {entry.size} bytes, {len(data)} are there")
        return data


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
