"""Fuzz the cab reader, and replay the malformed cabinets of libmspack's own test suite.

Mutations hit one structure at a time (header fields, the folder table, the
file table, CFDATA headers, CFDATA payloads with their checksum zeroed so the
decoders see the damage, truncation) of three cabinets: libmspack's real
MSZIP/LZX/Quantum cab, a gcab MSZIP package and a stored cab with every
reserved area in use. Only CabError may escape. VHDTOOL_CAB_FUZZ_EXAMPLES sets
the number of cases of the full sweep (default 10000, marked slow); the default
run makes a tenth of them.

The second half rebuilds, from what libmspack's test/cabd_test.c and
test/test_files/cabd/ say each file breaks, an equivalent cabinet byte by
byte, and checks it is refused with a CabError (or, where libmspack's test
expects a good read, read correctly).
"""

from __future__ import annotations

import os
import random
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import SWEEPS, sweep_count
from test_cab import PACKAGE_MUM, REAL, build_cab, gcab, payload_bytes, stored_folder
from vhdtool.cabinet import CabError, extract_member, libmspack, list_members, read_package
from vhdtool.container.source import Source

EXAMPLES = int(os.environ.get("VHDTOOL_CAB_FUZZ_EXAMPLES", "10000"))
LABEL = "fuzzed.cab"
INTERESTING_U16 = [0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0x8001, 0xFFFD, 0xFFFE, 0xFFFF]
INTERESTING_U32 = INTERESTING_U16 + [0x7FFF8000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]
# Weighted towards damage that passes the header checks and reaches libmspack's decoders.
KINDS = ["header", "folder", "file", "block_header", "block_header", "payload", "payload", "payload", "payload",
         "truncate", "reseal"]


def layout_regions(buf: bytes) -> dict:
    """Where each structure of an intact cab lies, walked from its header (reserves included)."""
    n_folders, n_files, flags = struct.unpack_from("<HHH", buf, 26)
    pos, h, f, d = 36, 0, 0, 0
    if flags & 4:
        h, f, d = struct.unpack_from("<HBB", buf, 36)
        pos += 4 + h
    folders = [pos + i * (8 + f) for i in range(n_folders)]
    files_at = struct.unpack_from("<I", buf, 16)[0]
    files, p = [], files_at
    for _ in range(n_files):
        files.append(p)
        p = buf.index(b"\0", p + 16) + 1
    blocks = []  # (header offset, payload start, payload end)
    for at in folders:
        start, count, _ = struct.unpack_from("<IHH", buf, at)
        for _ in range(count):
            size = struct.unpack_from("<H", buf, start + 4)[0]
            payload = start + 8 + d
            blocks.append((start, payload, payload + size))
            start = payload + size
    return {"header_end": pos, "folders": folders, "files": files, "files_end": p, "blocks": blocks}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cabfuzz")
    real = (REAL / "cab" / "mszip_lzx_qtm.cab").read_bytes()
    package = gcab(tmp, {"update.mum": PACKAGE_MUM, "vmbus.sys": payload_bytes(80_000)})
    stored = build_cab(
        [stored_folder([("update.mum", PACKAGE_MUM)]), stored_folder([("a.txt", b"alpha\n" * 3000), ("b.txt", b"b")])],
        reserve=(16, 5, 3),
    )
    out = {}
    for name, data, members in (
        ("real", real, ["mszip.txt", "lzx.txt", "qtm.txt"]),
        ("package", package, ["update.mum", "vmbus.sys"]),
        ("stored", stored, ["update.mum", "a.txt", "b.txt"]),
    ):
        for call in (lambda: list_members(data, LABEL), lambda: [extract_member(data, m, LABEL) for m in members]):
            call()  # the bases are intact
        out[name] = (data, layout_regions(data), members)
    return out


def _put(buf: bytearray, at: int, width: int, value: int) -> None:
    if 0 <= at and at + width <= len(buf):
        buf[at : at + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")


@st.composite
def mutations(draw, regions: dict, size: int):
    """A list of (kind, arguments) edits for one cab."""
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(KINDS))
        if kind == "header":
            at, width = draw(st.sampled_from([(8, 4), (16, 4), (24, 1), (25, 1), (26, 2), (28, 2), (30, 2),
                                              (36, 2), (38, 1), (39, 1), (40, 4), (44, 4), (48, 4)]))
            value = draw(st.sampled_from(INTERESTING_U32) | st.integers(0, (1 << (8 * width)) - 1))
            edits.append(("put", at, width, value))
        elif kind in ("folder", "file"):
            starts = regions["folders"] if kind == "folder" else regions["files"]
            base = draw(st.sampled_from(starts))
            field = draw(st.sampled_from([(0, 4), (4, 2), (6, 2)] if kind == "folder"
                                         else [(0, 4), (4, 4), (8, 2), (14, 2), (16, 1), (17, 1)]))
            value = draw(st.sampled_from(INTERESTING_U32) | st.integers(0, (1 << (8 * field[1])) - 1))
            edits.append(("put", base + field[0], field[1], value))
        elif kind == "block_header":
            header, _, _ = draw(st.sampled_from(regions["blocks"]))
            offset, width = draw(st.sampled_from([(0, 4), (4, 2), (6, 2)]))
            value = draw(st.sampled_from(INTERESTING_U16) | st.integers(0, (1 << (8 * width)) - 1))
            edits.append(("put", header + offset, width, value))
        elif kind == "payload":
            header, start, end = draw(st.sampled_from(regions["blocks"]))
            if end > start:
                flip = st.tuples(st.integers(start, end - 1), st.integers(1, 255))
                edits.append(("flip", draw(st.lists(flip, min_size=1, max_size=8))))
            # Zeroed (most of the time), the checksum no longer stops the damage before the decoder sees it.
            if draw(st.integers(0, 3)):
                edits.append(("put", header, 4, 0))
        else:
            # Structure boundaries and their neighbours, or anywhere at all.
            edges = [0, 36, regions["header_end"], regions["files_end"], size - 1] + regions["folders"] + regions["files"]
            edges += [b for block in regions["blocks"] for b in block]
            near = st.builds(lambda e, d: min(max(e + d, 0), size - 1), st.sampled_from(edges), st.integers(-2, 2))
            cut = draw(near | st.integers(0, size - 1))
            edits.append(("cut", cut, kind == "reseal"))
    return edits


def apply(data: bytes, edits) -> bytes:
    buf = bytearray(data)
    for edit in edits:
        if edit[0] == "put":
            _put(buf, edit[1], edit[2], edit[3])
        elif edit[0] == "flip":
            for at, mask in edit[1]:
                if at < len(buf):
                    buf[at] ^= mask
        else:
            del buf[edit[1] :]
            if edit[2]:
                _put(buf, 8, 4, len(buf))
    return bytes(buf)


@st.composite
def cases(draw, bases):
    name = draw(st.sampled_from(sorted(bases)))
    data, regions, members = bases[name]
    edits = draw(mutations(regions, len(data)))
    op = draw(st.sampled_from(["package", "list", "extract"]))
    member = draw(st.sampled_from(members))
    return apply(data, edits), op, member


@pytest.mark.parametrize("sweep", SWEEPS)
def test_fuzz_cab(bases, sweep, tmp_path):
    @settings(max_examples=sweep_count(EXAMPLES, sweep, EXAMPLES // 16), derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(cases(bases))
    def run(case):
        data, op, member = case
        outcome = _read(data, op, member)
        # The same cab as a local file (a Source, read through pread slices) reads the same, or fails the same.
        local.write_bytes(data)
        with Source(local) as source:
            got = _read(source, op, member)
            if got != outcome:
                # libmspack can leave bytes it never wrote in what it decodes from damaged data: such
                # an answer changes from one run to the next, whatever it was read from. A difference
                # that each path repeats is the bug this looks for.
                again, got_again = _read(data, op, member), _read(source, op, member)
                assert not (again == outcome and got_again == got), (op, member)

    local = tmp_path / LABEL
    run()


def _read(data, op: str, member: str):
    try:
        if op == "package":
            pkg = read_package(data, LABEL)
            assert pkg.identity.name and pkg.members
            return pkg.identity, pkg.members, pkg.sha256
        if op == "list":
            found = list_members(data, LABEL)
            for m in found:
                assert isinstance(m.name, str) and 0 <= m.size
            return found
        got = extract_member(data, member, LABEL)
        assert isinstance(got, bytes)
        return got
    except CabError as e:
        text = str(e)
        assert LABEL in text and "\n" not in text, text
        return text


# -- libmspack's malformed cabinets, rebuilt ----------------------------------------------------

def _header(total, coff_files, n_folders, n_files, flags=0):
    return struct.pack("<4sIIIIIBBHHHHH", b"MSCF", 0, total, 0, coff_files, 0, 3, 1, n_folders, n_files, flags, 1234, 0)


def _normal() -> bytes:
    """Two files in one stored folder, like libmspack's normal_2files_1folder.cab."""
    return build_cab([stored_folder([("hello.c", b"#include <stdio.h>\n" * 4 + b"x"), ("welcome.c", b"/* welcome */\n" * 5 + b"yyyy")])])


def _hidden_files(variant: str) -> bytes:
    """test_files/cabd/hidden-files.pl: 2 file entries after the folder, 2 more that coffFiles points at."""
    header_size, folder_size = 36, 8
    names = ["normal1.txt", "normal2.txt", "hidden1.txt", "hidden2.txt"]
    entries = [struct.pack("<IIHHHH", 0, 0, 0, 0x226C, 0x59BA, 0x20) + n.encode() + b"\0" for n in names]
    if variant == "bad-folderid":
        entries[2] = struct.pack("<IIHHHH", 0, 0, 7, 0x226C, 0x59BA, 0x20) + b"hidden1.txt\0"
    files_at = header_size + folder_size
    hidden_at = files_at + len(entries[0]) + len(entries[1])
    data_at = files_at + sum(map(len, entries))
    block = struct.pack("<IHH", 0, 0, 0)
    total = data_at + len(block)
    if variant == "beyond-eof":
        hidden_at = total + 100
    return _header(total, hidden_at, 1, 2, 0) + struct.pack("<IHH", data_at, 0, 0) + b"".join(entries) + block


def _cut_normal(where: str) -> bytes:
    cab = _normal()
    at = {
        "shortheader": 20,  # partial_shortheader: less than a CFHEADER
        "nofolder": 36,  # partial_nofolder: header only
        "shortfolder": 40,  # partial_shortfolder: half a CFFOLDER
        "nofiles": 44,  # partial_nofiles: no CFFILE
        "shortfile1": 50,  # partial_shortfile1: inside a CFFILE's fixed part
        "shortfile2": 63,  # partial_shortfile2: inside a file name
        "nodata": struct.unpack_from("<I", cab, 36)[0],  # partial_nodata: all headers, no CFDATA
    }[where]
    return cab[:at]


def _short_ext_header() -> bytes:
    cab = build_cab([stored_folder([("a.txt", b"a")])], reserve=(0, 0, 0))
    return cab[:38]  # partial_shortextheader: the reserve sizes are cut


def _set(cab: bytes, at: int, fmt: str, value: int) -> bytes:
    size = struct.calcsize(fmt)
    return cab[:at] + struct.pack(fmt, value) + cab[at + size :]


def _garbage_folder(comp: int, payload: bytes, uncompressed: int = 1000, blocks: int = 1):
    return comp, [("garbage.bin", uncompressed * blocks)], [(payload, uncompressed)] * blocks


def _folders_segfault() -> bytes:
    """cve-2014-9732-folders-segfault: file 1 in a good folder, file 2 in a folder that cannot be decoded."""
    return build_cab([stored_folder([("good.txt", b"good\n" * 10)]),
                      (3 | (16 << 8), [("bad.txt", 500)], [(random.Random(9732).randbytes(200), 500)])])


def _str_strings(which: str) -> bytes:
    # partial_str_*: a set member whose prev/next cabinet and disk names are cut or unterminated.
    flags = {"pname": 1, "nname": 2}[which]
    cab = build_cab([stored_folder([("a.txt", b"a")])], flags=flags, strings=b"prev.cab\0disk1\0")
    return cab[:40]


MSZIP = 1
QUANTUM = 2 | (4 << 4) | (18 << 8)
LZX = 3 | (18 << 8)
RNG = random.Random(2015)

MALFORMED = {
    # cabd_open_test_04: bad cabs that must not load
    "bad_signature": lambda: b"MSCX" + _normal()[4:],
    "bad_nofolders": lambda: _set(_normal(), 26, "<H", 0),
    "bad_nofiles": lambda: _set(_normal(), 28, "<H", 0),
    "bad_folderindex": lambda: _set(_normal(), 44 + 16 + len(b"hello.c\0") + 8, "<H", 1),
    "filename-read-violation-1": lambda: build_cab([stored_folder([("", b"x")])]),
    # cabd_open_test_05: cut short, or with partial strings
    "partial_shortheader": lambda: _cut_normal("shortheader"),
    "partial_shortextheader": _short_ext_header,
    "partial_nofolder": lambda: _cut_normal("nofolder"),
    "partial_shortfolder": lambda: _cut_normal("shortfolder"),
    "partial_nofiles": lambda: _cut_normal("nofiles"),
    "partial_shortfile1": lambda: _cut_normal("shortfile1"),
    "partial_shortfile2": lambda: _cut_normal("shortfile2"),
    "partial_str_shortpname": lambda: _str_strings("pname"),
    "partial_str_shortnname": lambda: _str_strings("nname"),
    "partial_nodata": lambda: _cut_normal("nodata"),
    # filename-read-violation-2..4: a name that runs to the end of the file without its NUL
    "filename-read-violation-2": lambda: _set(_normal(), 8, "<I", 60)[:60],
    "filename-read-violation-3": lambda: _normal().replace(b"welcome.c\0", b"welcome.cc"),
    "filename-read-violation-4": lambda: build_cab([stored_folder([("n" * 300, b"x")])]),
    # the "hidden files" trick: coffFiles and the entries after the folders disagree
    "hidden-files": lambda: _hidden_files("plain"),
    "hidden-file-bad-folderid": lambda: _hidden_files("bad-folderid"),
    "hidden-file-beyond-eof": lambda: _hidden_files("beyond-eof"),
    # search_tricky1: a fake "MSCF" before the real one; vhdtool does not search, so it is refused
    "search_tricky1": lambda: b"MSCF" + _normal(),
    # multi_basic_pt*: parts of a cabinet set
    "multi_basic_pt1": lambda: _set(_normal(), 30, "<H", 2),
    "multi_basic_pt3": lambda: _set(_normal(), 30, "<H", 3),
    "lzx-window-out-of-range": lambda: build_cab([_garbage_folder(3 | (22 << 8), RNG.randbytes(100))]),
    "quantum-window-out-of-range": lambda: build_cab([_garbage_folder(2 | (9 << 8), RNG.randbytes(100))]),
}

# cabd_extract_test_01: decoder attacks. The cabinet opens; extracting must fail (or, for
# streams that happen to decode, give exactly the member's size), and never hang or crash.
MALFORMED_STREAMS = {
    "cve-2010-2800-mszip-infinite-loop": lambda: build_cab([_garbage_folder(MSZIP, b"CK")]),
    "cve-2015-4470-mszip-over-read": lambda: build_cab([_garbage_folder(MSZIP, b"CK" + RNG.randbytes(64), blocks=3)]),
    "mszip-stored-block-lies": lambda: build_cab([_garbage_folder(MSZIP, b"CK\x01\xff\x7f\x00\x80" + b"z" * 40)]),
    "cve-2014-9556-qtm-infinite-loop": lambda: build_cab([_garbage_folder(QUANTUM, b"\0" * 8, 32768, 3)]),
    "qtm-garbage": lambda: build_cab([_garbage_folder(QUANTUM, RNG.randbytes(500), 32768, 2)]),
    "qtm-max-size-block": lambda: build_cab([_garbage_folder(QUANTUM, RNG.randbytes(32768 + 6144), 32768)]),
    "cve-2015-4471-lzx-under-read": lambda: build_cab([_garbage_folder(LZX, RNG.randbytes(40), 32768, 2)]),
    "lzx-main-tree-no-lengths": lambda: build_cab([_garbage_folder(LZX, b"\x00\x30" + b"\0" * 300, 32768)]),
    "lzx-premature-matches": lambda: build_cab([_garbage_folder(LZX, RNG.randbytes(3000), 32768, 2)]),
}

# Cases where libmspack's suite expects (or vhdtool gives) a good read of some members.
GOOD = {
    "normal_2files_1folder": (_normal, {"hello.c": b"#include <stdio.h>\n" * 4 + b"x", "welcome.c": b"/* welcome */\n" * 5 + b"yyyy"}),
    "normal_255c_filename": (lambda: build_cab([stored_folder([("f" * 255, b"255")])]), {"f" * 255: b"255"}),
}
for _h in (0, 16):
    for _f in (0, 5):
        for _d in (0, 3):
            _tag = ("H" if _h else "-") + ("F" if _f else "-") + ("D" if _d else "-")
            # reserve_*.cab: reserved header (H), folder (F) and data (D) areas in every combination.
            GOOD[f"reserve_{_tag}"] = (
                (lambda h=_h, f=_f, d=_d: build_cab([stored_folder([("test1.txt", b"one\n" * 9000), ("test2.txt", b"two\n")])],
                                                    reserve=(h, f, d))),
                {"test1.txt": b"one\n" * 9000, "test2.txt": b"two\n"},
            )


def _every_call(data: bytes, names):
    yield lambda: list_members(data, LABEL)
    yield lambda: read_package(data, LABEL)
    for name in names:
        yield lambda name=name: extract_member(data, name, LABEL)


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_libmspack_malformed_cases_are_refused(case):
    data = MALFORMED[case]()
    names = ["garbage.bin", "hello.c", "welcome.c", "a.txt", "normal1.txt", "hidden1.txt"]
    for call in _every_call(data, names):
        start = time.monotonic()
        with pytest.raises(CabError) as e:
            call()
        text = str(e.value)
        assert LABEL in text and "\n" not in text, text
        assert time.monotonic() - start < libmspack.CHILD_TIMEOUT + 2


@pytest.mark.parametrize("case", sorted(MALFORMED_STREAMS))
def test_libmspack_malformed_streams_are_refused(case):
    data = MALFORMED_STREAMS[case]()
    (member,) = list_members(data, LABEL)
    start = time.monotonic()
    try:
        out = extract_member(data, member.name, LABEL)
    except CabError as e:
        text = str(e)
        assert LABEL in text and "\n" not in text and "libmspack" in text, text
    else:
        assert len(out) == member.size
    assert time.monotonic() - start < libmspack.CHILD_TIMEOUT + 2


@pytest.mark.parametrize("case", sorted(GOOD))
def test_libmspack_good_cases_read(case):
    make, members = GOOD[case]
    data = make()
    assert [m.name for m in list_members(data, LABEL)] == list(members)
    for name, content in members.items():
        assert extract_member(data, name, LABEL) == content


def test_folders_segfault_case_extracts_good_bad_good():
    """cve-2014-9732: extracting file 1, then 2 (bad folder), then 1 again must work, then fail, then work."""
    data = _folders_segfault()
    assert extract_member(data, "good.txt", LABEL) == b"good\n" * 10
    with pytest.raises(CabError) as e:
        extract_member(data, "bad.txt", LABEL)
    assert "libmspack" in str(e.value)
    assert extract_member(data, "good.txt", LABEL) == b"good\n" * 10
