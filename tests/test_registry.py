"""Registry layer: lookups judged by hivexget, and hostile hives that must cost linear work.

Normal hives are made by hivexsh (and one is Windows' own SYSTEM hive); hivexget
and hivexsh are the judges of what a lookup must return. Hostile hives are
built byte by byte (registry_craft.py): each is well-formed cell by cell, and
each must give a one-line CorruptHive or the right answer, with the work done
(cells read, list entries followed) growing at most linearly with the structure.
"""

from __future__ import annotations

import io
import random
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import registry_craft as rc
from dissect.regf.regf import parse_value

from vhdtool.errors import CorruptHive
from vhdtool.registry.hive import Hive
from vhdtool.registry.cells import Damage
from vhdtool.registry.records import decode_value

REAL = Path(__file__).resolve().parent.parent / "fixtures" / "real"
needs_hivex = pytest.mark.skipif(
    not (shutil.which("hivexsh") and shutil.which("hivexget")), reason="hivexsh/hivexget not installed"
)


def hive_of(data: bytes, name: str = "SOFTWARE") -> Hive:
    return Hive(io.BytesIO(data), name, "disk.vhdx")


# -- hivex as the judge ------------------------------------------------------------------

def hivexsh(hive: Path, lines: list[str]) -> None:
    script = hive.with_suffix(".script")
    script.write_text("\n".join(lines + ["commit"]) + "\n")
    subprocess.run(["hivexsh", "-w", "-f", str(script), str(hive)], check=True, capture_output=True)


def hivex_hive(tmp_path: Path, lines: list[str]) -> Path:
    hive = tmp_path / "hive"
    shutil.copyfile(REAL / "minimal", hive)
    hive.chmod(0o644)
    hivexsh(hive, ["cd \\"] + lines)
    return hive


def hex_bytes(values: bytes) -> str:
    return ",".join(f"{b:02x}" for b in values)


REG_LINE = re.compile(r'^"((?:[^"\\]|\\.)*)"=(.*)$')


def unescape(s: str) -> str:
    return re.sub(r"\\(.)", r"\1", s)


def hivexget_values(hive: Path, path: str) -> dict:
    """The values of ``path`` as hivexget exports them (.reg syntax), decoded here."""
    out = subprocess.run(["hivexget", str(hive), path], check=True, capture_output=True, text=True).stdout
    values = {}
    for line in out.splitlines():
        m = REG_LINE.match(line)
        assert m, line
        name, text = unescape(m.group(1)), m.group(2)
        name = "(Default)" if name == "@" else name
        if text.startswith('"'):
            values[name] = unescape(text[1:-1])
        elif text.startswith('str(2):"'):
            values[name] = unescape(text[len('str(2):"') : -1])
        elif text.startswith("dword:"):
            values[name] = int(text[6:], 16)
        else:
            vtype, raw = re.fullmatch(r"hex\((\d+)\):(.*)", text).groups()
            data = bytes.fromhex(raw.replace(",", ""))
            if vtype == "7":
                values[name] = [s for s in data.decode("utf-16-le").split("\0")[:-2]]
            elif vtype == "11":
                values[name] = int.from_bytes(data, "little")
            else:
                values[name] = data
    return values


def hivexsh_ls(hive: Path, path: str) -> list[str]:
    lines = ["cd \\"] + ([f"cd {path}"] if path else []) + ["ls"]
    out = subprocess.run(["hivexsh", str(hive)], input="\n".join(lines) + "\n", check=True,
                         capture_output=True, text=True).stdout
    return out.splitlines()


@needs_hivex
def test_values_of_several_types_match_hivexget(tmp_path):
    multi = "".join(s + "\0" for s in ["one", "two", "Three"]).encode("utf-16-le") + b"\0\0"
    hive = hivex_hive(tmp_path, [
        "add Software", "cd Software", "add MixedCase Key", "cd MixedCase Key",
        "setval 8",
        "Str", "string:hello world",
        "Exp", "expandstring:%SystemRoot%\\system32",
        "Dw", "dword:0x0000abcd",
        "Qw", "hex:11:" + hex_bytes((0x1_0000_0002).to_bytes(8, "little")),
        "Multi", "hex:7:" + hex_bytes(multi),
        "Bin", "hex:3:de,ad,be,ef,00",
        "Empty", "string:",
        "@", "string:the default",
    ])
    judged = hivexget_values(hive, "Software\\MixedCase Key")
    assert judged["Multi"] == ["one", "two", "Three"] and judged["Qw"] == 0x1_0000_0002
    h = hive_of(hive.read_bytes())
    for path in ("Software\\MixedCase Key", "SOFTWARE\\mixedcase KEY", "\\software\\MIXEDCASE key\\"):
        assert h.values(path) == judged
        assert h.key(path).name == "MixedCase Key"
    for name, value in judged.items():
        assert h.value("software\\mixedcase key", name.swapcase()) == value
    assert h.value("Software\\MixedCase Key", "Missing", "dflt") == "dflt"
    assert h.key("Software\\MixedCase Key\\Missing") is None
    assert h.values("Missing") == {} and h.subkey_names("Missing") == []
    assert h.subkey_names("") == hivexsh_ls(hive, "") == ["Software"]


@needs_hivex
def test_index_root_over_1500_hivex_keys_matches_hivexsh(tmp_path):
    """hivex writes one lh leaf however many keys; split it into an ri of three leaves as Windows does."""
    names = [f"Key{i:05d}" for i in range(1500)]
    hive = hivex_hive(tmp_path, ["add Big", "cd Big"] + [f"add {n}" for n in names]
                      + ["cd Key01234", "setval 1", "Found", "dword:0x00000007"])
    split = tmp_path / "split"
    split.write_bytes(rc.split_into_index_root(hive.read_bytes(), "Big", 3))
    listed = hivexsh_ls(split, "Big")
    assert sorted(listed) == names  # hivex reads the ri we made
    h = hive_of(split.read_bytes())
    assert sorted(h.subkey_names("Big")) == sorted(listed)
    for name in ("Key00000", "key00499", "KEY00500", "Key01234", "key01499"):
        assert h.key(f"big\\{name}").name == name.capitalize()
    assert h.key("Big\\Key01500") is None
    assert h.value("BIG\\KEY01234", "found") == 7 == hivexget_values(split, "Big\\Key01234")["Found"]
    # One list walk for all of that: the leaves and 1500 key nodes, each read once.
    assert h.cells_visited < 1500 + 20


@needs_hivex
def test_windows_index_root_matches_hivexsh(real):
    """Windows' own ri: DriverDatabase\\DeviceIds\\PCI of the real Windows 10 SYSTEM hive (6 lh leaves)."""
    system = real("SYSTEM-win10-x64.gz")
    listed = hivexsh_ls(system, "DriverDatabase\\DeviceIds\\PCI")
    h = hive_of(system.read_bytes(), "SYSTEM")
    names = h.subkey_names("driverdatabase\\deviceids\\pci")
    assert len(names) == 3247 and sorted(names, key=str.lower) == sorted(listed, key=str.lower)
    for name in names[::500]:
        assert h.key(f"DriverDatabase\\DeviceIds\\PCI\\{name.lower()}").name == name
    assert h.value("select", "CURRENT") == hivexget_values(system, "Select")["Current"] == 1


# -- hostile hives: a one-line CorruptHive, at linear cost ------------------------------

def damage(data: bytes, *lookup) -> tuple[str, Hive]:
    h = hive_of(data)
    method, *args = lookup
    with pytest.raises(CorruptHive) as e:
        getattr(h, method)(*args)
    message = str(e.value)
    assert "\n" not in message and message.startswith("disk.vhdx: SOFTWARE hive is damaged at "), message
    assert e.value.exit_code == 4
    return message, h


def work_of(data: bytes, *lookup) -> int:
    h = hive_of(data)
    method, *args = lookup
    try:
        getattr(h, method)(*args)
    except CorruptHive:
        pass
    return h.work


def grows_linearly(build, lookup, n: int = 1000) -> None:
    small, large = work_of(build(n), *lookup), work_of(build(2 * n), *lookup)
    assert large <= 2 * small + 16, (small, large)


HOSTILE = {
    # pattern: (builder, lookup, what the message must say)
    "lf list repeats a key": (rc.lf_repeat, ("key", "Big\\Lookup"), "names key cell 0x"),
    "lf list repeats a key (listing)": (rc.lf_repeat, ("subkey_names", "Big"), "names key cell 0x"),
    "ri repeats a leaf": (rc.ri_repeat, ("key", "Big\\Lookup"), "names leaf 0x"),
    "ri nested in ri": (rc.ri_nesting, ("key", "Big\\Lookup"), "roots hold leaves only"),
    "ri chain": (lambda n: rc.ri_nesting(n, fanout=1), ("subkey_names", "Big"), "roots hold leaves only"),
    "value list repeats a value": (rc.value_repeat, ("value", "Big", "Missing"), "names value cell 0x"),
    "value list repeats a value (listing)": (rc.value_repeat, ("values", "Big"), "names value cell 0x"),
    "value count beyond its cell": (lambda n: rc.value_count(3, n), ("values", "Big"), "its key claims"),
    "big data repeats a segment": (rc.big_data_repeat, ("values", "Big"), "names segment 0x"),
}


@pytest.mark.parametrize("pattern", HOSTILE)
def test_hostile_list_is_damage_at_linear_cost(pattern):
    build, lookup, said = HOSTILE[pattern]
    message, h = damage(build(1000), *lookup)
    assert f"at {lookup[1]}" in message and said in message, message
    assert h.work <= 2 * 1000 + 16
    grows_linearly(build, lookup)


def test_repeats_cost_what_the_list_holds_not_its_square():
    """dissect.regf scans the leaf once per ri entry: n*n. Here: n + n entries, 4 cells."""
    for n in (1000, 2000, 4000):
        _, h = damage(rc.ri_repeat(n), "key", "Big\\Lookup")
        assert h.cells_visited <= 5 and h.entries_followed == 2 * n + 1  # + Big's entry in the root's list


def test_nested_index_roots_stop_at_the_first_nesting():
    """fanout**depth leaves for dissect.regf; here the walk stops at depth one."""
    for depth in (5, 20, 40):
        message, h = damage(rc.ri_nesting(depth), "key", "Big\\Lookup")
        assert h.cells_visited <= 5
    message, _ = damage(rc.ri_self(), "key", "Big\\Lookup")
    assert "names index root" in message


def test_list_counts_beyond_their_cells():
    b = rc.HiveBuilder()
    root, big = rc._root_and_big(b)
    dupe = b.key("Dupe", big)
    b.set_subkeys(big, 0xFFFF, b.lh([(dupe, rc.name_hash("Dupe"))], count=0xFFFF))
    message, h = damage(b.build(root), "key", "Big\\Dupe")
    assert "claims 65535 entries, its cell holds 1" in message and h.work < 10
    message, h = damage(rc.value_count(3, 0xFFFFFFFF), "values", "Big")
    assert "holds 3 entries, its key claims 4294967295" in message and h.work < 10


@pytest.mark.parametrize("size", [0, 4, -0x7FFFFFF8, 0x10000])
def test_cells_claiming_more_than_the_hive(size):
    message, h = damage(rc.cell_size(4, size), "key", "Big\\K00003")
    assert f"claims {abs(size)} bytes, the hive bins hold" in message and h.work <= 10


def test_cell_index_outside_the_hive():
    b = rc.HiveBuilder()
    root, big = rc._root_and_big(b)
    b.set_subkeys(big, 1, b.lh([(0x7FFFFFF0, rc.name_hash("X"))]))
    message, _ = damage(b.build(root), "subkey_names", "Big")
    assert "outside the hive bins" in message


@pytest.mark.parametrize("depth", [0, 1, 5])
def test_subkey_list_pointing_back_at_an_ancestor(depth):
    data = rc.cycle(depth)
    chain = "".join(f"\\C{i}" for i in range(1, depth + 1))
    message, _ = damage(data, "subkey_names", f"Big{chain}")
    assert "listed as a subkey of itself" in message
    message, _ = damage(data, "key", f"Big{chain}\\Big")
    assert "'Big'" in message
    assert hive_of(data).key(f"Big{chain}") is not None  # up to the loop the tree reads


def test_shared_lists_spend_the_budget():
    """Distinct index roots naming one leaf pass every local rule; the hive-wide budget stops them."""
    data = rc.shared_leaf(400, 400)
    h = hive_of(data)
    with pytest.raises(CorruptHive, match=r"work budget spent: more than 65536 cells and list entries"):
        for name in h.subkey_names("Big"):
            h.subkey_names(f"Big\\{name}")
    assert h.budget == 65536 and h.work <= h.budget + 400  # a list's entries are charged together


def test_budget_follows_the_hive_size():
    small = hive_of(rc.many_subkeys(10))
    large = hive_of(rc.many_subkeys(20_000))
    assert small.budget == 65536
    assert large.budget == (len(rc.many_subkeys(20_000)) - 4096) // 8


# -- hostile but answerable: the right answer, at linear cost -------------------------------

def test_wrong_hashes_do_not_hide_keys():
    data = rc.many_subkeys(1000, hashes_wrong=True)
    h = hive_of(data)
    assert h.key("Big\\k00999").name == "K00999"
    assert h.key("Big\\K01000") is None
    assert h.cells_visited <= 1000 + 10
    grows_linearly(lambda n: rc.many_subkeys(n, hashes_wrong=True), ("key", "Big\\Missing"))


def test_hints_pick_the_key_without_reading_the_others():
    h = hive_of(rc.many_subkeys(2000))
    assert h.key("BIG\\k01999").name == "K01999"
    assert h.cells_visited < 10  # the lh hash pointed straight at it
    h.key("Big\\K00001")  # a second lookup in the list reads every key once, then probes a dict
    visited = h.cells_visited
    for i in range(0, 2000, 7):
        assert h.key(f"big\\k{i:05d}") is not None
    assert h.cells_visited == visited


@pytest.mark.parametrize("kind", ["li", "lf", "lh"])
def test_every_leaf_kind_compares_names_without_case(kind):
    """dissect.regf compares li entries case-sensitively; Windows upcases."""
    b = rc.HiveBuilder()
    root, big = rc._root_and_big(b)
    b.subkeys(big, ["Alpha", "beta", "ÉTÉ", "Ωmega", "straße"], kind)
    h = hive_of(b.build(root))
    assert h.key("big\\ALPHA").name == "Alpha"
    assert h.key("BIG\\Beta").name == "beta"
    assert h.key("big\\été").name == "ÉTÉ"
    assert h.key("big\\ωMEGA").name == "Ωmega"
    assert h.key("big\\STRAßE").name == "straße"
    assert h.key("big\\STRASSE") is None  # Windows upcases one character for one
    assert h.subkey_names("Big") == ["Alpha", "beta", "ÉTÉ", "Ωmega", "straße"]


def test_many_values_read_once():
    data = rc.many_values(2000)
    h = hive_of(data)
    assert h.value("Big", "v1999") == 1999
    visited = h.cells_visited
    values = h.values("big")
    assert len(values) == 2000 and values["V7"] == 7
    assert h.cells_visited == visited
    grows_linearly(rc.many_values, ("values", "Big"))


def test_multi_sz_decodes_in_linear_time_as_dissect_does():
    h = hive_of(rc.multi_sz(2_000_000))  # 4 MB: dissect.regf would take hours
    (value,) = h.values("Big").values()
    assert value == ["x" * 2_000_000]
    rnd = random.Random(7)
    pieces = [b"\0\0", b"a\0", b"\0\xd8", b"\0\xdc", b"\x3d\xd8\x00\xde", b"\0", b"\xe9\0"]
    for _ in range(3000):
        data = b"".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 8)))
        try:
            expected = parse_value(rc.REG_MULTI_SZ, data)
        except UnicodeError:
            with pytest.raises(UnicodeError):
                decode_value(rc.REG_MULTI_SZ, data)
        else:
            assert decode_value(rc.REG_MULTI_SZ, data) == expected, data


# -- errors and the base block ----------------------------------------------------------------

def test_short_fixed_size_value_is_one_line_corrupt_hive():
    b = rc.HiveBuilder()
    root, big = rc._root_and_big(b)
    b.values(big, [("Short", rc.REG_QWORD, b"\1\2\3\4\5")])
    message, _ = damage(b.build(root), "value", "Big", "Short")
    assert message.startswith("disk.vhdx: SOFTWARE hive is damaged at Big\\Short (its type needs 8 bytes of data, it holds 5)")


def test_root_that_is_not_a_key():
    b = rc.HiveBuilder()
    vk = b.value("NotAKey", rc.REG_DWORD, b"\0\0\0\0")
    with pytest.raises(CorruptHive, match=r"damaged at the root key \(cell 0x20 is b'vk', not a key node\)"):
        hive_of(b.build(vk))
    with pytest.raises(CorruptHive, match="no 'regf' signature"):
        hive_of(b"regx" + bytes(8192))


def test_base_block_state():
    b = rc.HiveBuilder()
    root = b.key("ROOT", root=True)
    data = bytearray(b.build(root, seq=(5, 4)))
    h = hive_of(bytes(data))
    assert (h.sequence, h.dirty, h.checksum_ok) == ((5, 4), True, True)
    data[500] ^= 1
    assert hive_of(bytes(data)).checksum_ok is False


def test_damaged_bytes_never_escape_as_other_errors():
    """Random damage anywhere in a small hive: an answer or CorruptHive, within the budget."""
    b = rc.HiveBuilder()
    root, big = rc._root_and_big(b)
    keys = b.subkeys(big, [f"K{i}" for i in range(40)], "lf")
    b.values(keys[3], [("S", rc.REG_SZ, rc.encode_sz("text")), ("M", rc.REG_MULTI_SZ, rc.encode_multi_sz(["a"])),
                       ("D", rc.REG_DWORD, b"\1\0\0\0"), ("B", rc.REG_BINARY, bytes(range(40)))])
    clean = b.build(root)
    rnd = random.Random(11)
    for _ in range(400):
        data = bytearray(clean)
        for _ in range(rnd.randint(1, 4)):
            at = rnd.randrange(4096, len(clean) - 4)
            struct.pack_into("<I", data, at, rnd.choice([0, 0xFFFFFFFF, rnd.getrandbits(32), rnd.getrandbits(8)]))
        try:
            h = hive_of(bytes(data))
            h.subkey_names("Big")
            h.values("Big\\K3")
            h.value("big\\k39", "x")
        except CorruptHive as e:
            assert "\n" not in str(e)
            continue
        assert h.work <= h.budget


@pytest.mark.parametrize("vtype", [0, 1, 2, 3, 4, 5, 7, 11, 8, 9])
def test_values_decode_as_dissect_regf_decodes_them(vtype):
    """Our decoder against dissect.regf's, on random data of every value type (and two it leaves raw)."""
    rnd = random.Random(vtype)
    pieces = [b"", b"\0", b"\0\0", b"a", b"a\0", b"\xe9", b"\xe9\0", b"\0\xd8", b"\0\xdc", b"\x3d\xd8\x00\xde",
              b"\xff\xfe", b"abcd", b"\x01\x02\x03\x04\x05\x06\x07\x08\x09"]
    for _ in range(2000):
        data = b"".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 6)))
        try:
            expected = parse_value(vtype, data)
        except (UnicodeError, EOFError, struct.error):
            with pytest.raises((UnicodeError, Damage)):
                decode_value(vtype, data)
            continue
        assert decode_value(vtype, data) == expected, (vtype, data)


def test_names_decode_as_dissect_regf_decodes_them():
    from dissect.regf.regf import decode_name as dissect_name

    from vhdtool.registry.records import decode_name

    rnd = random.Random(3)
    pieces = [b"a", b"\xe9", b"\xc3\xa9", b"\0", b"\0\xd8", b"\x41\x00", b"\xff"]
    for _ in range(3000):
        raw = b"".join(rnd.choice(pieces) for _ in range(rnd.randint(1, 8)))
        for compressed in (True, False):
            assert decode_name(raw, compressed) == dissect_name(raw, len(raw), compressed), (raw, compressed)
