"""Fuzz the catalog check: hostile update.cat bytes give a verdict, a one-line reason, quickly, and never a
false microsoft/trusted.

Bases: the real Microsoft-signed ../shared/data/real/signed/dxcore.cat (microsoft with the shipped roots),
and catalogs signed by osslsigncode with openssl-made chains (fixtures/catalogs.py): SHA-256 (trusted with
its --trust-root) and SHA-1 (trusted through vhdtool.cabinet.legacychain). Each case must finish within
``CASE_SECONDS`` and give one of ``SIGNATURES``, with a reason on one line; nothing may escape.

Soundness, judged against asn1crypto's reading of the original (not vhdtool's):

- a byte changed inside the signed content (the CTL, its tag and length included), the authenticated
  attributes or the signature value gives ``invalid``;
- a byte changed inside a certificate never gives microsoft/trusted, unless the certificate's to-be-signed
  bytes and signature bytes are unchanged (the unused-bits count of its signature BIT STRING, 0 -> 1 when the
  last bit is zero, is such a change: cryptography reads the same signature);
- whatever the mutation (insertions, deletions, truncations, DER length rewrites, duplicated or nested
  elements), a microsoft/trusted verdict needs the CTL's content octets, the authenticated attributes, the
  signature and every original certificate to be there unchanged; bytes outside them (the signer's
  identifier, the unsigned timestamp, a non-minimal length encoding) may change.

VHDTOOL_CATALOG_FUZZ_EXAMPLES sets the random cases per base of the full sweep (default 20000, marked slow);
the default run makes a tenth of them.
"""

from __future__ import annotations

import datetime
import os
import random
import time
from pathlib import Path

import pytest

from conftest import FULL, SWEEPS, sweep_count
from fixtures.catalogs import Signer, make_sha1_signer, make_signer, signed_catalog
from vhdtool.cabinet.catalog import MICROSOFT, SIGNATURES, TRUSTED, TrustRoots, check_catalog

SIGNED = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "signed"
if not SIGNED.is_dir():
    SIGNED = Path("/work/shared/data/real/signed")
EXAMPLES = int(os.environ.get("VHDTOOL_CATALOG_FUZZ_EXAMPLES", "20000"))
CASE_SECONDS = 1.0
GOOD = (MICROSOFT, TRUSTED)
MUM = b"<assembly>fuzzed update.mum</assembly>\n"


def signed_parts(data: bytes):
    """asn1crypto's reading of what a verdict of microsoft/trusted rests on, or None if it cannot read it."""
    from asn1crypto import cms

    try:
        sd = cms.ContentInfo.load(data, strict=True)["content"]
        si = sd["signer_infos"][0]
        certs = {_body(c.chosen.dump()) for c in sd["certificates"] if c.name == "certificate"}
        return (sd["encap_content_info"]["content"].contents, si["signed_attrs"].contents, si["signature"].native,
                certs)
    except Exception:  # noqa: BLE001 - any failure to read: no claim to compare
        return None


def _body(der: bytes) -> tuple[bytes, bytes]:
    """A certificate as its signature is checked: the to-be-signed bytes and the signature's bytes (a BIT
    STRING's unused-bits count is not among them: 0 -> 1 over a zero last bit re-encodes the same bytes)."""
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    return cert.tbs_certificate_bytes, cert.signature


def regions(data: bytes) -> dict[str, list[tuple[int, int]]]:
    """Byte ranges of the original: signed (CTL, attributes, signature), certificates, and the rest."""
    from asn1crypto import cms

    sd = cms.ContentInfo.load(data, strict=True)["content"]
    si = sd["signer_infos"][0]

    def span(obj):
        der = obj.dump()
        at = data.index(der)
        return at, at + len(der)

    return {"signed": [span(sd["encap_content_info"]["content"]), span(si["signed_attrs"]), span(si["signature"])],
            "certificate": [span(c) for c in sd["certificates"]]}


def tlvs(data: bytes, start: int = 0, end: int | None = None, depth: int = 0) -> list[tuple[int, int, int, int]]:
    """Every DER element (header offset, header length, content end, depth), walked from the bytes."""
    end = len(data) if end is None else end
    out, pos = [], start
    while pos + 2 <= end and depth < 40:
        tag, n = data[pos], data[pos + 1]
        hlen, length = 2, n
        if n & 0x80:
            k = n & 0x7F
            if k == 0 or k > 4 or pos + 2 + k > end:
                return out
            length = int.from_bytes(data[pos + 2 : pos + 2 + k], "big")
            hlen += k
        stop = pos + hlen + length
        if stop > end:
            return out
        out.append((pos, hlen, stop, depth))
        if tag & 0x20:
            out.extend(tlvs(data, pos + hlen, stop, depth + 1))
        pos = stop
    return out


def der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def mutate(data: bytes, elements, rng: random.Random) -> tuple[str, bytes]:
    b = bytearray(data)
    kind = rng.choice(["flip", "byte", "insert", "delete", "truncate", "length", "length", "duplicate", "nest"])
    at = rng.randrange(len(b))
    if kind == "flip":
        b[at] ^= 1 << rng.randrange(8)
    elif kind == "byte":
        b[at] = rng.randrange(256)
    elif kind == "insert":
        b[at:at] = rng.randbytes(rng.randint(1, 16))
    elif kind == "delete":
        del b[at : at + rng.randint(1, 16)]
    elif kind == "truncate":
        del b[at:]
    else:
        pos, hlen, stop, _ = rng.choice(elements)
        length = stop - pos - hlen
        if kind == "length":
            new = rng.choice([0, 1, length - 1, length + 1, 0x7F, 0x80, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 2**64 - 1])
            head = rng.choice([der_length(max(new, 0)), b"\x80", b"\x84" + length.to_bytes(4, "big"), b"\xff"])
            b[pos + 1 : pos + hlen] = head
        elif kind == "duplicate":
            b[stop:stop] = data[pos:stop] * rng.choice([1, 2, 50])
        else:  # nest: wrap the element in a SEQUENCE or a SET, once or many times
            inner = bytes(data[pos:stop])
            for _ in range(rng.choice([1, 2, 200])):
                inner = bytes([rng.choice([0x30, 0x31, 0xA0])]) + der_length(len(inner)) + inner
            b[pos:stop] = inner
    return f"{kind}@{at}", bytes(b)


def judge(data: bytes, roots: TrustRoots, what: str):
    start = time.perf_counter()
    verdict = check_catalog(data, roots).verdict
    took = time.perf_counter() - start
    assert verdict.status in SIGNATURES, (what, verdict)
    assert verdict.reason and "\n" not in verdict.reason, (what, verdict)
    assert took < CASE_SECONDS, (what, took, verdict)
    return verdict


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("catfuzz")
    out = {"real": (SIGNED.joinpath("dxcore.cat").read_bytes(), TrustRoots.shipped(), MICROSOFT)}
    for name, make, digest in (("sha256", make_signer, "sha256"), ("sha1", make_sha1_signer, "sha1")):
        signer: Signer = make(tmp / name)
        cat = signed_catalog([b"vmbus.sys bytes", MUM], signer, tmp / name / "update.cat", digest=digest)
        out[name] = (cat, TrustRoots.load((signer.ca,)), TRUSTED)
    for name, (data, roots, expect) in out.items():
        assert check_catalog(data, roots).verdict.status == expect, name
    return out


@pytest.mark.parametrize("base", ["real", "sha256", "sha1"])
@pytest.mark.parametrize("sweep", SWEEPS)
def test_mutated_catalogs_give_a_sound_verdict_quickly(bases, base, sweep):
    data, roots, _ = bases[base]
    original = signed_parts(data)
    elements = tlvs(data)
    assert len(elements) > 50  # the walker read the structure
    rng = random.Random(f"catalog-{base}")
    statuses = {}
    for _ in range(sweep_count(EXAMPLES, sweep, EXAMPLES // 10)):
        what, bad = mutate(data, elements, rng)
        verdict = judge(bad, roots, what)
        statuses[verdict.status] = statuses.get(verdict.status, 0) + 1
        if verdict.status in GOOD:
            parts = signed_parts(bad)
            assert parts is not None and parts[:3] == original[:3] and original[3] <= parts[3], (what, verdict)
    assert statuses.get("invalid", 0) > sum(statuses.values()) // 3, statuses
    assert any(statuses.get(s) for s in GOOD), statuses  # mutations outside the signed bytes reached the oracle


@pytest.mark.parametrize("base", ["real", "sha256", "sha1"])
@pytest.mark.parametrize("sweep", SWEEPS)
def test_a_byte_changed_in_signed_bytes_is_invalid_in_a_certificate_never_trusted(bases, base, sweep):
    data, roots, _ = bases[base]
    spans = regions(data)
    step = 1 if sweep == FULL else 29
    for where, ranges in spans.items():
        for start, stop in ranges:
            for at in range(start, stop, step):
                for mask in ((0x01, 0x20, 0x80) if sweep == FULL else (0x20,)):
                    bad = data[:at] + bytes([data[at] ^ mask]) + data[at + 1 :]
                    verdict = judge(bad, roots, f"{where}@{at}^{mask:#x}")
                    if where == "signed":
                        assert verdict.status == "invalid", (where, at, mask, verdict)
                    elif verdict.status in GOOD:  # only if the certificates are the same as their signatures see
                        assert signed_parts(bad) == signed_parts(data), (where, at, mask, verdict)


def _crowd(signer: Signer, count: int, out: Path, hash_name: str = "sha256") -> Path:
    """``signer``'s certificates plus ``count`` CA certificates under its intermediate's name, each issued under
    that same name by one key (so that every one of them verifies every other), in the PEM osslsigncode takes."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    chain = x509.load_pem_x509_certificates(signer.certificate.read_bytes())
    name = chain[0].issuer
    key = _crowd_key(out.parent)
    now = datetime.datetime.now(datetime.timezone.utc)
    pem = signer.certificate.read_bytes()
    for serial in range(count):
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(1000 + serial).not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=365))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(key, getattr(hashes, hash_name.upper())()))
        pem += cert.public_bytes(serialization.Encoding.PEM)
    out.write_bytes(pem)
    assert isinstance(key, rsa.RSAPrivateKey)
    return out


def _crowd_key(where: Path):
    """The crowd's key, RSA 2048 made by openssl, kept as PEM so that osslsigncode can sign with it."""
    from cryptography.hazmat.primitives import serialization

    path = where / "crowd.key"
    if not path.exists():
        import subprocess

        subprocess.run(["openssl", "genrsa", "-out", str(path), "2048"], check=True, capture_output=True)
    return serialization.load_pem_private_key(path.read_bytes(), None)


@pytest.mark.parametrize("kind", ["sha256", "sha1"])
def test_hundreds_of_certificates_of_one_name_are_checked_quickly(tmp_path, kind):
    """400 other CAs named as the signer's issuer: chain building stays bounded, and finds the real chain."""
    make, digest = (make_signer, "sha256") if kind == "sha256" else (make_sha1_signer, "sha1")
    signer = make(tmp_path / "ca")
    crowded = Signer(signer.ca, _crowd(signer, 400, tmp_path / "crowd.pem"), signer.key)
    cat = signed_catalog([MUM], crowded, tmp_path / "update.cat", digest=digest)
    assert len(signed_parts(cat)[3]) >= 401
    verdict = judge(cat, TrustRoots.load((signer.ca,)), f"{kind} crowd")
    assert verdict.status == "trusted", verdict


def test_a_signer_issued_by_a_crowd_of_one_name_is_untrusted_quickly(tmp_path):
    """The worst case for a depth-first path search: a leaf issued by 300 CAs of one name and key that
    all issue each other (300^5 name-and-signature paths), none reaching the root."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    signer = make_sha1_signer(tmp_path / "ca")
    crowd_pem = _crowd(signer, 300, tmp_path / "crowd.pem")
    key = _crowd_key(tmp_path)
    leaf_old = x509.load_pem_x509_certificates(signer.certificate.read_bytes())[0]
    now = datetime.datetime.now(datetime.timezone.utc)
    leaf = (x509.CertificateBuilder().subject_name(leaf_old.subject).issuer_name(leaf_old.issuer)
            .public_key(key.public_key()).serial_number(77).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.ExtendedKeyUsage([x509.ObjectIdentifier("1.3.6.1.5.5.7.3.3")]), critical=False)
            .sign(key, hashes.SHA256()))
    crowd = b"".join(c.public_bytes(serialization.Encoding.PEM)
                     for c in x509.load_pem_x509_certificates(crowd_pem.read_bytes())[2:])
    certs = tmp_path / "attacker.pem"
    certs.write_bytes(leaf.public_bytes(serialization.Encoding.PEM) + crowd)
    cat = signed_catalog([MUM], Signer(signer.ca, certs, tmp_path / "crowd.key"), tmp_path / "update.cat",
                         digest="sha1")
    verdict = judge(cat, TrustRoots.load((signer.ca,)), "attacker crowd")
    assert verdict.status == "untrusted", verdict
