"""update.mum, a CBS package manifest (assembly manifest, namespace urn:schemas-microsoft-com:asm.v3).

The manifest is attacker-supplied XML, so it is read in two passes: expat
first, refusing any DOCTYPE (internal entities are how "billion laughs"
expansion bombs are built, and no package manifest has one) and checking it is
well-formed in an encoding Python can read; ElementTree second, for the
identity. The identity is the root's assemblyIdentity; the package element
names the KB; parent elements name the builds the package applies to.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from xml.parsers import expat

from vhdtool.cabinet.format import MUM_MAX_SIZE, PackageIdentity
from vhdtool.errors import CabError
from vhdtool.units import MiB

ASM_V3 = "urn:schemas-microsoft-com:asm.v3"
NAMESPACES = (ASM_V3, "")  # some tools write manifests without the namespace
# Windows file and package versions: up to four dot-separated 16-bit numbers.
VERSION = re.compile(r"^\d{1,5}(\.\d{1,5}){0,3}$")


class _Doctype(Exception):
    pass


def parse_identity(data: bytes, label: str) -> PackageIdentity:
    """The package identity an update.mum declares."""
    if len(data) > MUM_MAX_SIZE:
        raise CabError(label, f"update.mum is larger than {MUM_MAX_SIZE // MiB} MiB ({len(data)} bytes)")
    _check_xml(data, label)
    try:
        root = ET.fromstring(data)
    except (ET.ParseError, ValueError, LookupError) as e:
        raise CabError(label, f"update.mum is not readable XML ({e})") from None
    if _local(root.tag) != "assembly" or _namespace(root.tag) not in NAMESPACES:
        found = f"its root element is {str(root.tag)[:80]!r}, not an asm.v3 assembly"
        raise CabError(label, f"update.mum has no package identity ({found})")
    identity = _child(root, "assemblyIdentity")
    if identity is None:
        raise CabError(label, "update.mum has no package identity (no assemblyIdentity)")
    fields = {}
    for attr in ("name", "version", "processorArchitecture"):
        value = (identity.get(attr) or "").strip()
        if not value:
            raise CabError(label, f"update.mum has no package identity (assemblyIdentity has no {attr})")
        fields[attr] = value
    _check_version(fields["version"], label)
    package = _child(root, "package")
    parents = tuple(_parent_versions(package, label)) if package is not None else ()
    return PackageIdentity(
        name=fields["name"],
        version=fields["version"],
        arch=fields["processorArchitecture"],
        public_key_token=(identity.get("publicKeyToken") or "").strip() or None,
        package_identifier=((package.get("identifier") or "").strip() or None) if package is not None else None,
        parent_versions=parents,
        language=(identity.get("language") or "").strip() or None,
    )


def _check_xml(data: bytes, label: str) -> None:
    """Well-formed, in an encoding expat reads (UTF-8, UTF-16 by BOM, single-byte ones Python knows), no DOCTYPE."""
    parser = expat.ParserCreate()
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)

    def refuse_doctype(*_args):
        raise _Doctype

    parser.StartDoctypeDeclHandler = refuse_doctype
    parser.EntityDeclHandler = refuse_doctype
    try:
        parser.Parse(data, True)
    except _Doctype:
        why = "refused, since its entities could expand without bound"
        raise CabError(label, f"update.mum has a DOCTYPE; {why}") from None
    except expat.ExpatError as e:
        problem = f"{expat.ErrorString(e.code)}, line {e.lineno}"
        raise CabError(label, f"update.mum is not readable XML ({problem})") from None
    except (ValueError, LookupError) as e:
        raise CabError(label, f"update.mum is not readable XML ({e})") from None


def _parent_versions(package: ET.Element, label: str):
    """Versions of the assemblyIdentity elements of each <parent>, nested parents too, in document order."""
    for element in package:
        if _local(element.tag) == "parent" and _namespace(element.tag) in NAMESPACES:
            yield from _versions_under(element, label)


def _versions_under(parent: ET.Element, label: str):
    for element in parent:
        if _namespace(element.tag) not in NAMESPACES:
            continue
        if _local(element.tag) == "assemblyIdentity":
            version = (element.get("version") or "").strip()
            if version:
                _check_version(version, label, "parent ")
                yield version
        elif _local(element.tag) == "parent":
            yield from _versions_under(element, label)


def _check_version(version: str, label: str, what: str = "") -> None:
    if not VERSION.match(version) or any(int(part) > 0xFFFF for part in version.split(".")):
        raise CabError(label, f"update.mum has an invalid {what}version {version[:40]!r}")


def _child(element: ET.Element, local: str) -> ET.Element | None:
    for child in element:
        if _local(child.tag) == local and _namespace(child.tag) in NAMESPACES:
            return child
    return None


def _local(tag) -> str:
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def _namespace(tag) -> str:
    return tag[1:].split("}", 1)[0] if isinstance(tag, str) and tag.startswith("{") else ""
