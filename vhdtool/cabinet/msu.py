"""Microsoft Update Standalone Packages (.msu), as wusa.exe and DISM read them: a cab of cabs.

An .msu is an MS-CAB cabinet holding the package cab (``<KB>.cab``, such as
Windows6.1-KB3071740-x64.cab), ``WSUSSCAN.cab`` (Windows Update's applicability
data), ``<KB>-pkgProperties.txt`` (UTF-16 ``Key="value"`` lines, among them
``KB Article Number``) and an unattend ``<KB>.xml``. Windows 11 24H2 and later
ship .msu files that hold a ``.wim`` (beside servicing stack and metadata cabs)
instead of a package cab; those are refused.

The package cab is extracted by libmspack in the sandbox, at most
``MAX_PACKAGE_CAB`` bytes, into a temporary file (in TMPDIR) that its Source
removes when closed: its CFDATA blocks each carry an 8-byte header, so even a
stored (uncompressed) package cab is no contiguous byte range of the .msu.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass

from vhdtool.cabinet import extract_member, list_members
from vhdtool.cabinet.format import fold_name
from vhdtool.container.source import Source, TemporarySource
from vhdtool.errors import CabError, CabSourceError
from vhdtool.units import KiB, MiB

MAX_PACKAGE_CAB = 256 * MiB  # an integration services package is a few MiB; its pipe answer is held in memory
MAX_PROPERTIES = 64 * KiB
SCAN_CAB = "wsusscan.cab"
PROPERTIES_SUFFIX = "-pkgproperties.txt"
KB_ARTICLE = re.compile(r'^\s*KB Article Number\s*=\s*"?\s*(\d{1,10})\s*"?\s*$', re.IGNORECASE | re.MULTILINE)
TMP_HINT = "set TMPDIR to a folder with room for the package cab, or give its cab extracted (expand -F:*)"
WIM_HINT = "install it on the running system with wusa or DISM, or give the update as a .cab package"


@dataclass(frozen=True)
class MsuContents:
    package_cab: str  # the member name of the package cab
    kb: str | None  # "3071740", from pkgProperties.txt's KB Article Number


def read_msu(data: Source, label: str) -> MsuContents:
    """What the .msu holds: its one package cab, and the KB its pkgProperties.txt names."""
    members = list_members(data, label)
    names = [fold_name(m.name) for m in members]
    cabs = [m for m, n in zip(members, names) if n.endswith(".cab") and n != SCAN_CAB and "\\" not in n]
    if any(n.endswith(".wim") for n in names):  # beside it may sit SSU and metadata cabs, none of them the package
        raise CabSourceError(label, "a WIM-based .msu (Windows 11 24H2 and later) holds no package cab, "
                                    "and vhdtool stages only package cabs", WIM_HINT)
    if len(cabs) != 1:
        raise CabError(label, f"an .msu holds one package cab beside WSUSSCAN.cab; this one holds {len(cabs)}",
                       "use the .msu as downloaded from the Microsoft Update Catalog")
    package = cabs[0]
    if package.size > MAX_PACKAGE_CAB:
        raise CabError(label, f"its package cab {package.name} is larger than {MAX_PACKAGE_CAB // MiB} MiB "
                              f"({package.size} bytes); not an integration services package")
    props = [m for m, n in zip(members, names) if n.endswith(PROPERTIES_SUFFIX)]
    kb = _kb_article(extract_member(data, props[0].name, label, limit=MAX_PROPERTIES)) if len(props) == 1 else None
    return MsuContents(package.name, kb)


def _kb_article(text: bytes) -> str | None:
    """KB Article Number from pkgProperties.txt: UTF-16 with a byte order mark as Microsoft writes it."""
    if text.startswith((b"\xff\xfe", b"\xfe\xff")):
        decoded = text.decode("utf-16", errors="replace")
    else:
        decoded = text.decode("utf-8", errors="replace")
    m = KB_ARTICLE.search(decoded)
    return m.group(1).lstrip("0") or "0" if m else None


def package_cab(data: Source, contents: MsuContents, label: str) -> Source:
    """The package cab, extracted by libmspack into a temporary file that the returned Source removes when closed."""
    payload = extract_member(data, contents.package_cab, label, limit=MAX_PACKAGE_CAB)
    try:
        fd, path = tempfile.mkstemp(prefix="vhdtool-", suffix=".cab")
    except OSError as e:
        raise CabSourceError(label, f"cannot make a temporary file for {contents.package_cab} ({e.strerror})",
                             TMP_HINT) from None
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(payload)
        return TemporarySource(path, label=f"{label}:{contents.package_cab}")
    except OSError as e:
        os.unlink(path)
        raise CabSourceError(label, f"cannot write a temporary copy of {contents.package_cab} ({e.strerror})",
                             TMP_HINT) from None
    except BaseException:
        os.unlink(path)
        raise
