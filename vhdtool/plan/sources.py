"""Cab sources (``--cabs``): a folder searched recursively, a single cab or .msu, or a vmguest.iso.

Every integration services cab found is read (its update.mum; the rest of the cab
stays in its file, read a chunk at a time for its SHA-256) and described by what
it is, not by what its name says: architecture and version come from the package
identity; the target NT version comes from the name (``Windows6.1-...``) and,
where the manifest names a parent package, must agree with it. An .msu
(``Windows6.1-KB3071740-x64.msu``) is judged by the package cab it holds
(vhdtool.cabinet.msu), which is what stage writes; its KB number comes from its
name and its pkgProperties.txt, which must agree.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from vhdtool.container.source import Source
from vhdtool.errors import CabSourceError, ImageNotFound, WriteFailed
from vhdtool.guest.versioninfo import version_tuple

IC_CAB_NAME = re.compile(r"^windows(\d+\.\d+)-hypervintegrationservices-(x86|x64|amd64|arm64)\.cab$", re.IGNORECASE)
# Update packages as the Microsoft Update Catalog names them: Windows6.1-KB3071740-x64.msu, the package cab
# inside (same name, .cab), and Windows 11's windows11.0-kb5043080-x64_<sha1>.msu.
KB_NAME = re.compile(r"^windows(\d+\.\d+)-kb(\d+)(?:-v\d+)?-(x86|x64|amd64|arm64)(?:_[0-9a-f]+)?\.(cab|msu)$",
                     re.IGNORECASE)
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
    kb: str | None = None  # "3071740": the KB number of an .msu
    msu: str | None = None  # the .msu the cab is the package cab of, labelled as path is
    # The verdict on its update.cat (vhdtool.cabinet.catalog): microsoft, trusted, untrusted, unsigned, invalid.
    signature: str | None = None
    signature_reason: str | None = None
    # name~publicKeyToken~arch~language~version: what CBS will record it as; stage writes it beside the cab
    cbs_identity: str | None = None

    @property
    def container(self) -> str:
        """The file the plan read, labelled as path is: the cab itself, or the .msu holding it."""
        return self.msu or self.path

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
            "kb": self.kb,
            "msu": self.msu,
            "signature": self.signature,
            "signature_reason": self.signature_reason,
            "cbs_identity": self.cbs_identity,
        }


@dataclass(frozen=True)
class CabCatalog:
    candidates: tuple[CabCandidate, ...]
    notes: tuple[str, ...]
    sources: tuple[str, ...]
    require_signed: bool = False  # --require-signed: only a cab whose signature is microsoft or trusted is chosen


def _name_target(name: str) -> tuple[str | None, str | None]:
    """(NT version, architecture) a cab or .msu's name says it is for, or (None, None)."""
    ic, kb = IC_CAB_NAME.match(name), KB_NAME.match(name)
    if not (ic or kb):
        return None, None
    nt, arch = (ic.group(1), ic.group(2)) if ic else (kb.group(1), kb.group(3))
    return nt, ARCH_FROM_MANIFEST.get(arch.lower(), arch.lower())


def describe(data: bytes | Source, label: str, source: str, name: str,
             kb: str | None = None, msu: str | None = None, roots=None) -> CabCandidate:
    from vhdtool.cabinet import read_package

    package = read_package(data, label, roots)
    ident = package.identity
    arch = ARCH_FROM_MANIFEST.get(ident.arch.lower())
    name_nt, name_arch = _name_target(name)
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
        kb=kb,
        msu=msu,
        signature=package.signature.status,
        signature_reason=package.signature.reason,
        cbs_identity=ident.cbs_identity,
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


def _described(source: Source, label: str, given: str, name: str, roots=None) -> CabCandidate:
    """describe() of an open cab, which is then closed."""
    with source:
        try:
            _digest(source, name)
        except WriteFailed as e:  # cut short or replaced while it was read
            raise CabSourceError(label, e.problem, "run the command again") from None
        return describe(source, label, given, name, roots=roots)


def _is_msu(name: str) -> bool:
    return name.lower().endswith(".msu")


def _accepted(name: str) -> bool:
    """A name --cabs takes from a folder or an ISO: an integration services cab, or an update .msu."""
    return bool(IC_CAB_NAME.match(name)) or (_is_msu(name) and bool(KB_NAME.match(name)))


def _described_msu(msu: Source, label: str, given: str, name: str, roots=None) -> CabCandidate:
    """describe() of the package cab of an open .msu (which is then closed), with the .msu's KB number."""
    from vhdtool.cabinet.msu import package_cab, read_msu

    with msu:
        contents = read_msu(msu, label)
        cab = package_cab(msu, contents, label)
    candidate = _described(cab, cab.label, given, contents.package_cab, roots)
    m = KB_NAME.match(name)
    named = m.group(2).lstrip("0") or "0" if m else None
    kb = contents.kb or named
    candidate = replace(candidate, kb=kb, msu=label, fingerprint=None)
    if named and contents.kb and named != contents.kb and candidate.problem is None:
        candidate = replace(candidate, problem=f"its name says KB{named} but its pkgProperties.txt says "
                                               f"KB{contents.kb}")
    return candidate


def _described_file(path: Path, given: str, roots) -> CabCandidate:
    if _is_msu(path.name):
        return _described_msu(_open_file(path), str(path), given, path.name, roots)
    return _described(_open_file(path), str(path), given, path.name, roots)


def load_sources(paths: Iterable[str | os.PathLike], trust_roots: Iterable[str | os.PathLike] = (),
                 require_signed: bool = False) -> CabCatalog:
    """Read every integration services cab of the given sources, each cab's signature checked against the
    shipped Microsoft roots and ``trust_roots`` (PEM files); ``require_signed`` is kept for the plan."""
    from vhdtool.cabinet.catalog import TrustRoots

    # --trust-root files are read now (a bad one is an error whatever the cabs are); the shipped roots
    # alone are read when a cab's catalog is first checked: an unsigned cab needs no certificates.
    extra = tuple(os.fspath(r) for r in trust_roots)
    roots = TrustRoots.load(extra) if extra else None
    candidates: list[CabCandidate] = []
    notes: list[str] = []
    sources = []
    for raw in paths:
        source = os.fspath(raw)
        sources.append(source)
        path = Path(source)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in (".cab", ".msu"))
            ic = [p for p in found if _accepted(p.name)]
            for p in found:
                if p not in ic:
                    notes.append(f"{p}: not an integration services cab or update .msu name; skipped")
            for p in ic:
                candidates.append(_described_file(p, source, roots))
            if not ic:
                notes.append(f"{source}: no integration services cabs found")
        elif path.is_file() and _is_iso(path):
            candidates.extend(_from_iso(path, source, notes, roots))
        elif path.is_file():
            candidates.append(_described_file(path, source, roots))
        elif not path.exists():
            raise CabSourceError(source, "no such file or folder")
        else:
            raise CabSourceError(source, "not a file or folder")
    return CabCatalog(tuple(candidates), tuple(notes), tuple(sources), require_signed)


def _from_iso(path: Path, source: str, notes: list[str], roots) -> list[CabCandidate]:
    from vhdtool.iso import IsoImage

    out = []
    with IsoImage(path) as iso:
        for entry, raw in iso.support_cabs():
            name = entry.path.rsplit("/", 1)[-1]
            if not _accepted(name):
                notes.append(f"{path}:{entry.path}: not an integration services cab or update .msu name; skipped")
                continue
            describe_entry = _described_msu if _is_msu(name) else _described
            out.append(describe_entry(_open_iso_entry(iso, entry, raw), f"{path}:{entry.path}", source, name, roots))
    if not out:
        notes.append(f"{source}: no integration services cabs under /support")
    return out


def _reopened(candidate: CabCandidate) -> Source:
    """The file the plan read for this candidate (the cab, or the .msu holding it), opened again."""
    source = Path(candidate.source)
    if source.is_file() and _is_iso(source):
        from vhdtool.iso import IsoImage

        inner = candidate.container[len(candidate.source) + 1 :]
        with IsoImage(source) as iso:
            match = [(f, raw) for f, raw in iso.support_cabs() if f.path == inner]
            if not match:
                raise CabSourceError(candidate.source, f"{inner} is no longer in the image")
            return _open_iso_entry(iso, match[0][0], match[0][1])
    return _open_file(Path(candidate.container))


def cab_source(candidate: CabCandidate) -> Source:
    """A chosen cab, opened again from its source and checked against the digest the plan verified:
    hashed anew a chunk at a time, unless its file is provably the one this process hashed for the
    plan (Source.adopt_sha256). The caller owns the Source (EditSession.write_file takes it over)."""
    cab = _reopened(candidate)
    if candidate.msu is not None:
        from vhdtool.cabinet.msu import package_cab, read_msu

        with cab:
            cab = package_cab(cab, read_msu(cab, candidate.msu), candidate.msu)
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
