"""Windows servicing cabinets and the package they carry.

A cab is checked byte by byte against its own length (``format``) before libmspack
is given it; libmspack then decodes it in the native sandbox (``libmspack``), and
its member list must agree with the one read here. update.mum, the package
manifest at the cabinet root, names the package (``mum``); update.cat beside it,
a signed catalog, is the package's signature (``catalog``: decoded by libmspack,
at most 64 MiB, then parsed and verified in the parent with asn1crypto and
cryptography).

A cab is given as bytes or as a ``Source`` (vhdtool.container.source: a local file,
or a cab's byte range inside an ISO). A Source is never read whole: the checks read
its headers, libmspack reads the blocks of the members it is asked for, and its
SHA-256 is computed a chunk at a time.
"""

from __future__ import annotations

import hashlib

from vhdtool.cabinet import libmspack, mum
from vhdtool.cabinet.catalog import CATALOG_MAX_SIZE, CATALOG_NAME, INVALID, UNSIGNED, Signature, TrustRoots
from vhdtool.cabinet.format import (
    DEFAULT_MEMBER_LIMIT,
    FileBytes,
    MUM_MAX_SIZE,
    MUM_NAME,
    CabMember,
    CabPackage,
    check_cabinet,
    find_member,
    members_named,
)
from vhdtool.container.source import Source
from vhdtool.errors import CabError, WriteFailed
from vhdtool.units import MiB

__all__ = ["CabError", "CabMember", "CabPackage", "extract_member", "list_members", "read_package"]


Cab = bytes | Source


def _checked(data: Cab, label: str):
    """The cabinet's layout, its header checked (a Source read through FileBytes)."""
    try:
        return check_cabinet(FileBytes(data) if isinstance(data, Source) else data, label)
    except WriteFailed as e:  # a local file cut short or unreadable while it was read
        raise CabError(label, e.problem) from None


def _sha256(data: Cab, label: str) -> str:
    if not isinstance(data, Source):
        return hashlib.sha256(data).hexdigest()
    try:
        return data.sha256()
    except WriteFailed as e:
        raise CabError(label, e.problem) from None


# -- public API -----------------------------------------------------------------

def list_members(data: Cab, label: str) -> list[CabMember]:
    """The members of a single cabinet, in file table order."""
    layout = _checked(data, label)
    libmspack.decode(layout, label, want=None, limit=0)
    return [CabMember(e.name, e.size) for e in layout.entries]


def extract_member(data: Cab, name: str, label: str, limit: int = DEFAULT_MEMBER_LIMIT) -> bytes:
    """The bytes of one member, named case-insensitively as Windows does."""
    layout = _checked(data, label)
    index = find_member(layout, name, label)
    entry = layout.entries[index]
    if entry.size > limit:
        raise CabError(label, f"member {entry.name} is larger than {limit} bytes ({entry.size} bytes)")
    return libmspack.decode(layout, label, want=index, limit=limit)


def read_package(data: Cab, label: str, roots: TrustRoots | None = None) -> CabPackage:
    """The package a servicing cab carries: its members, the identity in its root update.mum, and the
    verdict on its update.cat as a signature over that update.mum (chains to ``roots``, by default
    the shipped Microsoft roots)."""
    layout = _checked(data, label)
    matches = members_named(layout, MUM_NAME)
    if not matches:
        raise CabError(label, "no update.mum at the cabinet root, so this is not a servicing package")
    if len(matches) > 1:
        raise CabError(label, f"{len(matches)} members are named update.mum; the package identity is ambiguous")
    entry = layout.entries[matches[0]]
    if entry.size > MUM_MAX_SIZE:
        raise CabError(label, f"update.mum is larger than {MUM_MAX_SIZE // MiB} MiB ({entry.size} bytes)")
    manifest = libmspack.decode(layout, label, want=matches[0], limit=MUM_MAX_SIZE)
    return CabPackage(
        label=label,
        members=tuple(CabMember(e.name, e.size) for e in layout.entries),
        identity=mum.parse_identity(manifest, label),
        sha256=_sha256(data, label),
        signature=_signature(layout, manifest, label, roots),
    )


def _signature(layout, manifest: bytes, label: str, roots: TrustRoots | None) -> Signature:
    from vhdtool.cabinet.catalog import verify_catalog

    matches = members_named(layout, CATALOG_NAME)
    if not matches:
        return Signature(UNSIGNED, "the cab has no update.cat")
    if len(matches) > 1:
        return Signature(INVALID, f"{len(matches)} members are named update.cat; the signature is ambiguous")
    entry = layout.entries[matches[0]]
    if entry.size > CATALOG_MAX_SIZE:
        return Signature(INVALID, f"update.cat is larger than {CATALOG_MAX_SIZE // MiB} MiB ({entry.size} bytes)")
    catalog = libmspack.decode(layout, label, want=matches[0], limit=CATALOG_MAX_SIZE)
    return verify_catalog(catalog, manifest, roots or TrustRoots.shipped())
