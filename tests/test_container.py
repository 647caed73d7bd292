"""Container layer: VHDX and VHD read exactly as qemu-img and libvhdi read them."""

from __future__ import annotations

import hashlib
import os
import struct
import uuid
from pathlib import Path

import pyvhdi
import pytest

import vhdx_craft as vc
from conftest import assert_one_line_error
from vhdtool import open_disk
from vhdtool.errors import CorruptImage, MissingParent, NotADiskImage, UnsupportedImage, VhdtoolError

MiB = 1024 * 1024


def sha_disk(path) -> str:
    h = hashlib.sha256()
    with open_disk(path) as d:
        while chunk := d.read(3 * MiB + 17):  # odd size: crosses block edges
            h.update(chunk)
    return h.hexdigest()


def read_all(path) -> bytes:
    with open_disk(path) as d:
        return d.read()


def pyvhdi_bytes(path: Path, parent: Path | None = None) -> bytes:
    f = pyvhdi.file()
    f.open(str(path))
    keep = []
    if parent is not None:
        p = pyvhdi.file()
        p.open(str(parent))
        f.set_parent(p)
        keep.append(p)
    return f.read_buffer_at_offset(f.get_media_size(), 0)


REAL_IMAGES = {
    # name: (format, qemu format, size, block_size, logical, physical)
    "vhdx/fixed.vhdx.gz": ("vhdx", "vhdx", 10 * MiB, 2 * MiB, 512, 4096),
    "vhdx/dynamic.vhdx.gz": ("vhdx", "vhdx", 10 * MiB, 32 * MiB, 512, 4096),
    "vhdx/iotest-dynamic-1G.vhdx.bz2": ("vhdx", "vhdx", 1024 * MiB, 32 * MiB, 512, 4096),
    "vhd/fixed.vhd.gz": ("vhd", "vpc", 10 * MiB, None, 512, 512),
    "vhd/dynamic.vhd.gz": ("vhd", "vpc", 10 * MiB, 2 * MiB, 512, 512),
}


@pytest.mark.parametrize("name", sorted(REAL_IMAGES))
def test_real_images_read_like_qemu_and_libvhdi(name, real, tmp_path):
    fmt, qfmt, size, block, lss, pss = REAL_IMAGES[name]
    path = real(name)
    with open_disk(path) as d:
        assert (d.format, d.size, d.block_size, d.logical_sector_size, d.physical_sector_size) == (fmt, size, block, lss, pss)
        assert d.parent is None
    ours = sha_disk(path)
    qemu = hashlib.sha256(vc.qemu_raw(path, tmp_path / "q.raw", qfmt)).hexdigest()
    assert ours == qemu
    assert hashlib.sha256(pyvhdi_bytes(path)[:size]).hexdigest() == ours


def test_real_fixed_vhdx_is_the_sample_of_the_provenance(real):
    # Digest of the decompressed file, given with the sample's provenance (made by Windows 10).
    digest = hashlib.sha256(real("vhdx/fixed.vhdx.gz").read_bytes()).hexdigest()
    assert digest == "f2d743755f1872335fb1554116feecda67825719080ebb875b97dfacf7c1f590"


def test_real_hyperv_iotest_content(real):
    with open_disk(real("vhdx/iotest-dynamic-1G.vhdx.bz2")) as d:
        for offset, byte in ((0, 0xA5), (33 * MiB - 512, 0xA5), (33 * MiB, 0x96), (66 * MiB - 512, 0x96), (66 * MiB, 0), (1023 * MiB, 0)):
            d.seek(offset)
            assert d.read(512) == bytes([byte]) * 512, offset


def test_stream_interface(real):
    with open_disk(real("vhdx/dynamic.vhdx.gz")) as d:
        assert d.readable() and d.seekable() and not d.writable()
        d.seek(0, os.SEEK_END)
        assert d.tell() == d.size and d.read(10) == b""
        d.seek(-512, os.SEEK_END)
        buf = bytearray(1024)
        assert d.readinto(buf) == 512
        d.seek(510)
        assert d.read(2) == b"\x55\xaa"  # MBR signature of the Windows-made disk
    assert d.closed


@pytest.fixture
def made(tmp_path):
    """(raw bytes, path) of a qemu-img-made dynamic VHDX with patterned content."""
    raw = vc.patterned_raw(tmp_path / "src.raw", 40 * MiB)

    def make(name="disk.vhdx", *opts):
        return raw, vc.qemu_vhdx(tmp_path / "src.raw", tmp_path / name, *opts)

    return make


@pytest.mark.parametrize(
    "opts",
    [("subformat=dynamic",), ("subformat=dynamic", "block_size=1M"), ("subformat=fixed",), ("subformat=dynamic", "block_size=256M"), ("subformat=dynamic", "log_size=4M")],
)
def test_qemu_made_vhdx(made, opts):
    raw, path = made("d.vhdx", *opts)
    assert read_all(path) == raw


@pytest.mark.parametrize("sub", ["dynamic", "fixed"])
def test_qemu_made_vhd(tmp_path, sub):
    raw = vc.patterned_raw(tmp_path / "src.raw", 30 * MiB)
    out = tmp_path / "d.vhd"
    import subprocess

    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", f"subformat={sub},force_size=on", str(tmp_path / "src.raw"), str(out)], check=True)
    with open_disk(out) as d:
        assert d.format == "vhd"
        data = d.read()
    assert data == vc.qemu_raw(out, tmp_path / "q.raw", "vpc")
    assert data == raw


# -- headers and region tables -------------------------------------------------------------
def damage(path: Path, offset: int, data: bytes = b"\xff\xff\xff\xff") -> None:
    buf = bytearray(path.read_bytes())
    buf[offset : offset + len(data)] = data
    path.write_bytes(bytes(buf))


def test_one_header_corrupt_falls_back(made):
    raw, path = made()
    buf = path.read_bytes()
    slot = vc.current_slot(buf)
    damage(path, vc.HEADER_OFFSETS[slot - 1] + 100)
    with open_disk(path) as d:
        assert d.read() == raw
        assert any("header" in w for w in d.warnings)


def test_both_headers_corrupt_is_an_error(made, cli):
    _, path = made()
    for off in vc.HEADER_OFFSETS:
        damage(path, off + 100)
    with pytest.raises(CorruptImage, match="both VHDX headers"):
        read_all(path)
    assert_one_line_error(*cli("inspect", path), path)


def test_equal_sequence_numbers_are_legal(made):
    raw, path = made()
    buf = bytearray(path.read_bytes())
    seq = vc.read_header(buf, 1)["seq"]
    vc.write_header(buf, 2, seq=seq)
    path.write_bytes(bytes(buf))
    assert vc.read_header(path.read_bytes(), 2)["seq"] == vc.read_header(path.read_bytes(), 1)["seq"]
    assert read_all(path) == raw


def test_header_with_unknown_version_is_not_used(made):
    raw, path = made()
    buf = bytearray(path.read_bytes())
    slot = vc.current_slot(buf)
    vc.write_header(buf, slot, version=2)  # checksum valid, version not
    path.write_bytes(bytes(buf))
    with open_disk(path) as d:
        assert d.read() == raw
        assert any("version" in w for w in d.warnings)


def test_first_region_table_corrupt_uses_second(made):
    raw, path = made()
    damage(path, vc.REGION_OFFSETS[0] + 40)
    with open_disk(path) as d:
        assert d.read() == raw
        assert any("region table 2" in w for w in d.warnings)


def test_both_region_tables_corrupt(made):
    _, path = made()
    for off in vc.REGION_OFFSETS:
        damage(path, off + 40)
    with pytest.raises(CorruptImage, match="region tables"):
        read_all(path)


def test_unknown_required_region_is_refused(made):
    _, path = made()
    buf = bytearray(path.read_bytes())
    for table in (1, 2):
        off = vc.REGION_OFFSETS[table - 1]
        count, = struct.unpack_from("<I", buf, off + 8)
        e = off + 16 + 32 * count
        buf[e : e + 16] = uuid.uuid4().bytes_le
        struct.pack_into("<QII", buf, e + 16, 64 * MiB, MiB, 1)
        struct.pack_into("<I", buf, off + 8, count + 1)
        vc.reseal_region_table(buf, table)
    path.write_bytes(bytes(buf))
    with pytest.raises(UnsupportedImage, match="unknown required region"):
        read_all(path)


# -- metadata -------------------------------------------------------------------------------
def patch_item(path: Path, item: uuid.UUID, fmt: str, value: int) -> None:
    buf = bytearray(path.read_bytes())
    _, off, _ = vc.metadata_items(buf)[item]
    struct.pack_into(fmt, buf, off, value)
    path.write_bytes(bytes(buf))


@pytest.mark.parametrize("block_size", [3 * MiB, 512 * 1024, 512 * MiB, 0])
def test_forbidden_block_size(made, block_size, cli):
    _, path = made()
    patch_item(path, vc.FILE_PARAMETERS, "<I", block_size)
    with pytest.raises(CorruptImage, match="block size"):
        read_all(path)
    assert_one_line_error(*cli("inspect", path), path)


@pytest.mark.parametrize("item,value", [(vc.LOGICAL_SECTOR, 1024), (vc.PHYSICAL_SECTOR, 520), (vc.LOGICAL_SECTOR, 0)])
def test_forbidden_sector_size(made, item, value):
    _, path = made()
    patch_item(path, item, "<I", value)
    with pytest.raises(CorruptImage, match="sector size"):
        read_all(path)


def test_unknown_required_metadata_item(made):
    _, path = made()
    buf = bytearray(path.read_bytes())
    entry, _, _ = vc.metadata_items(buf)[vc.VIRTUAL_DISK_ID]
    buf[entry : entry + 16] = uuid.uuid4().bytes_le  # keeps IsRequired
    path.write_bytes(bytes(buf))
    with pytest.raises(UnsupportedImage, match="unknown required metadata"):
        read_all(path)


def test_virtual_size_not_sector_multiple(made):
    _, path = made()
    patch_item(path, vc.VIRTUAL_DISK_SIZE, "<Q", 40 * MiB + 100)
    with pytest.raises(CorruptImage, match="virtual disk size"):
        read_all(path)


# -- BAT and truncation ----------------------------------------------------------------------
def test_bat_entry_beyond_end_of_file(made, cli):
    _, path = made("d.vhdx", "subformat=dynamic", "block_size=1M")
    buf = bytearray(path.read_bytes())
    vc.set_bat_entry(buf, 0, 6, 64 * 1024 * MiB)
    path.write_bytes(bytes(buf))
    with pytest.raises(CorruptImage, match="beyond the end"):
        read_all(path)
    assert_one_line_error(*cli("inspect", path), path)


def test_partially_present_without_parent(made):
    _, path = made("d.vhdx", "subformat=dynamic", "block_size=1M")
    buf = bytearray(path.read_bytes())
    state, off = vc.bat_entry(buf, 0)
    vc.set_bat_entry(buf, 0, 7, off)
    path.write_bytes(bytes(buf))
    with pytest.raises(CorruptImage, match="partially present"):
        read_all(path)


@pytest.mark.parametrize("where", ["header", "bat", "payload"])
def test_truncated(made, where, cli):
    _, path = made("d.vhdx", "subformat=dynamic", "block_size=1M")
    buf = path.read_bytes()
    if where == "header":
        cut = 100 * 1024
    elif where == "bat":
        cut = vc.regions(buf)[vc.BAT_GUID][0] + 16
    else:
        _, off = vc.bat_entry(buf, 0)
        cut = off + 4096
    path.write_bytes(buf[:cut])
    with pytest.raises(CorruptImage, match="truncated|beyond"):
        read_all(path)
    assert_one_line_error(*cli("inspect", path), path)


# -- log -------------------------------------------------------------------------------------
def _pending(made):
    raw, path = made("d.vhdx", "subformat=dynamic", "block_size=1M")
    buf = path.read_bytes()
    _, off = vc.bat_entry(buf, 0)
    new = bytes(range(256)) * 16
    vc.add_pending_log(path, [(off + 8192, new)], zeros=[(off + 16384, 8192)])
    expected = bytearray(raw)
    expected[8192 : 8192 + 4096] = new
    expected[16384 : 16384 + 8192] = bytes(8192)
    return path, bytes(expected)


def test_pending_log_replayed_in_memory_only(made, tmp_path):
    path, expected = _pending(made)
    before = path.read_bytes()
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    with open_disk(path) as d:
        assert d.log_replayed
        data = d.read()
    assert data == expected
    assert path.read_bytes() == before
    assert vc.mtime_ns(path) == 1_000_000_000
    # Independent judge: qemu replays the log into a copy, then converts it.
    judged = vc.copy(path, tmp_path / "judged.vhdx")
    import subprocess

    subprocess.run(["qemu-img", "check", "-r", "all", str(judged)], check=False, capture_output=True)
    assert vc.read_header(judged.read_bytes(), vc.current_slot(judged.read_bytes()))["log_guid"] == uuid.UUID(int=0)
    assert vc.qemu_raw(judged, tmp_path / "j.raw", "vhdx") == data


def test_log_entry_with_bad_checksum(made, cli):
    path, _ = _pending(made)
    buf = bytearray(path.read_bytes())
    h = vc.read_header(buf, vc.current_slot(buf))
    buf[h["log_offset"] + 4096 + 100] ^= 0xFF  # inside the data sector
    path.write_bytes(bytes(buf))
    with pytest.raises(CorruptImage, match="log"):
        read_all(path)
    code, out, err = cli("inspect", path)
    assert_one_line_error(code, out, err, path)


def test_log_guid_with_empty_log_is_corrupt(made):
    _, path = made()
    buf = bytearray(path.read_bytes())
    vc.write_header(buf, vc.current_slot(buf), log_guid=uuid.uuid4())
    path.write_bytes(bytes(buf))
    with pytest.raises(CorruptImage, match="log"):
        read_all(path)


def test_log_entries_of_another_log_guid_are_ignored(made):
    raw, path = made("d.vhdx", "subformat=dynamic", "block_size=1M")
    buf = bytearray(path.read_bytes())
    _, off = vc.bat_entry(buf, 0)
    h = vc.read_header(buf, vc.current_slot(buf))
    stale = vc.log_entry(3, uuid.uuid4(), [(off, b"\x11" * 4096)], [], 0, len(buf), len(buf))
    buf[h["log_offset"] : h["log_offset"] + len(stale)] = stale
    path.write_bytes(bytes(buf))  # LogGuid stays zero: nothing to replay
    assert read_all(path) == raw


# -- differencing -----------------------------------------------------------------------------
def _diff_setup(made, tmp_path, **kw):
    raw, parent = made("parent.vhdx", "subformat=dynamic", "block_size=2M")
    sectors = {1: b"\x01" * 512, 2: b"\x02" * 512, 4100: b"\x03" * 512, 4101: b"\x04" * 512, 9000: b"\x05" * 512}
    child = tmp_path / "child.avhdx"
    vc.make_differencing(parent, child, sectors, full_block=10, **kw)
    expected = bytearray(raw)
    for lba, data in sectors.items():
        expected[lba * 512 : lba * 512 + 512] = data
    expected[10 * 2 * MiB : 11 * 2 * MiB] = b"\x5a" * (2 * MiB)
    return parent, child, bytes(expected)


def test_differencing_disk(made, tmp_path):
    parent, child, expected = _diff_setup(made, tmp_path)
    with open_disk(child) as d:
        assert d.parent is not None and d.parent.path == str(parent)
        data = d.read()
    assert data == expected
    assert pyvhdi_bytes(child, parent)[: len(expected)] == expected


def test_differencing_missing_parent(made, tmp_path, cli):
    parent, child, _ = _diff_setup(made, tmp_path)
    parent.unlink()
    with pytest.raises(MissingParent, match="parent.vhdx"):
        read_all(child)
    code, out, err = cli("inspect", child)
    assert_one_line_error(code, out, err, child)
    assert "parent.vhdx" in err


def test_differencing_linkage_mismatch(made, tmp_path):
    _, child, _ = _diff_setup(made, tmp_path, linkage=uuid.uuid4())
    with pytest.raises(CorruptImage, match="DataWriteGuid"):
        read_all(child)


# -- not images ---------------------------------------------------------------------------------
def test_not_images(tmp_path, cli):
    import zipfile

    cases = {}
    cases["missing"] = tmp_path / "nope.vhdx"
    cases["directory"] = tmp_path
    (tmp_path / "empty.vhdx").write_bytes(b"")
    cases["empty"] = tmp_path / "empty.vhdx"
    (tmp_path / "random.vhdx").write_bytes(os.urandom(3 * MiB))
    cases["random"] = tmp_path / "random.vhdx"
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as z:
        z.writestr("x.txt", "hello" * 1000)
    cases["zip"] = tmp_path / "a.zip"
    for name, path in cases.items():
        with pytest.raises(VhdtoolError):
            read_all(path)
        assert_one_line_error(*cli("inspect", path), path)


# -- differencing VHD -----------------------------------------------------------------------------
def _vhd_diff(tmp_path, parent_id=None):
    import subprocess

    import vhd_craft

    raw = vc.patterned_raw(tmp_path / "src.raw", 12 * MiB)
    parent = tmp_path / "parent.vhd"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "subformat=dynamic,force_size=on", str(tmp_path / "src.raw"), str(parent)], check=True)
    sectors = {0: b"\x10" * 512, 7: b"\x11" * 512, 5000: b"\x12" * 512}
    child = tmp_path / "child.vhd"
    vhd_craft.make_differencing_vhd(parent, child, sectors, parent_id=parent_id)
    expected = bytearray(raw)
    for lba, data in sectors.items():
        expected[lba * 512 : lba * 512 + 512] = data
    return parent, child, bytes(expected)


def test_differencing_vhd(tmp_path):
    parent, child, expected = _vhd_diff(tmp_path)
    with open_disk(child) as d:
        assert d.format == "vhd" and d.parent is not None and d.parent.path == str(parent)
        assert d.read() == expected


def test_differencing_vhd_missing_parent(tmp_path, cli):
    parent, child, _ = _vhd_diff(tmp_path)
    parent.unlink()
    with pytest.raises(MissingParent, match="parent.vhd"):
        read_all(child)
    assert_one_line_error(*cli("inspect", child), child)


def test_differencing_vhd_wrong_parent(tmp_path):
    _, child, _ = _vhd_diff(tmp_path, parent_id=uuid.uuid4().bytes)
    with pytest.raises(CorruptImage, match="identifier"):
        read_all(child)


# -- the chain: loops and depth ----------------------------------------------------------------
def test_differencing_chain_that_names_itself(made, tmp_path, cli):
    _, parent = made("parent.vhdx", "subformat=dynamic", "block_size=2M")
    child = tmp_path / "child.avhdx"
    vc.make_differencing(parent, child, {1: b"\x01" * 512}, relative_path=".\\child.avhdx")
    with pytest.raises(CorruptImage, match="loops"):
        read_all(child)
    assert_one_line_error(*cli("inspect", child), child)


def test_differencing_chain_depth_limit(made, tmp_path):
    from vhdtool.container.chain import MAX_PARENT_DEPTH

    raw, disk = made("base.vhdx", "subformat=dynamic", "block_size=2M")
    chain = [disk]
    for i in range(MAX_PARENT_DEPTH + 1):
        child = tmp_path / f"d{i:02d}.avhdx"
        vc.make_differencing(chain[-1], child, {i: bytes([i + 1]) * 512}, relative_path=f".\\{chain[-1].name}")
        chain.append(child)
    # A chain of exactly MAX_PARENT_DEPTH parents opens, and reads every link's sector.
    with open_disk(chain[-2]) as d:
        assert len(list(d.chain())) == MAX_PARENT_DEPTH + 1
        data = d.read(MAX_PARENT_DEPTH * 512)
    assert all(data[i * 512 : i * 512 + 512] == bytes([i + 1]) * 512 for i in range(MAX_PARENT_DEPTH))
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(UnsupportedImage, match=f"deeper than {MAX_PARENT_DEPTH}"):
        read_all(chain[-1])
    # Every disk the failed open had opened is closed again.
    assert len(os.listdir("/proc/self/fd")) == fds
