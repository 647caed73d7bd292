"""The host/guest OS matrix of Hyper-V integration services, as data (cabs/matrix.json).

Each revision of the source document is a set of three host tables; a row says how a
guest gets its integration services on that host (windows-update,
integration-services-disk, package-manager), the service pack it needs, and whether
it needs the Data Exchange service (footnote: else the KB3071740 cab).
"""

from __future__ import annotations

import importlib.resources
import json
from dataclasses import dataclass
from functools import lru_cache

from vhdtool.errors import UnknownKey

HOSTS = ("win8", "win8.1", "win10")


@dataclass(frozen=True)
class MatrixRow:
    host: str
    guest: str
    method: str
    requires_data_exchange: bool
    min_service_pack: int | None
    note: str | None

    def to_dict(self) -> dict:
        return {
            "host": self.host,
            "guest": self.guest,
            "method": self.method,
            "requires_data_exchange": self.requires_data_exchange,
            "min_service_pack": self.min_service_pack,
            "note": self.note,
        }


@dataclass(frozen=True)
class Host:
    key: str
    name: str
    aliases: tuple[str, ...]
    vmguest_iso: bool
    note: str | None


@dataclass(frozen=True)
class Matrix:
    revision: str
    description: str
    hosts: tuple[Host, ...]
    rows: tuple[MatrixRow, ...]
    footnotes: tuple[tuple[str, str], ...]

    def host(self, key: str) -> Host:
        return next(h for h in self.hosts if h.key == key)

    def table(self, host: str) -> tuple[MatrixRow, ...]:
        return tuple(r for r in self.rows if r.host == host)

    def row(self, host: str, guest: str) -> MatrixRow | None:
        return next((r for r in self.rows if r.host == host and r.guest == guest), None)

    def resolve_host(self, text: str) -> str:
        """The host key for ``text`` (a key or an alias, case-insensitive)."""
        want = text.strip().lower().replace(" ", "")
        for h in self.hosts:
            if want == h.key or want in h.aliases:
                return h.key
        known = ", ".join(f"{h.key} ({', '.join(h.aliases)})" for h in self.hosts)
        raise UnknownKey(None, f"unknown host '{text}'", f"use one of: {known}")


@lru_cache(maxsize=None)
def _document() -> dict:
    return json.loads(importlib.resources.files("vhdtool.cabs").joinpath("matrix.json").read_text("utf-8"))


def revisions() -> tuple[str, ...]:
    return tuple(_document()["revisions"])


def default_revision() -> str:
    return _document()["default_revision"]


@lru_cache(maxsize=None)
def load_matrix(revision: str | None = None) -> Matrix:
    doc = _document()
    revision = revision or doc["default_revision"]
    if revision not in doc["revisions"]:
        raise UnknownKey(
            None, f"unknown matrix revision '{revision}'", f"use one of: {', '.join(doc['revisions'])}"
        )
    rev = doc["revisions"][revision]
    hosts = tuple(
        Host(key, h["name"], tuple(a.lower() for a in h.get("aliases", ())), bool(h["vmguest_iso"]), h.get("note"))
        for key, h in doc["hosts"].items()
    )
    rows = tuple(
        MatrixRow(
            host=host,
            guest=r["guest"],
            method=r["method"],
            requires_data_exchange=bool(r["requires_data_exchange"]),
            min_service_pack=r["min_service_pack"],
            note=r["note"],
        )
        for host in HOSTS
        for r in rev["tables"][host]
    )
    return Matrix(revision, rev["description"], hosts, rows, tuple(doc.get("footnotes", {}).items()))
