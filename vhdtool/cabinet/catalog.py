"""A servicing cab's update.cat: a signed catalog (a PKCS#7 SignedData whose content is a certificate trust list).

A catalog is an Authenticode-style PKCS#7 SignedData (RFC 2315 9.1; content type
szOID_CTL 1.3.6.1.4.1.311.10.1, carried as the CTL SEQUENCE itself, not an OCTET
STRING). Its content lists members by hash: each trusted subject's identifier is the
member's hash (raw, or as the UTF-16 hex tag of version 1 catalogs), and its
SPC_INDIRECT_DATA attribute carries the same digest with its algorithm. For a file
that is not a PE image (update.mum) the digest is the hash of the whole file (SHA-1
in version 1 catalogs, SHA-256 in version 2).

The verdict, one of ``SIGNATURES``:

- ``invalid``: the catalog cannot be read, its signature does not verify (the
  messageDigest attribute against the content, the signer's signature over the
  authenticated attributes), or it does not list this update.mum;
- ``microsoft``: valid, lists update.mum, and the signer's chain ends in a shipped
  Microsoft root (roots/, see its README); a SHA-1 chain, which cryptography's verifier
  refuses, is checked by vhdtool.cabinet.legacychain and says so in the reason;
- ``trusted``: the same, ending in a root given with ``--trust-root`` (an extension
  of the four verdicts the plan documents, so that a private root is never called
  Microsoft);
- ``untrusted``: valid and listing update.mum, but no chain to any of those roots;
- ``unsigned``: the cab has no update.cat, or its catalog has no signer.

The bytes are hostile: asn1crypto parses the structure (lazily, each field when
read), cryptography checks the signature and builds the chain; anything either
raises is an ``invalid`` verdict naming the problem, never a traceback.

Time: there is no network, so no CRL or OCSP is consulted. The chain is checked at
the catalog's own date (the CTL's thisUpdate, which the signature covers), not at
today's: Microsoft's signing certificates live about a year, and Windows accepts a
catalog signed while they were valid. The timestamp countersignature is not
verified, so that date is the signer's word: a catalog made with an expired (but
unrevoked) certificate and a backdated thisUpdate is accepted, as it would be
with validity periods ignored.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import dataclass
from importlib import resources

from vhdtool.errors import CabSourceError, first_line
from vhdtool.units import MiB

MICROSOFT, TRUSTED, UNTRUSTED, UNSIGNED, INVALID = "microsoft", "trusted", "untrusted", "unsigned", "invalid"
SIGNATURES = (MICROSOFT, TRUSTED, UNTRUSTED, UNSIGNED, INVALID)
CATALOG_NAME = "update.cat"
CATALOG_MAX_SIZE = 64 * MiB
SZOID_CTL = "1.3.6.1.4.1.311.10.1"
SPC_INDIRECT_DATA = "1.3.6.1.4.1.311.2.1.4"
CODE_SIGNING = "1.3.6.1.5.5.7.3.3"
DIGESTS = {"sha1": hashlib.sha1, "sha256": hashlib.sha256, "sha384": hashlib.sha384, "sha512": hashlib.sha512}
ROOT_HINT = "give the root certificate as a PEM file"


@dataclass(frozen=True)
class Signature:
    status: str  # one of SIGNATURES
    reason: str  # why, in a phrase: "signed by Microsoft Windows, chain to Microsoft Root Certificate Authority 2010"
    signer: str | None = None  # the signer certificate's common name


class _Invalid(Exception):
    """The catalog's signature or membership failed: the message is the reason."""


@dataclass(frozen=True)
class TrustRoots:
    """The roots a chain may end in: the shipped Microsoft ones, and those given with --trust-root."""

    microsoft: tuple  # cryptography x509.Certificate
    added: tuple = ()

    @classmethod
    def shipped(cls) -> "TrustRoots":
        """The shipped Microsoft roots alone (read once per process, when a catalog is first checked)."""
        global _SHIPPED
        if _SHIPPED is None:
            from cryptography import x509

            roots = []
            for entry in sorted(resources.files("vhdtool.cabinet").joinpath("roots").iterdir(), key=lambda e: e.name):
                if entry.name.endswith(".pem"):
                    roots.extend(x509.load_pem_x509_certificates(entry.read_bytes()))
            _SHIPPED = cls(tuple(roots))
        return _SHIPPED

    @classmethod
    def load(cls, extra: tuple[str | os.PathLike, ...] = ()) -> "TrustRoots":
        """The shipped roots and the roots in the PEM files ``extra``."""
        return cls(cls.shipped().microsoft, tuple(c for path in extra for c in _read_root(path)))


_SHIPPED: TrustRoots | None = None


def _read_root(path: str | os.PathLike) -> list:
    from cryptography import x509

    try:
        with open(path, "rb") as f:
            data = f.read(CATALOG_MAX_SIZE + 1)
    except OSError as e:
        raise CabSourceError(path, f"--trust-root: cannot read it ({e.strerror})", ROOT_HINT) from None
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise CabSourceError(path, f"--trust-root: not a PEM certificate ({first_line(e)})", ROOT_HINT) from None
    return certs


@dataclass(frozen=True)
class CatalogCheck:
    """A catalog checked on its own: the verdict on its signature and chain, and the hashes it lists."""

    verdict: Signature  # microsoft, trusted, untrusted (valid signature), unsigned, or invalid
    digests: frozenset = frozenset()  # (algorithm, digest) of each member's SPC_INDIRECT_DATA
    identifiers: frozenset = frozenset()  # the identifiers (tags) of members without indirect data

    def lists(self, data: bytes) -> bool:
        """Whether a member vouches for the file ``data`` (hashed whole, as a catalog hashes a non-PE file)."""
        hashes = {name: f(data).digest() for name, f in DIGESTS.items()}
        if any(hashes.get(algo) == digest for algo, digest in self.digests):
            return True
        tags = {t for d in hashes.values() for hexed in [d.hex().upper().encode("utf-16-le")]
                for t in (d, hexed, hexed + b"\0\0")}
        return bool(tags & self.identifiers)


def verify_catalog(catalog: bytes, mum: bytes, roots: TrustRoots) -> Signature:
    """The verdict on ``catalog`` (update.cat's bytes) as a signature over ``mum`` (update.mum's bytes)."""
    check = check_catalog(catalog, roots)
    if check.verdict.status in (INVALID, UNSIGNED):
        return check.verdict
    if not check.lists(mum):
        return Signature(INVALID, f"update.cat is validly signed by {check.verdict.signer} but does not list "
                                  "this update.mum", check.verdict.signer)
    return check.verdict


def check_catalog(catalog: bytes, roots: TrustRoots) -> CatalogCheck:
    """Parse ``catalog``, verify its signature and chain, and read the hashes it lists; never raises."""
    if len(catalog) > CATALOG_MAX_SIZE:
        return CatalogCheck(Signature(INVALID, f"update.cat is larger than {CATALOG_MAX_SIZE // MiB} MiB"))
    try:
        parsed = _signed_catalog(catalog)
        if parsed is None:
            return CatalogCheck(Signature(UNSIGNED, "update.cat has no signer"))
        signed_data, signer_info, ctl = parsed
        leaf, others = _check_signature(signed_data, signer_info, ctl)
        digests, identifiers = _members(ctl)
        verdict = _chain_verdict(leaf, others, _this_update(ctl), roots, _common_name(leaf))
        return CatalogCheck(verdict, digests, identifiers)
    except _Invalid as e:
        return CatalogCheck(Signature(INVALID, str(e)))
    except (MemoryError, RecursionError) as e:
        why = f"update.cat: structures too large or nested too deeply ({type(e).__name__})"
        return CatalogCheck(Signature(INVALID, why))
    except Exception as e:  # noqa: BLE001 - asn1crypto and cryptography raise anything on hostile input
        return CatalogCheck(Signature(INVALID, f"update.cat is not a readable signed catalog ({first_line(e)[:200]})"))


def _signed_catalog(data: bytes):
    """(SignedData, its one SignerInfo, the CTL), or None for a catalog without a signer."""
    from asn1crypto import cms

    info = cms.ContentInfo.load(data, strict=True)
    if info["content_type"].native != "signed_data":
        raise _Invalid(f"update.cat is not PKCS#7 SignedData (content type {info['content_type'].dotted})")
    signed_data = info["content"]
    encap = signed_data["encap_content_info"]
    if encap["content_type"].dotted != SZOID_CTL:
        raise _Invalid(f"update.cat holds {encap['content_type'].dotted}, not a certificate trust list")
    from asn1crypto import core

    from vhdtool.cabinet.ctl import CertificateTrustList

    content = encap["content"]
    if isinstance(content, core.Void):
        raise _Invalid("update.cat has no certificate trust list in it")
    ctl = content.parse(CertificateTrustList)
    signers = list(signed_data["signer_infos"])
    if not signers:
        return None
    if len(signers) != 1:
        raise _Invalid(f"update.cat has {len(signers)} signers; a catalog has one")
    return signed_data, signers[0], ctl


def _check_signature(signed_data, signer_info, ctl):
    """(the signer's certificate, the other certificates) once the signature over the CTL verifies."""
    digest_name = signer_info["digest_algorithm"]["algorithm"].native
    if digest_name not in DIGESTS:
        raise _Invalid(f"update.cat's digest algorithm {digest_name} is not one Windows signs catalogs with")
    from asn1crypto import core

    attrs = signer_info["signed_attrs"]
    if isinstance(attrs, core.Void) or len(attrs) == 0:
        raise _Invalid("update.cat's signer has no authenticated attributes")
    values = {}
    for attr in attrs:
        values.setdefault(attr["type"].dotted, []).extend(attr["values"])
    content_types = values.get("1.2.840.113549.1.9.3", [])
    digests = values.get("1.2.840.113549.1.9.4", [])
    if len(content_types) != 1 or content_types[0].dotted != SZOID_CTL:
        raise _Invalid("update.cat's signed content type is not a certificate trust list")
    if len(digests) != 1:
        raise _Invalid("update.cat's signer has no single message digest")
    # As in Authenticode, the digest covers the content's value: the CTL's bytes without its tag and length.
    if DIGESTS[digest_name](ctl.contents).digest() != digests[0].native:
        raise _Invalid("update.cat's content does not match its signed digest (the catalog was altered)")
    certs = [c.chosen for c in signed_data["certificates"] or () if c.name == "certificate"]
    leaf = _signer_certificate(signer_info, certs)
    signed = bytearray(attrs.dump())
    signed[0] = 0x31  # the signature is over the attributes as a SET OF, not as the [0] IMPLICIT field
    _verify(leaf, signer_info, digest_name, bytes(signed))
    from cryptography import x509

    others = [x509.load_der_x509_certificate(c.dump()) for c in certs if c is not leaf]
    return x509.load_der_x509_certificate(leaf.dump()), others


def _signer_certificate(signer_info, certs):
    sid = signer_info["sid"]
    for cert in certs:
        if sid.name == "issuer_and_serial_number":
            if cert.issuer == sid.chosen["issuer"] and cert.serial_number == sid.chosen["serial_number"].native:
                return cert
        elif cert.key_identifier == sid.chosen.native:
            return cert
    raise _Invalid("update.cat does not carry its signer's certificate")


def _verify(cert, signer_info, digest_name: str, signed: bytes) -> None:
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

    algo = {"sha1": hashes.SHA1(), "sha256": hashes.SHA256(), "sha384": hashes.SHA384(), "sha512": hashes.SHA512()}
    key = x509.load_der_x509_certificate(cert.dump()).public_key()
    kind = signer_info["signature_algorithm"].signature_algo
    signature = signer_info["signature"].native
    try:
        if isinstance(key, rsa.RSAPublicKey) and kind == "rsassa_pkcs1v15":
            key.verify(signature, signed, padding.PKCS1v15(), algo[digest_name])
        elif isinstance(key, rsa.RSAPublicKey) and kind == "rsassa_pss":
            params = signer_info["signature_algorithm"]["parameters"]
            pss = padding.PSS(padding.MGF1(algo[params["hash_algorithm"]["algorithm"].native]),
                              params["salt_length"].native)
            key.verify(signature, signed, pss, algo[params["hash_algorithm"]["algorithm"].native])
        elif isinstance(key, ec.EllipticCurvePublicKey) and kind == "ecdsa":
            key.verify(signature, signed, ec.ECDSA(algo[digest_name]))
        else:
            raise _Invalid(f"update.cat is signed with {kind} by a {type(key).__name__}, which vhdtool does not check")
    except InvalidSignature:
        raise _Invalid("update.cat's signature does not verify (the catalog or its signature was altered)") from None


def _this_update(ctl) -> datetime.datetime:
    when = ctl["this_update"].native
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when


def _members(ctl) -> tuple[frozenset, frozenset]:
    """The CTL's members: the (algorithm, digest) of each SPC_INDIRECT_DATA, and the identifiers of members
    without one (raw hashes, or the UTF-16 hex tags of version 1 catalogs)."""
    from vhdtool.cabinet.ctl import SpcIndirectDataContent

    digests, identifiers = set(), set()
    for subject in ctl["trusted_subjects"] or ():
        indirect = [v for a in subject["attributes"] or () if a["type"].dotted == SPC_INDIRECT_DATA for v in a["values"]]
        if not indirect:
            identifiers.add(subject["identifier"].native)
        for value in indirect:
            content = SpcIndirectDataContent.load(value.dump(), strict=True)
            digest = content["message_digest"]
            digests.add((digest["digest_algorithm"]["algorithm"].native, digest["digest"].native))
    return frozenset(digests), frozenset(identifiers)


def _chain_verdict(leaf, others, when, roots: TrustRoots, name: str) -> Signature:
    from vhdtool.cabinet.legacychain import legacy_chain

    why = "no trusted root was given"
    for status, anchors in ((MICROSOFT, roots.microsoft), (TRUSTED, roots.added)):
        if not anchors:
            continue
        chain, why = _chain(leaf, others, when, anchors)
        if chain is not None:
            return Signature(status, f"signed by {name} on {when:%Y-%m-%d}, chain to {_common_name(chain[-1])}", name)
        # cryptography's verifier refuses SHA-1 links; Windows 7 era packages are signed through them.
        chain, legacy_why = legacy_chain(leaf, others, when, anchors)
        if chain is not None:
            return Signature(status, f"signed by {name} on {when:%Y-%m-%d}, through a SHA-1 chain to "
                                     f"{_common_name(chain[-1])}", name)
        if legacy_why is not None:
            why = f"its SHA-1 chain does not hold on {when:%Y-%m-%d}: {legacy_why}"
    return Signature(UNTRUSTED, f"signed by {name}, but {why}", name)


def _chain(leaf, others, when, anchors):
    """(the chain, leaf first, to one of ``anchors`` at ``when``, None) or (None, why not)."""
    from cryptography import x509
    from cryptography.x509 import verification as v

    def code_signing(_policy, _cert, eku):
        if eku is None or x509.ObjectIdentifier(CODE_SIGNING) not in eku:
            raise ValueError("the signer's certificate is not for code signing")

    ee = v.ExtensionPolicy.permit_all().require_present(x509.ExtendedKeyUsage, v.Criticality.AGNOSTIC, code_signing)
    verifier = (v.PolicyBuilder().store(v.Store(list(anchors))).time(when)
                .extension_policies(ca_policy=v.ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee)
                .build_client_verifier())
    try:
        return verifier.verify(leaf, others).chain, None
    except v.VerificationError as e:
        return None, f"its chain does not end in a trusted root on {when:%Y-%m-%d} ({first_line(e)[:160]})"


def _common_name(cert) -> str:
    from cryptography.x509.oid import NameOID

    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else cert.subject.rfc4514_string()
