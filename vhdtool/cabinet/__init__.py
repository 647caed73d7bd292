"""Windows servicing cabinets and the package they carry.

A cab is checked byte by byte against its own length (``format``) before libmspack
is given it; libmspack then decodes it in the native sandbox (``libmspack``), and
its member list must agree with the one read here. update.mum, the package
manifest at the cabinet root, names the package (``mum``).
"""

from __future__ import annotations

import hashlib

from vhdtool.cabinet import libmspack, mum
from vhdtool.cabinet.format import (
    DEFAULT_MEMBER_LIMIT,
    MUM_MAX_SIZE,
    MUM_NAME,
    CabMember,
    CabPackage,
    check_cabinet,
    find_member,
    fold_name,
)
from vhdtool.errors import CabError
from vhdtool.units import MiB

__all__ = ["CabError", "CabMember", "CabPackage", "extract_member", "list_members", "read_package"]


# -- public API -----------------------------------------------------------------

def list_members(data: bytes, label: str) -> list[CabMember]:
    """The members of a single cabinet, in file table order."""
    layout = check_cabinet(data, label)
    libmspack.decode(layout, label, want=None, limit=0)
    return [CabMember(e.name, e.size) for e in layout.entries]


def extract_member(data: bytes, name: str, label: str, limit: int = DEFAULT_MEMBER_LIMIT) -> bytes:
    """The bytes of one member, named case-insensitively as Windows does."""
    layout = check_cabinet(data, label)
    index = find_member(layout, name, label)
    entry = layout.entries[index]
    if entry.size > limit:
        raise CabError(label, f"member {entry.name} is larger than {limit} bytes ({entry.size} bytes)")
    return libmspack.decode(layout, label, want=index, limit=limit)


def read_package(data: bytes, label: str) -> CabPackage:
    """The package a servicing cab carries: its members and the identity in its root update.mum."""
    layout = check_cabinet(data, label)
    matches = [i for i, e in enumerate(layout.entries) if fold_name(e.name) == MUM_NAME]
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
        sha256=hashlib.sha256(data).hexdigest(),
    )
