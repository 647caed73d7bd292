"""Cab layer: libmspack in a child process, the header checks in front of it, and update.mum.

Cabs come from real tools: libmspack's own MSZIP/LZX/Quantum test cab, gcab
(run here, in a temporary directory), and osslsigncode for a signed one.
Layouts no tool writes (reserved fields, broken tables) are built by
build_cab from MS-CAB 2.1, with no data checksums (csum 0 means "none").
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from vhdtool.cabinet import CabError, CabMember, extract_member, libmspack, list_members, mum, read_package
from vhdtool.cabinet.format import check_cabinet
from vhdtool.native import Refusal
from vhdtool.errors import MissingLibrary

REAL = Path(__file__).resolve().parent.parent / "fixtures" / "real"
LABEL = "vmguest.iso:/SUPPORT/AMD64/Windows6.3-KB3071740-x64.cab"

# md5 of each member, as libmspack's test/cabd_test.c (cabd_extract_test_03) checks them.
REAL_MEMBERS = {
    "mszip.txt": (57, "940cba86658fbceb582faecd2b5975d1"),
    "lzx.txt": (187, "703474293b614e7110b3eb8ac2762b53"),
    "qtm.txt": (59, "98fcfa4962a0f169a3c7fdbcb445cf17"),
}

PACKAGE_MUM = b"""<?xml version="1.0" encoding="utf-8" standalone="yes"?>
<assembly xmlns="urn:schemas-microsoft-com:asm.v3" manifestVersion="1.0" description="Fix for KB3071740" displayName="default" company="Example Corporation" copyright="Example Corporation" supportInformation="http://support.example.com/?kbid=3071740" creationTimeStamp="2015-10-01T12:00:00Z" lastUpdateTimeStamp="2015-10-01T12:00:00Z">
  <assemblyIdentity name="Package_for_KB3071740" version="6.3.9600.18080" language="neutral" processorArchitecture="amd64" publicKeyToken="31bf3856ad364e35" />
  <package identifier="KB3071740" releaseType="Update" restart="possible">
    <parent buildCompare="EQ" integrate="separate" disposition="staged">
      <assemblyIdentity name="Example-Client-Features-Package" version="6.1.7601.17514" processorArchitecture="amd64" language="neutral" buildType="release" publicKeyToken="31bf3856ad364e35" />
    </parent>
    <installerAssembly name="Example-ServicingStack" version="6.0.0.0" language="neutral" processorArchitecture="amd64" versionScope="nonSxS" publicKeyToken="31bf3856ad364e35" />
    <update name="3071740-1_neutral_GDR">
      <component>
        <assemblyIdentity name="Example-Integration-Components" version="6.3.9600.18080" processorArchitecture="amd64" language="neutral" buildType="release" publicKeyToken="31bf3856ad364e35" versionScope="nonSxS" />
      </component>
    </update>
  </package>
</assembly>
"""


def payload_bytes(size: int, seed: int = 7) -> bytes:
    """Driver-like bytes: some structure, some noise, so MSZIP makes several blocks of varied content."""
    rng = random.Random(seed)
    words = [b"vmbus", b"storvsc", b"netvsc", b"\x00\x00\x00\x00", b"MZ", b"\x90\x90"]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words) if rng.random() < 0.7 else rng.randbytes(8)
    return bytes(out[:size])


# -- cabs from real tools -----------------------------------------------------------

def gcab(tmp_path: Path, files: dict[str, bytes], compress: bool = True) -> bytes:
    """A cab written by gcab; names may use '/' for folders (gcab stores them with '\\')."""
    assert shutil.which("gcab"), "gcab is needed (install.sh --test installs it)"
    src = tmp_path / f"gcab-src-{len(list(tmp_path.iterdir()))}"
    src.mkdir()
    for name, data in files.items():
        path = src / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    out = src / "out.cab"
    args = ["gcab", "-c"] + (["-z"] if compress else []) + [str(out)] + list(files)
    subprocess.run(args, cwd=src, check=True, capture_output=True)
    return out.read_bytes()


@pytest.fixture(scope="module")
def real_cab() -> bytes:
    return (REAL / "cab" / "mszip_lzx_qtm.cab").read_bytes()


@pytest.fixture(scope="module")
def package_cab(tmp_path_factory) -> bytes:
    tmp = tmp_path_factory.mktemp("package")
    return gcab(tmp, {"update.mum": PACKAGE_MUM, "vmbus.sys": payload_bytes(100_000)})


# -- cabs built from the spec (MS-CAB 2.1) -------------------------------------------------

def stored_folder(members: list[tuple[str, bytes]]):
    """An uncompressed folder: (typeCompress, [(name, size)], [(block bytes, uncompressed size)])."""
    stream = b"".join(data for _, data in members)
    blocks = [(stream[i : i + 32768], len(stream[i : i + 32768])) for i in range(0, len(stream), 32768)]
    return 0, [(name, len(data)) for name, data in members], blocks


def build_cab(folders, *, reserve: tuple[int, int, int] | None = None, flags: int = 0, strings: bytes = b"",
              header_fill: bytes = b"\xaa") -> bytes:
    """A cabinet laid out as MS-CAB 2.1 says: header, folders, files, then each folder's CFDATA blocks."""
    h, f, d = reserve or (0, 0, 0)
    if reserve is not None:
        flags |= 0x0004
    header_size = 36 + (4 + h if reserve is not None else 0) + len(strings)
    folder_size = 8 + f
    file_table = b""
    for index, (_, files, _) in enumerate(folders):
        offset = 0
        for name, size in files:
            raw = name.encode("utf-8")
            attribs = 0x20 | (0x80 if not name.isascii() else 0)
            file_table += struct.pack("<IIHHHH", size, offset, index, 0x59BA, 0x226C, attribs) + raw + b"\0"
            offset += size
    coff_files = header_size + len(folders) * folder_size
    data_at = coff_files + len(file_table)
    folder_table, data_area = b"", b""
    for comp, _, blocks in folders:
        folder_table += struct.pack("<IHH", data_at + len(data_area), len(blocks), comp) + b"\xbb" * f
        for block, uncompressed in blocks:
            data_area += struct.pack("<IHH", 0, len(block), uncompressed) + b"\xcc" * d + block
    n_files = sum(len(files) for _, files, _ in folders)
    total = coff_files + len(file_table) + len(data_area)
    header = struct.pack("<4sIIIIIBBHHHHH", b"MSCF", 0, total, 0, coff_files, 0, 3, 1, len(folders), n_files, flags,
                         1234, 0)
    if reserve is not None:
        header += struct.pack("<HBB", h, f, d) + (header_fill * h)[:h]
    header += strings
    out = header + folder_table + file_table + data_area
    assert len(out) == total
    return out


def set_u16(buf: bytes, at: int, value: int) -> bytes:
    return buf[:at] + struct.pack("<H", value) + buf[at + 2 :]


def set_u32(buf: bytes, at: int, value: int) -> bytes:
    return buf[:at] + struct.pack("<I", value) + buf[at + 4 :]


def assert_cab_error(excinfo, *needles: str) -> None:
    text = str(excinfo.value)
    assert LABEL in text, text
    assert "\n" not in text, text
    for needle in needles:
        assert needle in text, text


# -- the real LZX/MSZIP/Quantum cab --------------------------------------------------

def test_real_cab_lists_three_members(real_cab):
    assert list_members(real_cab, LABEL) == [CabMember(n, size) for n, (size, _) in REAL_MEMBERS.items()]


@pytest.mark.parametrize("name", sorted(REAL_MEMBERS))
def test_real_cab_extracts_every_compression_method(real_cab, name):
    size, md5 = REAL_MEMBERS[name]
    data = extract_member(real_cab, name, LABEL)
    assert len(data) == size
    assert hashlib.md5(data).hexdigest() == md5
    text = data.decode("ascii")
    assert text.isprintable() or text.endswith("\n")


def test_member_names_are_case_insensitive(real_cab):
    assert extract_member(real_cab, "LZX.TXT", LABEL) == extract_member(real_cab, "lzx.txt", LABEL)


def test_real_cab_is_no_package(real_cab):
    with pytest.raises(CabError) as e:
        read_package(real_cab, LABEL)
    assert_cab_error(e, "no update.mum")


def test_missing_member(real_cab):
    with pytest.raises(CabError) as e:
        extract_member(real_cab, "nothere.txt", LABEL)
    assert_cab_error(e, "no member named nothere.txt")


# -- servicing packages ----------------------------------------------------------------

def test_read_package_from_gcab_cab(package_cab):
    pkg = read_package(package_cab, LABEL)
    assert pkg.label == LABEL
    assert pkg.sha256 == hashlib.sha256(package_cab).hexdigest()
    assert pkg.members == (CabMember("update.mum", len(PACKAGE_MUM)), CabMember("vmbus.sys", 100_000))
    ident = pkg.identity
    assert ident.name == "Package_for_KB3071740"
    assert ident.version == "6.3.9600.18080"
    assert ident.arch == "amd64"
    assert ident.public_key_token == "31bf3856ad364e35"
    assert ident.package_identifier == "KB3071740"
    assert ident.parent_versions == ("6.1.7601.17514",)
    assert extract_member(package_cab, "vmbus.sys", LABEL) == payload_bytes(100_000)


def test_read_package_real_manifest(tmp_path):
    manifest = (REAL / "servicing" / "Package_1_for_KB4601060.mum").read_bytes()
    cab = gcab(tmp_path, {"update.mum": manifest, "Package_1_for_KB4601060.cat": b"\x30\x82" + bytes(300)})
    ident = read_package(cab, LABEL).identity
    assert (ident.name, ident.version, ident.arch) == ("Package_1_for_KB4601060", "10.0.3770.4", "amd64")
    assert ident.public_key_token == "31bf3856ad364e35"
    assert ident.package_identifier == "KB4601060"
    # Seven first-level parent identities, then the nested parent's one, in document order.
    assert ident.parent_versions == (
        "10.0.17763.1", "10.0.10240.16384", "10.0.10586.0", "10.0.14393.0",
        "10.0.15063.0", "10.0.16299.15", "10.0.17134.1", "10.0.17763.1",
    )


def test_update_mum_found_case_insensitively(tmp_path):
    cab = gcab(tmp_path, {"UPDATE.MUM": PACKAGE_MUM})
    assert read_package(cab, LABEL).identity.name == "Package_for_KB3071740"


def test_update_mum_must_be_at_the_root(tmp_path):
    cab = gcab(tmp_path, {"sub/update.mum": PACKAGE_MUM, "a.txt": b"a"})
    assert [m.name for m in list_members(cab, LABEL)] == ["sub\\update.mum", "a.txt"]
    with pytest.raises(CabError) as e:
        read_package(cab, LABEL)
    assert_cab_error(e, "no update.mum")


def test_two_update_mums_are_ambiguous():
    cab = build_cab([stored_folder([("update.mum", PACKAGE_MUM), ("Update.mum", PACKAGE_MUM)])])
    with pytest.raises(CabError) as e:
        read_package(cab, LABEL)
    assert_cab_error(e, "ambiguous")


def test_uncompressed_gcab_cab(tmp_path):
    cab = gcab(tmp_path, {"update.mum": PACKAGE_MUM, "big.bin": payload_bytes(70_000, seed=3)}, compress=False)
    assert read_package(cab, LABEL).identity.version == "6.3.9600.18080"
    assert extract_member(cab, "big.bin", LABEL) == payload_bytes(70_000, seed=3)


def test_signed_cab(tmp_path, package_cab):
    """Servicing cabs are Authenticode-signed: the PKCS#7 blob follows cbCabinet, as osslsigncode writes it."""
    if not (shutil.which("osslsigncode") and shutil.which("openssl")):
        pytest.skip("osslsigncode and openssl are needed to sign a cab")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", "/CN=vhdtool test"], check=True, capture_output=True)
    unsigned, signed = tmp_path / "in.cab", tmp_path / "signed.cab"
    unsigned.write_bytes(package_cab)
    subprocess.run(["osslsigncode", "sign", "-certs", cert, "-key", key, "-in", unsigned, "-out", signed],
                   check=True, capture_output=True)
    data = signed.read_bytes()
    assert struct.unpack_from("<I", data, 8)[0] < len(data)  # the signature lies outside cbCabinet
    pkg = read_package(data, LABEL)
    assert pkg.identity.package_identifier == "KB3071740"
    assert pkg.sha256 == hashlib.sha256(data).hexdigest()
    assert extract_member(data, "vmbus.sys", LABEL) == payload_bytes(100_000)
    with pytest.raises(CabError) as e:
        read_package(data + b"junk", LABEL)
    assert_cab_error(e, "follow the end of the cabinet")


def test_long_and_utf8_names():
    name255 = "n" * 251 + ".txt"
    cab = build_cab([stored_folder([(name255, b"255"), ("ünïcødé.txt", b"utf")])])
    assert [m.name for m in list_members(cab, LABEL)] == [name255, "ünïcødé.txt"]
    assert extract_member(cab, "ÜNÏCØDÉ.TXT", LABEL) == b"utf"
    too_long = build_cab([stored_folder([("n" * 256, b"x")])])
    with pytest.raises(CabError) as e:
        list_members(too_long, LABEL)
    assert_cab_error(e, "longer than 255 bytes")


def test_empty_member():
    cab = build_cab([stored_folder([("empty.txt", b""), ("b.txt", b"b")])])
    assert extract_member(cab, "empty.txt", LABEL) == b""
    assert extract_member(cab, "b.txt", LABEL) == b"b"


# -- errors: each a CabError, one line, naming the cab -----------------------------------------

def _zip() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("update.mum", PACKAGE_MUM)
    return out.getvalue()


def _cut(cab: bytes, at: int, reseal: bool = False) -> bytes:
    out = cab[:at]
    return set_u32(out, 8, len(out)) if reseal else out


BAD_INPUTS = {
    "empty": (lambda cab: b"", "empty file"),
    "random": (lambda cab: random.Random(1).randbytes(4096), "no MSCF signature"),
    "zip": (lambda cab: _zip(), "no MSCF signature"),
    "mscf-garbage": (lambda cab: b"MSCF" + random.Random(2).randbytes(300), ""),
    "three-bytes": (lambda cab: b"MSC", "truncated inside the cabinet header (3 bytes)"),
    "three-other-bytes": (lambda cab: b"PK\x03", "no MSCF signature"),
    "cut-in-header": (lambda cab: cab[:20], "truncated inside the cabinet header"),
    "cut-in-folders": (lambda cab: _cut(cab, 40), "truncated"),
    "cut-in-files": (lambda cab: _cut(cab, 50), "truncated"),
    "cut-in-data": (lambda cab: _cut(cab, len(cab) - 100), "truncated"),
    "resealed-cut-in-folders": (lambda cab: _cut(cab, 40, True), "folder table"),
    "resealed-cut-in-files": (lambda cab: _cut(cab, 50, True), "file table"),
    "resealed-cut-in-data": (lambda cab: _cut(cab, len(cab) - 100, True), "data block"),
    "trailing-junk": (lambda cab: cab + b"\0" * 16, "16 bytes follow the end of the cabinet"),
    "next-cabinet-flag": (lambda cab: set_u16(cab, 30, 0x0002), "multi-cabinet set"),
    "prev-cabinet-flag": (lambda cab: set_u16(cab, 30, 0x0001), "multi-cabinet set"),
    "version-2": (lambda cab: cab[:25] + b"\x02" + cab[26:], "unsupported cabinet format version 2.3"),
    "no-folders": (lambda cab: set_u16(cab, 26, 0), "no folders"),
    "no-files": (lambda cab: set_u16(cab, 28, 0), "no files"),
    "bad-folder-index": (lambda cab: set_u16(cab, 44 + 8, 5), "is in folder 5"),
    "continued-file": (lambda cab: set_u16(cab, 44 + 8, 0xFFFD), "continues in another cabinet"),
    "hidden-file-table": (lambda cab: set_u32(cab, 16, 60), "not after the folder table"),
    "unknown-compression": (lambda cab: set_u16(cab, 42, 0x0007), "unknown compression type"),
    "lzx-window-too-big": (lambda cab: set_u16(cab, 42, 0x1603), "LZX window of 2^22 bytes, outside 2^15..2^21"),
    "data-before-files": (lambda cab: set_u32(cab, 36, 10), "outside the data area"),
    "file-past-folder": (lambda cab: set_u32(cab, 44, 10**6), "runs past the end of folder 0"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_cabs_are_cab_errors(package_cab, case):
    make, needle = BAD_INPUTS[case]
    # The edits address gcab's layout: a 36-byte header, one CFFOLDER at 36, the first CFFILE at 44.
    assert struct.unpack_from("<I", package_cab, 16)[0] == 44
    assert struct.unpack_from("<HHH", package_cab, 26) == (1, 2, 0)
    bad = make(package_cab)
    for call in (lambda: read_package(bad, LABEL), lambda: list_members(bad, LABEL),
                 lambda: extract_member(bad, "vmbus.sys", LABEL)):
        with pytest.raises(CabError) as e:
            call()
        assert_cab_error(e, needle)
        assert e.value.exit_code == 10


def test_bad_block_checksum(package_cab):
    # The last data block belongs to vmbus.sys; gcab stores block checksums and libmspack checks them.
    bad = package_cab[:-5] + bytes([package_cab[-5] ^ 0xFF]) + package_cab[-4:]
    with pytest.raises(CabError) as e:
        extract_member(bad, "vmbus.sys", LABEL)
    assert_cab_error(e, "corrupt cabinet (libmspack: bad checksum extracting vmbus.sys)")
    # read_package decodes only update.mum, in the first block: the damage is not its to find.
    assert read_package(bad, LABEL).identity.package_identifier == "KB3071740"


def test_member_over_the_limit(package_cab):
    with pytest.raises(CabError) as e:
        extract_member(package_cab, "vmbus.sys", LABEL, limit=50_000)
    assert_cab_error(e, "larger than 50000 bytes")


def test_output_cap_holds_inside_the_child(package_cab):
    # Past the parent's size check (as if the header lied), the child's writer still stops at the limit.
    layout = check_cabinet(package_cab, LABEL)
    with pytest.raises(CabError) as e:
        libmspack.decode(layout, LABEL, want=1, limit=1000)
    assert_cab_error(e, "member vmbus.sys is larger than 1000 bytes")


def _package_with(manifest: bytes, tmp_path: Path) -> bytes:
    return gcab(tmp_path, {"update.mum": manifest, "a.txt": b"a"})


def test_update_mum_entity_bomb(tmp_path):
    lol = b'<!ENTITY lol "lol">' + b"".join(
        b'<!ENTITY lol%d "%s">' % (i, b"".join(b"&lol%d;" % (i - 1) if i > 1 else b"&lol;" for _ in range(10)))
        for i in range(1, 10)
    )
    bomb = b'<?xml version="1.0"?><!DOCTYPE assembly [' + lol + b']><assembly xmlns="urn:schemas-microsoft-com:asm.v3">&lol9;</assembly>'
    with pytest.raises(CabError) as e:
        read_package(_package_with(bomb, tmp_path), LABEL)
    assert_cab_error(e, "DOCTYPE", "entities")


def test_update_mum_without_identity(tmp_path):
    manifest = PACKAGE_MUM.replace(b"<assemblyIdentity name=\"Package_for_KB3071740\"", b"<identity name=\"x\"")
    with pytest.raises(CabError) as e:
        read_package(_package_with(manifest, tmp_path), LABEL)
    assert_cab_error(e, "update.mum has no package identity")


def test_update_mum_too_large():
    big = PACKAGE_MUM.replace(b"</assembly>", b"<!--" + b"x" * (4 * 1024 * 1024) + b"--></assembly>")
    cab = build_cab([stored_folder([("update.mum", big)])])
    with pytest.raises(CabError) as e:
        read_package(cab, LABEL)
    assert_cab_error(e, "update.mum is larger than 4 MiB")


# -- update.mum parsing on its own ---------------------------------------------------------------

def test_mum_utf16_with_bom():
    text = PACKAGE_MUM.decode().replace('encoding="utf-8"', 'encoding="utf-16"')
    assert mum.parse_identity(text.encode("utf-16"), LABEL).name == "Package_for_KB3071740"
    assert mum.parse_identity(b"\xfe\xff" + text.encode("utf-16-be"), LABEL).version == "6.3.9600.18080"


def test_mum_utf8_bom_and_no_namespace():
    plain = PACKAGE_MUM.replace(b' xmlns="urn:schemas-microsoft-com:asm.v3"', b"")
    ident = mum.parse_identity(b"\xef\xbb\xbf" + plain, LABEL)
    assert (ident.name, ident.parent_versions) == ("Package_for_KB3071740", ("6.1.7601.17514",))


@pytest.mark.parametrize(
    "manifest, needle",
    [
        (PACKAGE_MUM.replace(b'encoding="utf-8"', b'encoding="shift_jis"'), "not readable XML"),
        (PACKAGE_MUM.replace(b'encoding="utf-8"', b'encoding="x-unheard-of"'), "not readable XML"),
        (PACKAGE_MUM.replace(b"Example Corporation", b"Exampl\xff"), "not readable XML"),
        (PACKAGE_MUM[:300], "not readable XML"),
        (b"", "not readable XML"),
        (PACKAGE_MUM.replace(b"urn:schemas-microsoft-com:asm.v3", b"urn:other"), "no package identity"),
        (PACKAGE_MUM.replace(b'processorArchitecture="amd64" publicKeyToken', b'publicKeyToken'), "no processorArchitecture"),
        (PACKAGE_MUM.replace(b'version="6.3.9600.18080" language', b'version="6.3.x" language'), "invalid version"),
        (PACKAGE_MUM.replace(b'version="6.3.9600.18080" language', b'version="6.3.99999.1" language'), "invalid version"),
        (PACKAGE_MUM.replace(b'version="6.1.7601.17514"', b'version="latest"'), "invalid parent version"),
        (b'<!DOCTYPE assembly SYSTEM "http://example.com/x.dtd"><assembly/>', "DOCTYPE"),
    ],
)
def test_bad_manifests(manifest, needle):
    with pytest.raises(CabError) as e:
        mum.parse_identity(manifest, LABEL)
    assert_cab_error(e, needle)


# -- the child: crashes, hangs and memory blow-ups stay in it -----------------------------------

@pytest.mark.parametrize("how", ["kill", "null-read"])
def test_crash_in_the_child_is_contained(real_cab, monkeypatch, capfd, how):
    def crash(*_args):
        if how == "kill":
            os.kill(os.getpid(), signal.SIGSEGV)
        import ctypes

        ctypes.string_at(0)

    monkeypatch.setattr(libmspack, "decode_here", crash)
    with pytest.raises(CabError) as e:
        list_members(real_cab, LABEL)
    assert_cab_error(e, "libmspack crashed on it (signal 11, SIGSEGV)")
    # No faulthandler traceback or other noise from the child reaches the terminal.
    assert capfd.readouterr() == ("", "")
    # This process lives on, and the library still works in the next child.
    monkeypatch.undo()
    assert len(list_members(real_cab, LABEL)) == 3


def test_hang_in_the_child_times_out(real_cab, monkeypatch):
    monkeypatch.setattr(libmspack, "CHILD_TIMEOUT", 0.5)
    monkeypatch.setattr(libmspack, "decode_here", lambda *_args: time.sleep(60))
    start = time.monotonic()
    with pytest.raises(CabError) as e:
        list_members(real_cab, LABEL)
    assert time.monotonic() - start < 5
    assert_cab_error(e, "did not finish within 0.5 s")


def test_memory_blowup_in_the_child(real_cab, monkeypatch):
    # 2 GiB is more than the child's address space limit lets it add, however much memory the host has.
    monkeypatch.setattr(libmspack, "decode_here", lambda *_args: bytearray(2 * 1024**3))
    with pytest.raises(CabError) as e:
        list_members(real_cab, LABEL)
    assert_cab_error(e, "ran out of memory")


def test_python_error_in_the_child(real_cab, monkeypatch):
    def broken(*_args):
        raise RuntimeError("boom")

    monkeypatch.setattr(libmspack, "decode_here", broken)
    with pytest.raises(CabError) as e:
        list_members(real_cab, LABEL)
    assert_cab_error(e, "child failed")


def test_a_lying_child_is_caught(real_cab, monkeypatch):
    lie = {"length": len(real_cab), "members": [["mszip.txt", 57], ["evil.exe", 187], ["qtm.txt", 59]], "payload": None}
    monkeypatch.setattr(libmspack, "decode_here", lambda *_args: dict(lie))
    with pytest.raises(CabError) as e:
        list_members(real_cab, LABEL)
    assert_cab_error(e, "disagree about the member list")


def test_missing_library(real_cab, monkeypatch):
    monkeypatch.setattr(libmspack, "LIBRARY", replace(libmspack.LIBRARY, soname="libmspack-not-here.so.0"))
    with pytest.raises(MissingLibrary) as e:  # its own exit code, 14, not a bad cab's
        list_members(real_cab, LABEL)
    assert e.value.exit_code == 14 and LABEL in e.value.message
    assert "libmspack is not installed" in e.value.message and "libmspack0" in e.value.message


def test_header_checks_need_no_library(package_cab, monkeypatch):
    # A cab refused by the header checks never reaches libmspack (nor forks).
    monkeypatch.setattr(libmspack, "LIBRARY", replace(libmspack.LIBRARY, soname="libmspack-not-here.so.0"))
    with pytest.raises(CabError) as e:
        list_members(package_cab[:30], LABEL)
    assert_cab_error(e, "truncated")


def test_error_class():
    err = CabError(LABEL, "corrupt cabinet")
    assert err.exit_code == 10
    assert str(err) == f"{LABEL}: corrupt cabinet; use an intact cab from the integration services disk or the Download Center"


def test_child_sees_none_of_the_parents_files(real_cab, monkeypatch, tmp_path):
    # A disk image the caller holds open for writing must be out of reach of a child libmspack let loose.
    image = open(tmp_path / "disk.vhdx", "wb")
    real_decode = libmspack.decode_here

    def probe(*args):
        try:
            os.fstat(image.fileno())
        except OSError:
            return real_decode(*args)
        raise Refusal("the parent's open file is visible in the child")

    monkeypatch.setattr(libmspack, "decode_here", probe)
    try:
        assert len(list_members(real_cab, LABEL)) == 3
    finally:
        image.close()


def test_works_with_stdio_closed(tmp_path):
    # A daemon may run with fds 0-2 closed; the child's pipe must not land on them and be clobbered.
    out = tmp_path / "out.txt"
    code = (
        "import os, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})\n"
        "from vhdtool.cabinet import list_members\n"
        f"data = open({str(REAL / 'cab' / 'mszip_lzx_qtm.cab')!r}, 'rb').read()\n"
        "for fd in (0, 1, 2): os.close(fd)\n"
        f"open({str(out)!r}, 'w').write(repr([m.name for m in list_members(data, 'x')]))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert out.read_text() == "['mszip.txt', 'lzx.txt', 'qtm.txt']"


def test_fork_failure_is_a_cab_error(real_cab, monkeypatch):
    def no_fork():
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", no_fork)
    with pytest.raises(CabError) as e:
        list_members(real_cab, LABEL)
    assert_cab_error(e, "cannot start a process to read it in (Resource temporarily unavailable)")


def test_large_member_crosses_the_pipe(tmp_path):
    # 20 MiB: many MSZIP blocks and far more than a pipe buffer holds; above the default limit.
    big = payload_bytes(1024 * 1024, seed=11) * 20
    cab = gcab(tmp_path, {"update.mum": PACKAGE_MUM, "big.bin": big})
    with pytest.raises(CabError) as e:
        extract_member(cab, "big.bin", LABEL)
    assert_cab_error(e, "larger than 16777216 bytes")
    assert extract_member(cab, "big.bin", LABEL, limit=32 * 1024 * 1024) == big
