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
from fixtures.catalogs import make_signer, signed_catalog, unsigned_catalog
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
