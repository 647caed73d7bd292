"""Signatures before staging: a cab's update.cat verified as a signed catalog.

Judges we did not write: a real Microsoft-signed catalog (../shared/data/real/signed/dxcore.cat)
and the DLL it lists, whose catalog hash osslsigncode computes; test catalogs whose trust list
is encoded by ``openssl asn1parse -genconf`` and signed by ``osslsigncode sign`` under a CA made
with ``openssl`` (fixtures/catalogs.py), checked by ``osslsigncode verify`` too; cabs made with
gcab; what stage wrote read back with ntfscat and qemu-img check.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import digest, work_copy
from fixtures.cabs import CabSpec, build_cab, mum_bytes
from fixtures.catalogs import make_sha1_signer, make_signer, signed_catalog, unsigned_catalog
from vhdtool.cabinet.catalog import CATALOG_MAX_SIZE, TrustRoots, check_catalog, verify_catalog

SIGNED = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "signed"
if not SIGNED.is_dir():
    SIGNED = Path("/work/shared/data/real/signed")
DXCORE_CAT = SIGNED / "dxcore.cat"
KB_VERSION = "6.3.9600.18080"
KB_ID = f"{KB_VERSION}-x64"
SPEC = CabSpec("6.1", "x64", KB_VERSION, kb=True)


@pytest.fixture(scope="module")
def signer(tmp_path_factory):
    return make_signer(tmp_path_factory.mktemp("signer"))


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


# -- the real Microsoft catalog -------------------------------------------------------------------

def test_the_real_catalog_chains_to_the_shipped_microsoft_root():
    check = check_catalog(DXCORE_CAT.read_bytes(), TrustRoots.shipped())
    assert check.verdict.status == "microsoft", check.verdict
    assert check.verdict.signer == "Microsoft Windows"
    # Checked at the catalog's own date: its signer's certificate expired on 2026-06-17.
    assert "on 2025-08-09, chain to Microsoft Root Certificate Authority 2010" in check.verdict.reason


def test_without_the_microsoft_roots_the_real_catalog_is_untrusted():
    check = check_catalog(DXCORE_CAT.read_bytes(), TrustRoots(()))
    assert check.verdict.status == "untrusted", check.verdict


def test_the_real_catalog_lists_the_hash_osslsigncode_computes_for_its_dll(tmp_path):
    dll = tmp_path / "DXCore.dll"
    dll.write_bytes(gzip.decompress((SIGNED / "DXCore.dll.gz").read_bytes()))
    res = subprocess.run(["osslsigncode", "verify", "-catalog", str(DXCORE_CAT), "-in", str(dll)],
                         capture_output=True, text=True)
    m = re.search(r"Calculated message digest\s*:\s*([0-9A-Fa-f]{64})", res.stdout + res.stderr)
    assert m, res.stdout + res.stderr
    check = check_catalog(DXCORE_CAT.read_bytes(), TrustRoots.shipped())
    assert ("sha256", bytes.fromhex(m.group(1))) in check.digests
    # The DLL's flat hash is not its Authenticode hash: as a non-PE file it would not be listed.
    assert not check.lists(dll.read_bytes())


def test_the_real_catalog_does_not_vouch_for_an_update_mum():
    verdict = verify_catalog(DXCORE_CAT.read_bytes(), mum_bytes(SPEC), TrustRoots.shipped())
    assert verdict.status == "invalid" and "does not list this update.mum" in verdict.reason, verdict


@pytest.mark.parametrize("where,why", [("signature", "signature does not verify"),
                                       ("content", "does not match its signed digest")])
def test_a_tampered_real_catalog_is_invalid(where, why):
    data = DXCORE_CAT.read_bytes()
    if where == "signature":
        from asn1crypto import cms

        sig = cms.ContentInfo.load(data)["content"]["signer_infos"][0]["signature"].native
        at = data.index(sig) + 10
    else:
        at = data.index(bytes.fromhex("10B867FA09AB577CCA4E5EC0EAB449AD86E108E6"))  # a member's hash in the CTL
    verdict = check_catalog(_flip(data, at), TrustRoots.shipped()).verdict
    assert verdict.status == "invalid" and why in verdict.reason, verdict


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "huge", "nested"])
def test_a_damaged_catalog_is_invalid_not_a_crash(damage):
    data = DXCORE_CAT.read_bytes()
    bad = {"truncated": data[: len(data) // 2], "garbage": hashlib.sha512(data).digest() * 64, "empty": b"",
           "huge": b"\0" * (CATALOG_MAX_SIZE + 1), "nested": b"\x30\x80" * 100000}[damage]
    verdict = verify_catalog(bad, b"x", TrustRoots.shipped())
    assert verdict.status == "invalid" and verdict.reason, verdict


# -- test-signed catalogs -------------------------------------------------------------------------

def test_a_test_signed_catalog_is_trusted_only_with_its_root(signer, tmp_path):
    mum = mum_bytes(SPEC)
    cat = signed_catalog([b"vmbus.sys", mum], signer, tmp_path / "update.cat")
    judged = subprocess.run(["osslsigncode", "verify", "-in", str(tmp_path / "update.cat"), "-CAfile", str(signer.ca)],
                            capture_output=True, text=True)
    assert judged.returncode == 0, judged.stdout + judged.stderr
    assert verify_catalog(cat, mum, TrustRoots.load((signer.ca,))).status == "trusted"
    assert verify_catalog(cat, mum, TrustRoots.shipped()).status == "untrusted"
    assert verify_catalog(cat, mum + b" ", TrustRoots.load((signer.ca,))).status == "invalid"
    sig_at = len(cat) - 40  # inside the signature, the last field of the one SignerInfo
    tampered = verify_catalog(_flip(cat, sig_at), mum, TrustRoots.load((signer.ca,)))
    assert tampered.status == "invalid" and "signature does not verify" in tampered.reason, tampered


# -- SHA-1 chains (Windows 7 era), which cryptography's verifier refuses -----------------------------

def _osslsigncode_verifies(cat: Path, root: Path) -> bool:
    return subprocess.run(["osslsigncode", "verify", "-in", str(cat), "-CAfile", str(root)],
                          capture_output=True).returncode == 0


def test_a_sha1_chain_is_trusted_through_the_legacy_path(tmp_path):
    from cryptography import x509
    from cryptography.x509 import verification as v

    signer = make_sha1_signer(tmp_path / "ca")
    mum = mum_bytes(SPEC)
    cat = signed_catalog([mum], signer, tmp_path / "update.cat", digest="sha1")
    assert _osslsigncode_verifies(tmp_path / "update.cat", signer.ca)
    # The modern verifier alone refuses it: that is why the legacy path exists.
    leaf, pca = x509.load_pem_x509_certificates(signer.certificate.read_bytes())
    root = x509.load_pem_x509_certificate(signer.ca.read_bytes())
    verifier = (v.PolicyBuilder().store(v.Store([root]))
                .extension_policies(ca_policy=v.ExtensionPolicy.webpki_defaults_ca(),
                                    ee_policy=v.ExtensionPolicy.permit_all()).build_client_verifier())
    with pytest.raises(v.VerificationError, match="Forbidden signature algorithm"):
        verifier.verify(leaf, [pca])
    verdict = verify_catalog(cat, mum, TrustRoots.load((signer.ca,)))
    assert verdict.status == "trusted", verdict
    assert "through a SHA-1 chain to vhdtool sha1 test root" in verdict.reason, verdict
    assert verify_catalog(cat, mum, TrustRoots.shipped()).status == "untrusted"
    assert verify_catalog(cat, mum + b" ", TrustRoots.load((signer.ca,))).status == "invalid"


def test_a_broken_sha1_link_is_untrusted(tmp_path):
    """The intermediate is signed by another key under the root's name: the catalog's own signature is
    valid, but no chain reaches the root, which is what untrusted means."""
    signer = make_sha1_signer(tmp_path / "ca", forged_intermediate=True)
    mum = mum_bytes(SPEC)
    cat = signed_catalog([mum], signer, tmp_path / "update.cat", digest="sha1")
    assert not _osslsigncode_verifies(tmp_path / "update.cat", signer.ca)
    verdict = verify_catalog(cat, mum, TrustRoots.load((signer.ca,)))
    assert verdict.status == "untrusted", verdict
    assert "vhdtool sha1 test pca's signature by vhdtool sha1 test root does not verify" in verdict.reason, verdict


def test_a_sha1_chain_expired_when_the_catalog_was_signed_is_untrusted(tmp_path):
    import datetime

    signer = make_sha1_signer(tmp_path / "ca", leaf_days=1)
    mum = mum_bytes(SPEC)
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=30)
    cat = signed_catalog([mum], signer, tmp_path / "update.cat", digest="sha1", this_update=later)
    verdict = verify_catalog(cat, mum, TrustRoots.load((signer.ca,)))
    assert verdict.status == "untrusted", verdict
    assert f"vhdtool sha1 test signer is not valid on {later:%Y-%m-%d}" in verdict.reason, verdict


@pytest.mark.parametrize("kind,why", [
    ("md5", "vhdtool sha1 test pca is signed with md5, which vhdtool does not accept"),
    ("not a ca", "vhdtool sha1 test pca issued a certificate but is not a CA (basicConstraints)")])
def test_a_sha1_chain_through_an_md5_link_or_a_non_ca_is_untrusted(kind, why, tmp_path):
    signer = make_sha1_signer(tmp_path / "ca", pca_hash="md5" if kind == "md5" else "sha1",
                              pca_extensions="leaf" if kind == "not a ca" else "ca")
    mum = mum_bytes(SPEC)
    cat = signed_catalog([mum], signer, tmp_path / "update.cat", digest="sha1")
    verdict = verify_catalog(cat, mum, TrustRoots.load((signer.ca,)))
    assert verdict.status == "untrusted" and why in verdict.reason, verdict


def test_a_sha1_chain_to_a_microsoft_root_is_microsoft_until_microsoft_disallowed_the_root(tmp_path, monkeypatch):
    """The test root stands in for a shipped legacy root (Microsoft's keys are not ours to sign with):
    the verdict is microsoft, with SHA-1 in its reason, and not for a catalog dated after the root's
    disallowed date (authroot.stl's, as legacychain.DISALLOWED_FROM records for the real ones)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    from vhdtool.cabinet import legacychain

    signer = make_sha1_signer(tmp_path / "ca")
    root = x509.load_pem_x509_certificate(signer.ca.read_bytes())
    mum = mum_bytes(SPEC)
    cat = signed_catalog([mum], signer, tmp_path / "update.cat", digest="sha1")
    microsoft = TrustRoots(TrustRoots.shipped().microsoft + (root,))
    verdict = verify_catalog(cat, mum, microsoft)
    assert verdict.status == "microsoft" and "through a SHA-1 chain to vhdtool sha1 test root" in verdict.reason
    cutoff = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=1)
    fingerprint = hashlib.sha256(root.public_bytes(Encoding.DER)).hexdigest()
    monkeypatch.setitem(legacychain.DISALLOWED_FROM, fingerprint, cutoff)
    verdict = verify_catalog(cat, mum, microsoft)
    assert verdict.status == "untrusted", verdict
    assert f"Microsoft's root program disallowed vhdtool sha1 test root from {cutoff:%Y-%m-%d}" in verdict.reason


def test_the_shipped_roots_are_the_ones_their_readme_lists():
    from cryptography.hazmat.primitives.serialization import Encoding

    readme = (Path(__file__).resolve().parents[1] / "vhdtool" / "cabinet" / "roots" / "README.md").read_text()
    listed = set(re.findall(r"`([0-9a-f]{64})`", readme))
    shipped = {hashlib.sha256(c.public_bytes(Encoding.DER)).hexdigest() for c in TrustRoots.shipped().microsoft}
    assert len(shipped) == 4 and shipped == listed, (shipped, listed)


def test_a_catalog_without_a_signer_is_unsigned(tmp_path):
    mum = mum_bytes(SPEC)
    cat = unsigned_catalog([mum], tmp_path / "update.cat").read_bytes()
    assert verify_catalog(cat, mum, TrustRoots.shipped()).status == "unsigned"


def test_a_bad_trust_root_is_a_one_line_error(cli, tmp_path):
    from conftest import assert_one_line_error

    bad = tmp_path / "root.pem"
    bad.write_text("not a certificate\n")
    cab = build_cab(SPEC, tmp_path / "cabs")
    image = work_copy("ws2008r2-nokvp", tmp_path)
    code, out, err = cli("plan", image, "--host", "win10", "--cabs", cab, "--trust-root", bad)
    assert_one_line_error(code, out, err, bad)
    assert code == 12 and "--trust-root" in err


# -- plan, stage and batch ------------------------------------------------------------------------

def plan_json(cli, image, cabs, *extra) -> tuple[int, dict, str]:
    code, out, err = cli("plan", "--json", image, "--host", "win10", "--cabs", cabs, *extra)
    return code, (json.loads(out) if out.strip() else {}), err



@pytest.mark.fixtures
def test_a_cab_whose_catalog_is_microsofts_but_not_for_it_is_never_staged(cli, tmp_path):
    cab = build_cab(SPEC, tmp_path / "cabs", catalog=DXCORE_CAT.read_bytes())
    image = work_copy("ws2008r2-nokvp", tmp_path)
    code, doc, err = plan_json(cli, image, cab)
    assert code == 0 and doc["action"] == "manual" and doc["cab"] is None, doc
    assert any("signature is invalid" in r and "does not list this update.mum" in r for r in doc["reasons"]), doc
    before = digest(image)
    for extra in ((), ("--require-signed",)):
        code, out, err = cli("stage", image, "--host", "win10", "--cabs", cab, *extra)
        assert code == 10 and "not staged: its signature is invalid" in err, (code, out, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert digest(image) == before


@pytest.mark.fixtures
def test_an_unsigned_cab_is_chosen_with_a_warning_and_refused_under_require_signed(cli, tmp_path):
    cab = build_cab(SPEC, tmp_path / "cabs")
    image = work_copy("ws2008r2-nokvp", tmp_path)
    code, doc, err = plan_json(cli, image, cab)
    assert code == 0 and doc["action"] == "stage", doc
    assert (doc["cab"]["signature"], doc["cab"]["signature_reason"]) == ("unsigned", "the cab has no update.cat")
    assert any(n.startswith("warning:") and "unsigned" in n for n in doc["notes"]), doc["notes"]
    code, out, err = cli("plan", image, "--host", "win10", "--cabs", cab)
    assert "  signature  unsigned (the cab has no update.cat)" in out, out
    code, doc, err = plan_json(cli, image, cab, "--require-signed")
    assert code == 0 and doc["action"] == "manual" and doc["cab"] is None, doc
    assert any("--require-signed, and it is unsigned" in r for r in doc["reasons"]), doc["reasons"]
    before = digest(image)
    code, out, err = cli("stage", image, "--host", "win10", "--cabs", cab, "--require-signed")
    assert code == 10 and "--require-signed, and it is unsigned" in err, (code, out, err)
    assert digest(image) == before
    report = tmp_path / "report.jsonl"
    code, out, err = cli("batch", "stage", image, "--host", "win10", "--cabs", cab, "--require-signed", "--jobs", "1",
                         "--report", report)
    records = [json.loads(line) for line in report.read_text().splitlines()]
    assert code == 21 and records[-1]["outcome"] != "ok", (code, records)
    assert digest(image) == before
    code, out, err = cli("batch", "plan", image, "--host", "win10", "--cabs", cab, "--require-signed", "--jobs", "1",
                         "--report", report)
    records = [json.loads(line) for line in report.read_text().splitlines()]
    assert code == 0 and records[-1]["result"]["action"] == "manual", records[-1]
    (considered,) = records[-1]["result"]["candidates"]  # batch plan records carry the cabs weighed too
    assert (considered["path"], considered["signature"], considered["chosen"]) == (str(cab), "unsigned", False)
    assert considered["not_chosen"].startswith("--require-signed, and it is unsigned"), considered


@pytest.mark.fixtures
def test_a_test_signed_cab_with_its_root_is_staged_under_require_signed(cli, signer, tmp_path):
    cat = signed_catalog([b"vmbus.sys", mum_bytes(SPEC)], signer, tmp_path / "update.cat")
    cab = build_cab(SPEC, tmp_path / "cabs", catalog=cat)
    image = work_copy("ws2008r2-nokvp", tmp_path)
    code, doc, err = plan_json(cli, image, cab, "--require-signed")
    assert code == 0 and doc["action"] == "manual", doc  # untrusted without its root
    assert any("it is untrusted" in r for r in doc["reasons"]), doc["reasons"]
    code, doc, err = plan_json(cli, image, cab)
    assert doc["action"] == "stage" and doc["cab"]["signature"] == "untrusted", doc
    assert any(n.startswith("warning:") and "untrusted" in n for n in doc["notes"]), doc["notes"]
    code, out, err = cli("stage", "--json", image, "--host", "win10", "--cabs", cab, "--require-signed",
                         "--trust-root", signer.ca)
    assert code == 0, err
    doc = json.loads(out)
    assert (doc["staged"], doc["id"], doc["cab"]["signature"]) == (True, KB_ID, "trusted"), doc
    assert not any(n.startswith("warning:") for n in doc["notes"]), doc["notes"]
    subprocess.run(["qemu-img", "check", "-f", "vhdx", str(image)], check=True, capture_output=True)
    from judges.volumes import ntfscat, partition_volume

    staged = ntfscat(partition_volume(image, tmp_path, 2), f"/Windows/vhdtool/{KB_ID}/{cab.name}")
    assert hashlib.sha256(staged).digest() == hashlib.sha256(cab.read_bytes()).digest()


@pytest.mark.fixtures
def test_a_newer_cab_with_an_invalid_signature_loses_to_an_older_valid_one_and_plan_says_why(cli, tmp_path):
    older = build_cab(SPEC, tmp_path / "cabs" / "older")
    newer = build_cab(CabSpec("6.1", "x64", "6.3.9600.18999", kb=True), tmp_path / "cabs" / "newer",
                      catalog=DXCORE_CAT.read_bytes())
    image = work_copy("ws2008r2-nokvp", tmp_path)
    code, doc, err = plan_json(cli, image, tmp_path / "cabs", "--require-signed")
    assert code == 0 and doc["action"] == "manual", doc
    code, doc, err = plan_json(cli, image, tmp_path / "cabs")
    assert code == 0 and doc["action"] == "stage" and doc["cab"]["path"] == str(older), doc
    assert any(n.startswith(f"not chosen: {newer}: its signature is invalid") for n in doc["notes"]), doc["notes"]


@pytest.mark.fixtures
def test_plan_lists_every_cab_it_weighed_with_its_signature_and_why_not(cli, signer, tmp_path):
    """Four cabs for one guest: the chosen one (trusted), a newer one Microsoft signed for another package
    (invalid), an older unsigned one, and one for x86; plan lists each, in JSON and as one line of text."""
    older = build_cab(CabSpec("6.1", "x64", "6.3.9600.17000", kb=True), tmp_path / "cabs" / "a")
    cat = signed_catalog([mum_bytes(SPEC)], signer, tmp_path / "update.cat")
    chosen = build_cab(SPEC, tmp_path / "cabs" / "b", catalog=cat)
    newer = build_cab(CabSpec("6.1", "x64", "6.3.9600.18999", kb=True), tmp_path / "cabs" / "c",
                      catalog=DXCORE_CAT.read_bytes())
    x86 = build_cab(CabSpec("6.1", "x86", KB_VERSION, kb=True), tmp_path / "cabs" / "d")
    image = work_copy("ws2008r2-nokvp", tmp_path)
    code, doc, err = plan_json(cli, image, tmp_path / "cabs", "--trust-root", signer.ca)
    assert code == 0 and doc["cab"]["path"] == str(chosen), doc
    got = {c["path"]: (c["version"], c["arch"], c["signature"], c["chosen"]) for c in doc["candidates"]}
    assert got == {str(older): ("6.3.9600.17000", "x64", "unsigned", False),
                   str(chosen): (KB_VERSION, "x64", "trusted", True),
                   str(newer): ("6.3.9600.18999", "x64", "invalid", False),
                   str(x86): (KB_VERSION, "x86", "unsigned", False)}, doc["candidates"]
    why = {c["path"]: c["not_chosen"] for c in doc["candidates"]}
    assert why[str(chosen)] is None and why[str(x86)] == "for x86, the guest is x64", why
    assert why[str(newer)].startswith("its signature is invalid: update.cat is validly signed by Microsoft Windows")
    assert why[str(older)] == f"{chosen} is newer ({KB_VERSION})", why
    assert all(c["kb"] == "3071740" or c["kb"] is None for c in doc["candidates"])
    assert all(c["signature_reason"] for c in doc["candidates"])
    code, out, err = cli("plan", image, "--host", "win10", "--cabs", tmp_path / "cabs", "--trust-root", signer.ca)
    assert code == 0 and "  signature  trusted (signed by vhdtool test signer" in out, out
    assert f"  not chosen {newer} (6.3.9600.18999, x64): signature invalid" in out, out
    assert f"  not chosen {older} (6.3.9600.17000, x64): signature unsigned" in out, out
    assert f"  not chosen {x86} ({KB_VERSION}, x86): signature unsigned" in out, out


def test_the_catalog_builder_command_says_where_it_wrote(tmp_path):
    """fixtures/catalogs.py as a command (to make a test-signed cab by hand): it names its files, and
    osslsigncode verifies the catalog under the root it names."""
    member = tmp_path / "update.mum"
    member.write_bytes(mum_bytes(SPEC))
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, str(root / "fixtures" / "catalogs.py"), str(tmp_path / "out"), str(member)],
                         capture_output=True, text=True, check=True)
    cat, ca = tmp_path / "out" / "signed.cat", tmp_path / "out" / "ca.pem"
    assert res.stdout.strip() == f"{cat}, signed by {tmp_path / 'out' / 'signer.pem'}, root {ca}", res.stdout
    judged = subprocess.run(["osslsigncode", "verify", "-in", str(cat), "-CAfile", str(ca)], capture_output=True, text=True)
    assert judged.returncode == 0, judged.stdout + judged.stderr


@pytest.mark.fixtures
def test_between_cabs_of_one_version_the_better_signature_is_chosen(cli, signer, tmp_path):
    """An unsigned copy that sorts first (folder a/) does not win over the signed cab of the same version (b/)."""
    unsigned = build_cab(SPEC, tmp_path / "cabs" / "a")
    cat = signed_catalog([b"vmbus.sys", mum_bytes(SPEC)], signer, tmp_path / "update.cat")
    signed = build_cab(SPEC, tmp_path / "cabs" / "b", catalog=cat)
    image = work_copy("ws2008r2-nokvp", tmp_path)
    code, doc, err = plan_json(cli, image, tmp_path / "cabs", "--trust-root", signer.ca)
    assert code == 0 and (doc["cab"]["path"], doc["cab"]["signature"]) == (str(signed), "trusted"), doc
    assert not any(n.startswith("warning:") for n in doc["notes"]), doc["notes"]
    code, doc, err = plan_json(cli, image, tmp_path / "cabs")
    assert code == 0 and (doc["cab"]["path"], doc["cab"]["signature"]) == (str(signed), "untrusted"), doc
    (tmp_path / "cabs" / "b" / signed.name).unlink()
    code, doc, err = plan_json(cli, image, tmp_path / "cabs")
    assert code == 0 and (doc["cab"]["path"], doc["cab"]["signature"]) == (str(unsigned), "unsigned"), doc
