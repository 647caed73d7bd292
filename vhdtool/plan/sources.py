"""Cab sources (``--cabs``): a folder searched recursively, a single cab, or a vmguest.iso.

Every integration services cab found is read (its update.mum; the rest of the cab
stays in its file, read a chunk at a time for its SHA-256) and described by what
it is, not by what its name says: architecture and version come from the package
identity; the target NT version comes from the name (``Windows6.1-...``) and,
where the manifest names a parent package, must agree with it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from vhdtool.container.source import Source
from vhdtool.errors import CabSourceError, ImageNotFound, WriteFailed
from vhdtool.guest.versioninfo import version_tuple

IC_CAB_NAME = re.compile(r"^windows(\d+\.\d+)-hypervintegrationservices-(x86|x64|amd64|arm64)\.cab$", re.IGNORECASE)
ARCH_FROM_MANIFEST = {"amd64": "x64", "x86": "x86", "arm64": "arm64"}
ISO_MAGIC_OFFSET = 0x8001


@dataclass(frozen=True)
class CabCandidate:
    path: str  # where it is: a file path, or "vmguest.iso:/support/amd64/Windows6.1-...cab"
    source: str  # the --cabs argument it came from
    name: str  # file name
    version: str
    arch: str | None  # "x64", "x86", "arm64"
    nt: str | None  # target NT version, "6.1"
    sha256: str
    identity_name: str
    package_identifier: str | None
    problem: str | None = None  # why it can never be chosen (name and manifest disagree...)
    # What the cab's file was when sha256 was computed (Source.fingerprint), so that stage in the same
    # process need not hash it again while it is unchanged; None for a cab given as bytes.
    fingerprint: tuple | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "source": self.source,
            "name": self.name,
            "version": self.version,
            "arch": self.arch,
            "sha256": self.sha256,
            "nt": self.nt,
            "identity": self.identity_name,
            "package_identifier": self.package_identifier,
        }


@dataclass(frozen=True)
class CabCatalog:
    candidates: tuple[CabCandidate, ...]
    notes: tuple[str, ...]
    sources: tuple[str, ...]


def describe(data: bytes | Source, label: str, source: str, name: str) -> CabCandidate:
    from vhdtool.cabinet import read_package

    package = read_package(data, label)
    ident = package.identity
    arch = ARCH_FROM_MANIFEST.get(ident.arch.lower())
    m = IC_CAB_NAME.match(name)
    name_nt = m.group(1) if m else None
    name_arch = ARCH_FROM_MANIFEST.get(m.group(2).lower(), m.group(2).lower()) if m else None
    parent_nt = None
    if ident.parent_versions:
        parts = version_tuple(ident.parent_versions[0])
        parent_nt = f"{parts[0]}.{parts[1]}" if len(parts) >= 2 else None
    problem = None
    if name_nt and parent_nt and name_nt != parent_nt:
        problem = f"its name targets NT {name_nt} but its manifest's parent is NT {parent_nt}"
    elif name_arch and arch and name_arch != arch:
        problem = f"its name says {name_arch} but its manifest says {ident.arch}"
    elif arch is None:
        problem = f"unknown processor architecture '{ident.arch}'"
    nt = name_nt or parent_nt
    if nt is None and problem is None:
        problem = "its target NT version is unknown (neither its name nor its manifest say)"
    return CabCandidate(
        path=label,
        source=source,
        name=name,
        version=ident.version,
        arch=arch,
        nt=nt,
        sha256=package.sha256,
        identity_name=ident.name,
        package_identifier=ident.package_identifier,
        problem=problem,
        fingerprint=data.fingerprint() if isinstance(data, Source) else None,
    )


def _is_iso(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(ISO_MAGIC_OFFSET)
            return f.read(5) == b"CD001"
    except OSError:
        return False


def _open_file(path: Path) -> Source:
    """A local cab, open read-only (the caller closes it)."""
    from vhdtool.cabinet.format import MAX_CAB_FILE_SIZE

    try:
        source = Source(path)
    except ImageNotFound as e:
        raise CabSourceError(str(path), e.problem) from None
    if source.size > MAX_CAB_FILE_SIZE:
        source.close()
        raise CabSourceError(str(path), f"larger than {MAX_CAB_FILE_SIZE} bytes; not an integration services cab")
    return source


def _open_iso_entry(iso, entry, raw: str) -> Source:
    """One cab of an ISO, as a range of the ISO file (or a temporary copy; see vhdtool.iso)."""
    from vhdtool.cabinet.format import MAX_CAB_FILE_SIZE
    from vhdtool.progress import NO_PROGRESS, bar

    # The cab's name alone: with the ISO's too, an 80-column terminal would have no room for the bar.
    with bar(f"copying {entry.path.rsplit('/', 1)[-1]}", entry.size) as progress:
        return iso.source(entry, raw, MAX_CAB_FILE_SIZE, progress=None if progress is NO_PROGRESS else progress)


def _digest(source: Source, name: str) -> str:
    """The cab's SHA-256, read a chunk at a time, with a bar on a terminal when it is large (and slow)."""
    from vhdtool.progress import NO_PROGRESS, bar

    with bar(f"reading {name}", source.size) as progress:
        return source.sha256(progress=None if progress is NO_PROGRESS else progress)


def _described(source: Source, label: str, given: str, name: str) -> CabCandidate:
    """describe() of an open cab, which is then closed."""
    with source:
        try:
            _digest(source, name)
        except WriteFailed as e:  # cut short or replaced while it was read
            raise CabSourceError(label, e.problem, "run the command again") from None
        return describe(source, label, given, name)


def load_sources(paths: Iterable[str | os.PathLike]) -> CabCatalog:
    """Read every integration services cab of the given sources."""
    candidates: list[CabCandidate] = []
    notes: list[str] = []
    sources = []
    for raw in paths:
        source = os.fspath(raw)
        sources.append(source)
        path = Path(source)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() == ".cab")
            ic = [p for p in found if IC_CAB_NAME.match(p.name)]
            for p in found:
                if p not in ic:
                    notes.append(f"{p}: not an integration services cab name; skipped")
            for p in ic:
                candidates.append(_described(_open_file(p), str(p), source, p.name))
            if not ic:
                notes.append(f"{source}: no integration services cabs found")
        elif path.is_file() and _is_iso(path):
            candidates.extend(_from_iso(path, source, notes))
        elif path.is_file():
            candidates.append(_described(_open_file(path), str(path), source, path.name))
        elif not path.exists():
            raise CabSourceError(source, "no such file or folder")
        else:
            raise CabSourceError(source, "not a file or folder")
    return CabCatalog(tuple(candidates), tuple(notes), tuple(sources))


def _from_iso(path: Path, source: str, notes: list[str]) -> list[CabCandidate]:
    from vhdtool.iso import IsoImage

    out = []
    with IsoImage(path) as iso:
        for entry, raw in iso.support_cabs():
            name = entry.path.rsplit("/", 1)[-1]
            if not IC_CAB_NAME.match(name):
                notes.append(f"{path}:{entry.path}: not an integration services cab name; skipped")
                continue
            out.append(_described(_open_iso_entry(iso, entry, raw), f"{path}:{entry.path}", source, name))
    if not out:
        notes.append(f"{source}: no integration services cabs under /support")
    return out


def cab_source(candidate: CabCandidate) -> Source:
    """A chosen cab, opened again from its source and checked against the digest the plan verified:
    hashed anew a chunk at a time, unless its file is provably the one this process hashed for the
    plan (Source.adopt_sha256). The caller owns the Source (EditSession.write_file takes it over)."""
    source = Path(candidate.source)
    if source.is_file() and _is_iso(source):
        from vhdtool.iso import IsoImage

        inner = candidate.path[len(candidate.source) + 1 :]
        with IsoImage(source) as iso:
            match = [(f, raw) for f, raw in iso.support_cabs() if f.path == inner]
            if not match:
                raise CabSourceError(candidate.source, f"{inner} is no longer in the image")
            cab = _open_iso_entry(iso, match[0][0], match[0][1])
    else:
        cab = _open_file(Path(candidate.path))
    try:
        # Unchanged since this process hashed it for the plan: that digest holds. Else hash it again.
        digest = candidate.sha256 if cab.adopt_sha256(candidate.sha256, candidate.fingerprint) \
            else _digest(cab, candidate.name)
    except WriteFailed:  # cut short or replaced while it was read
        digest = None
    except BaseException:
        cab.close()
        raise
    if digest != candidate.sha256:
        cab.close()
        raise CabSourceError(candidate.path, "the cab changed since it was verified", "run the command again")
    return cab
