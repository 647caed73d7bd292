"""The VHD writer: changes committed through a copy renamed over the image, judged by independent readers.

Images: fixed and dynamic VHDs made by qemu-img, the real Windows-made VHDs of
fixtures/real/vhd, and differencing VHDs made by tests/vhd_craft.py. After every
commit the image is judged by qemu-img (raw conversion, `qemu-img compare`),
libvhdi (pyvhdi), a reader written here from the VHD specification (it honours
the sector bitmaps, which qemu and libvhdi ignore for dynamic disks), and
vhdtool's own reader, all of which must read exactly the expected bytes; and its
layout is checked against the specification (footer and its copy, header, BAT,
block placement, zeros behind clear bitmap bits).

qemu's vpc driver ignores a differencing disk's parent (it reads what the child
holds, zeros elsewhere) and libvhdi misreads sector bitmap bytes that are not all
ones or all zeros (see vhdtool/container/vhd/reader.py), so differencing disks are judged
by the specification reader, by qemu's view of the child alone (which must be
the old view with exactly the committed sectors changed), and by libvhdi where
the changes cover whole bitmap bytes.

The crash tests kill a real writing process (tests/vhd_write_job.py) with SIGKILL
at each state-changing system call of the commit (strace's syscall fault
injection) and at random times inside it; the image must then read as exactly
the old or exactly the new content, and the next commit removes any temp file the
killed one left.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import held_by_qemu
from conftest import SWEEPS, sweep_count, sweep_points

import vhd_craft
import vhdx_craft as vc
from test_container import pyvhdi_bytes
from vhdtool import open_disk
from vhdtool.container.commit import commit as commit_any
from vhdtool.container.overlay import Overlay
from vhdtool.container.vhd.writer import commit, plan_commit
from vhdtool.errors import CorruptImage, ImageInUse, UnsupportedImage, VhdtoolError, WriteFailed

MiB = 1024 * 1024
GiB = 1024 * MiB
ROOT = Path(__file__).resolve().parent.parent
JOB = Path(__file__).resolve().parent / "vhd_write_job.py"
SIZE = 8 * MiB
BLOCK = 2 * MiB
TEMP = re.compile(r"\..+\.vhdtool-[0-9a-f]{16}\.tmp")


# -- images -------------------------------------------------------------------------------------

def qemu_vpc(raw: Path, out: Path, subformat: str) -> Path:
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", f"subformat={subformat},force_size=on",
                    str(raw), str(out)], check=True)
    return out


def make(kind: str, tmp: Path, real=None, name: str = "d.vhd") -> tuple[bytes, Path, Path | None]:
    """(content, image, parent) of a fresh image of ``kind`` in ``tmp``."""
    tmp.mkdir(parents=True, exist_ok=True)
    if kind.startswith("real-"):
        src = real(f"vhd/{kind[5:]}.vhd.gz")
        path = tmp / name
        shutil.copyfile(src, path)
        with open_disk(path) as d:
            return d.read(), path, None
    raw = vc.patterned_raw(tmp / "src.raw", SIZE, seed=9)
    if kind in ("fixed", "dynamic"):
        return raw, qemu_vpc(tmp / "src.raw", tmp / name, kind), None
    assert kind == "differencing"
    parent = qemu_vpc(tmp / "src.raw", tmp / "parent.vhd", "dynamic")
    # The child's own sectors: a partial bitmap byte (sectors 0 and 7), and a run of whole bytes.
    own = {0: b"\x10" * 512, 7: b"\x11" * 512, **{s: bytes([s & 0xFF]) * 512 for s in range(5000, 5016)}}
    child = tmp / name
    vhd_craft.make_differencing_vhd(parent, child, own)
    content = bytearray(raw)
    for lba, data in own.items():
        content[lba * 512 : lba * 512 + 512] = data
    return bytes(content), child, parent


def apply(raw: bytes, writes) -> bytes:
    buf = bytearray(raw)
    for offset, data in writes:
        buf[offset : offset + len(data)] = data
    return bytes(buf)


def random_writes(seed: int, size: int, count: int = 20, unit: int = 512) -> list[tuple[int, bytes]]:
    """Writes of 1 to 700 units: into holes, into allocated data, across block edges."""
    rnd = random.Random(seed)
    out = []
    for _ in range(count):
        n = rnd.choice([1, 1, 3, 8, 64, 700])
        out.append((rnd.randrange(0, size // unit - n) * unit, rnd.randbytes(n * unit)))
    for edge in (BLOCK, 2 * BLOCK, size - BLOCK):  # straddling block edges, one of them a hole's
        out.append((edge - 2 * unit, rnd.randbytes(5 * unit)))
    return out


def changes_of(path: Path, writes):
    with open_disk(path) as disk:
        overlay = Overlay(disk)
        for offset, data in writes:
            overlay.write_at(offset, data)
        return overlay.changes()


def write_and_commit(path: Path, writes, **kw):
    with open_disk(path) as disk:
        overlay = Overlay(disk)
        for offset, data in writes:
            overlay.write_at(offset, data)
        return commit(disk, overlay.changes(), **kw)


def temps(folder: Path, name: str | None = None) -> list[str]:
    return sorted(e for e in os.listdir(folder) if TEMP.fullmatch(e) and (name is None or e.startswith(f".{name}.")))


# -- independent judges -------------------------------------------------------------------------

def ours(path: Path) -> bytes:
    with open_disk(path) as d:
        return d.read()


def qemu_bytes(path: Path) -> bytes:
    out = path.with_name(f"{path.name}.{uuid.uuid4().hex}.raw")
    try:
        return vc.qemu_raw(path, out, "vpc")
    finally:
        out.unlink(missing_ok=True)


def qemu_compare(path: Path, expected: bytes) -> None:
    raw = path.with_name(f"{path.name}.{uuid.uuid4().hex}.expected")
    raw.write_bytes(expected)
    try:
        res = subprocess.run(["qemu-img", "compare", "-f", "vpc", "-F", "raw", str(path), str(raw)],
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr
    finally:
        raw.unlink()


def footer_sum(f: bytes) -> int:
    return ~(sum(f[:64]) + sum(f[68:])) & 0xFFFFFFFF


def header_sum(h: bytes) -> int:
    return ~(sum(h[:36]) + sum(h[40:])) & 0xFFFFFFFF


def spec_read(path: Path, parent: bytes | None = None) -> bytes:
    """The virtual disk as the VHD specification defines it, read here without vhdtool or a library."""
    buf = path.read_bytes()
    footer = buf[-512:]
    assert footer[:8] == b"conectix" and struct.unpack_from(">I", footer, 64)[0] == footer_sum(footer)
    (size,) = struct.unpack_from(">Q", footer, 48)
    (disk_type,) = struct.unpack_from(">I", footer, 60)
    if disk_type == 2:
        return buf[:size]
    (data_offset,) = struct.unpack_from(">Q", footer, 16)
    header = buf[data_offset : data_offset + 1024]
    assert header[:8] == b"cxsparse" and struct.unpack_from(">I", header, 36)[0] == header_sum(header)
    table, _, entries, bs = struct.unpack_from(">QIII", header, 16)
    bitmap_bytes = -(-(bs // 512 // 8) // 512) * 512
    out = bytearray(size)
    for block in range(-(-size // bs)):
        lo = block * bs
        n = min(bs, size - lo)
        (sector,) = struct.unpack_from(">I", buf, table + 4 * block)
        if sector == 0xFFFFFFFF:
            if parent is not None:
                out[lo : lo + n] = parent[lo : lo + n]
            continue
        start = sector * 512
        bitmap = buf[start : start + bitmap_bytes]
        data = buf[start + bitmap_bytes : start + bitmap_bytes + bs]
        if bitmap[: n // 512 // 8] == b"\xff" * (n // 512 // 8) and n % 4096 == 0:
            out[lo : lo + n] = data[:n]  # every sector here
            continue
        for s in range(n // 512):
            here = slice(lo + s * 512, lo + s * 512 + 512)
            if bitmap[s // 8] & (0x80 >> (s % 8)):  # most significant bit first
                out[here] = data[s * 512 : s * 512 + 512]
            elif parent is not None:
                out[here] = parent[here]
            # else: a dynamic disk's never-written sector reads as zeros
    return bytes(out)


def check_layout(path: Path, old: bytes) -> None:
    """The new file against the old one and the specification: what may change, and where new blocks go."""
    buf = path.read_bytes()
    old_footer = old[-512:]
    footer = buf[-512:]
    # The footer moves to the new end with a new Unique Id (a child elsewhere no longer opens over
    # the changed disk), every other field as it was.
    assert footer[:64] == old_footer[:64] and footer[84:] == old_footer[84:], "only the Unique Id changes"
    assert footer[68:84] != old_footer[68:84], "the Unique Id changes"
    assert struct.unpack_from(">I", footer, 64)[0] == footer_sum(footer)
    (disk_type,) = struct.unpack_from(">I", footer, 60)
    if disk_type == 2:
        assert len(buf) == len(old)
        return
    assert buf[:512] == footer, "the footer copy at offset 0 is the new footer"
    (data_offset,) = struct.unpack_from(">Q", footer, 16)
    header = buf[data_offset : data_offset + 1024]
    assert header == old[data_offset : data_offset + 1024], "the dynamic header is unchanged"
    table, _, entries, bs = struct.unpack_from(">QIII", header, 16)
    bitmap_bytes = -(-(bs // 512 // 8) // 512) * 512
    span = bitmap_bytes + bs
    old_bat = struct.unpack_from(f">{entries}I", old, table)
    bat = struct.unpack_from(f">{entries}I", buf, table)
    starts = []
    for i, (was, now) in enumerate(zip(old_bat, bat)):
        if was != 0xFFFFFFFF:
            assert now == was, f"BAT entry {i} of an allocated block changed"
        if now == 0xFFFFFFFF:
            continue
        start = now * 512
        starts.append(start)
        if was == 0xFFFFFFFF:
            assert start >= len(old) - 512, "a new block lies where the footer was, or after it"
            assert (start + bitmap_bytes) % 4096 == 0, "a new block's data starts on a 4 KiB boundary"
        bitmap = buf[start : start + bitmap_bytes]
        for s in range(bs // 512):
            if not bitmap[s // 8] & (0x80 >> (s % 8)):
                sector = buf[start + bitmap_bytes + s * 512 : start + bitmap_bytes + s * 512 + 512]
                assert sector == bytes(512), f"block {i} sector {s}: a clear bit must have zeros on disk"
    starts.sort()
    assert all(b - a >= span for a, b in zip(starts, starts[1:])), "blocks overlap"
    assert starts[-1] + span <= len(buf) - 512
    if any(o == 0xFFFFFFFF and n != 0xFFFFFFFF for o, n in zip(old_bat, bat)):
        assert len(buf) == starts[-1] + span + 512, "the footer follows the last new block"
        assert buf[len(old) - 512 : len(old)] != old_footer, "the old footer's place is a bitmap or zeros now"
    else:
        assert len(buf) == len(old)


def judge(path: Path, expected: bytes, parent: Path | None = None, qemu_view: bytes | None = None) -> None:
    """Every reader reads ``expected``; for a differencing disk qemu reads ``qemu_view`` (the child alone)."""
    assert ours(path) == expected
    if parent is None:
        assert qemu_bytes(path) == expected
        qemu_compare(path, expected)
        assert pyvhdi_bytes(path)[: len(expected)] == expected
        assert spec_read(path) == expected
    else:
        assert spec_read(path, ours(parent)) == expected
        if qemu_view is not None:
            assert qemu_bytes(path) == qemu_view


KINDS = ["fixed", "dynamic", "real-fixed", "real-dynamic", "differencing"]


@pytest.mark.parametrize("kind", KINDS)
def test_commit_random_writes(kind, tmp_path, real):
    old, path, parent = make(kind, tmp_path, real)
    before = path.read_bytes()
    parent_before = parent.read_bytes() if parent else None
    qemu_before = qemu_bytes(path) if parent else None
    writes = random_writes(sum(map(ord, kind)), len(old))
    changes = changes_of(path, writes)
    result = write_and_commit(path, writes)
    assert result is not None and result.flushes == 2
    new = apply(old, writes)
    judge(path, new, parent, apply(qemu_before, [(c.offset, c.data) for c in changes]) if parent else None)
    check_layout(path, before)
    assert temps(tmp_path) == []
    if parent is not None:
        assert parent.read_bytes() == parent_before
    # The same change again is no change: nothing is written, the file is the same file, byte-identical.
    after = path.read_bytes()
    ino = path.stat().st_ino
    assert write_and_commit(path, writes) is None
    assert path.read_bytes() == after and path.stat().st_ino == ino and temps(tmp_path) == []


def test_commit_through_the_format_dispatch(tmp_path):
    """vhdtool.container.commit hands a VHD to the VHD writer: the image is replaced by its changed copy."""
    old, path, _ = make("dynamic", tmp_path)
    ino = path.stat().st_ino
    writes = [(5 * MiB, b"\x42" * 4096)]
    with open_disk(path) as disk:
        overlay = Overlay(disk)
        overlay.write_at(*writes[0])
        result = commit_any(disk, overlay.changes())
    # Only the VHD writer renames a copy over the image (a new inode), flushing the copy and then its folder;
    # the VHDX writer writes in place, through its log.
    assert result is not None and result.flushes == 2
    assert path.stat().st_ino != ino and temps(tmp_path) == []
    judge(path, apply(old, writes))


def test_commit_with_the_callers_lock(tmp_path):
    """The editor session locks the image before it opens it and hands that lock to the commit."""
    from vhdtool.container.writefile import WritableFile

    old, path, _ = make("dynamic", tmp_path)
    writes = [(5 * MiB, b"\x42" * 4096)]
    lock = WritableFile(str(path))
    try:
        with open_disk(path) as disk:
            overlay = Overlay(disk)
            overlay.write_at(*writes[0])
            assert commit(disk, overlay.changes(), lock) is not None
        assert not lock.closed  # still the caller's to close
    finally:
        lock.close()
    judge(path, apply(old, writes))


def test_new_block_holds_the_written_sectors_and_their_bits(tmp_path):
    old, path, _ = make("dynamic", tmp_path)
    before = path.read_bytes()
    hole = 2 * BLOCK  # 4-6 MiB of the patterned content is a hole
    assert old[hole : hole + BLOCK] == bytes(BLOCK)
    writes = [(hole + 3 * 512, b"\x01" * 1536), (hole + 100 * 512, b"\x02" * 512), (hole + BLOCK - 512, b"\x03" * 512)]
    with open_disk(path) as disk:
        overlay = Overlay(disk)
        for w in writes:
            overlay.write_at(*w)
        plan = plan_commit(disk, overlay.changes())
        assert plan.new_blocks == 1 and plan.cut_at == len(before) - 512
        commit(disk, overlay.changes())
    buf = path.read_bytes()
    table = struct.unpack_from(">Q", buf, 512 + 16)[0]
    (sector,) = struct.unpack_from(">I", buf, table + 4 * 2)
    start = sector * 512
    assert start >= len(before) - 512 and (start + 512) % 4096 == 0
    bitmap = buf[start : start + 512]
    bits = {s for s in range(4096) if bitmap[s // 8] & (0x80 >> (s % 8))}
    assert bits == {3, 4, 5, 100, 4095}  # the spec: set for sectors holding data, clear for never-written ones
    assert len(buf) == start + 512 + BLOCK + 512
    judge(path, apply(old, writes))
    check_layout(path, before)


def test_differencing_child_keeps_reading_the_parent(tmp_path):
    """Whole bitmap bytes (8-sector units) so that libvhdi, too, can judge the chain."""
    tmp_path.mkdir(exist_ok=True)
    raw = vc.patterned_raw(tmp_path / "src.raw", SIZE, seed=4)
    parent = qemu_vpc(tmp_path / "src.raw", tmp_path / "parent.vhd", "dynamic")
    child = tmp_path / "child.vhd"
    own = {s: bytes([s & 0xFF]) * 512 for s in range(4096 + 64, 4096 + 80)}
    vhd_craft.make_differencing_vhd(parent, child, own)
    old = apply(raw, [(s * 512, d) for s, d in own.items()])
    parent_before = parent.read_bytes()
    # A new block (sectors 16-23 of block 0), the child's own block next to its sectors, across an edge.
    writes = [(16 * 512, b"\x21" * 4096), ((4096 + 88) * 512, b"\x22" * 4096), (3 * BLOCK - 4096, b"\x23" * 8192)]
    qemu_before = qemu_bytes(child)
    changes = changes_of(child, writes)
    write_and_commit(child, writes)
    new = apply(old, writes)
    judge(child, new, parent, apply(qemu_before, [(c.offset, c.data) for c in changes]))
    assert pyvhdi_bytes(child, parent)[: len(new)] == new
    assert parent.read_bytes() == parent_before
    # Block 0's bitmap holds exactly the written sectors: everything else still comes from the parent.
    buf = child.read_bytes()
    table = struct.unpack_from(">Q", buf, 512 + 16)[0]
    start = struct.unpack_from(">I", buf, table)[0] * 512
    assert buf[start : start + 512] == b"\x00\x00\xff" + bytes(509)


def test_writing_back_what_is_there_is_no_change(tmp_path):
    old, path, _ = make("dynamic", tmp_path)
    st = path.stat()
    with open_disk(path) as disk:
        overlay = Overlay(disk)
        overlay.write_at(MiB, old[MiB : 2 * MiB])
        overlay.write_at(2 * BLOCK, bytes(8192))  # zeros into a hole
        assert overlay.touched and overlay.changes() == []
        assert commit(disk, overlay.changes()) is None
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (st.st_ino, st.st_mtime_ns, st.st_size)
    assert temps(tmp_path) == []


def test_reader_of_the_old_file_keeps_reading_it(tmp_path):
    old, path, _ = make("fixed", tmp_path)
    ino = path.stat().st_ino
    writes = [(0, b"\x55" * 4096), (7 * MiB, b"\x66" * MiB)]
    with open_disk(path) as earlier:
        assert earlier.read_at(0, 4096) == old[:4096]
        write_and_commit(path, writes)
        # The old inode was never written: a process that had it open still reads the old content.
        assert earlier.read_at(0, SIZE) == old
    assert path.stat().st_ino != ino
    judge(path, apply(old, writes))


def test_owner_mode_and_symlink_are_kept(tmp_path):
    old, path, _ = make("dynamic", tmp_path / "store")
    os.chmod(path, 0o640)
    if os.geteuid() == 0:
        os.chown(path, 1234, 2345)
    link = tmp_path / "link.vhd"
    link.symlink_to(path)
    write_and_commit(link, [(0, b"\x77" * 512)])
    assert link.is_symlink() and os.readlink(link) == str(path)
    st = path.stat()
    assert st.st_mode & 0o7777 == 0o640
    if os.geteuid() == 0:
        assert (st.st_uid, st.st_gid) == (1234, 2345)
    assert temps(tmp_path) == [] and temps(tmp_path / "store") == []
    judge(path, apply(old, [(0, b"\x77" * 512)]))


def test_hard_linked_image_is_refused(tmp_path):
    _, path, _ = make("dynamic", tmp_path)
    os.link(path, tmp_path / "other.vhd")
    before = path.read_bytes()
    with pytest.raises(UnsupportedImage, match="hard links"):
        write_and_commit(path, [(0, b"\x77" * 512)])
    assert path.read_bytes() == before and temps(tmp_path) == []


def test_image_held_by_another_process_is_refused(tmp_path):
    _, path, _ = make("dynamic", tmp_path)
    before = path.read_bytes()
    with held_by_qemu(path, "vpc"), pytest.raises(ImageInUse):
        write_and_commit(path, [(0, b"\x42" * 512)])
    assert path.read_bytes() == before and temps(tmp_path) == []


def test_image_changed_after_it_was_read_is_refused(tmp_path):
    _, path, _ = make("dynamic", tmp_path)
    with open_disk(path) as disk:
        overlay = Overlay(disk)
        overlay.write_at(0, b"\x42" * 512)
        # Another program replaces the file between the read and the commit.
        replacement = path.read_bytes()
        path.unlink()
        path.write_bytes(replacement)
        with pytest.raises(ImageInUse, match="replaced"):
            commit(disk, overlay.changes())
    assert path.read_bytes() == replacement and temps(tmp_path) == []


def test_stale_temps_of_a_killed_commit_are_removed(tmp_path):
    old, path, _ = make("dynamic", tmp_path)
    stale = tmp_path / ".d.vhd.vhdtool-0123456789abcdef.tmp"
    stale.write_bytes(b"half a copy")
    kept = [tmp_path / ".other.vhd.vhdtool-0123456789abcdef.tmp",  # another image's
            tmp_path / ".d.vhd.vhdtool-notours.tmp", tmp_path / "d.vhd.vhdtool-0123456789abcdef.tmp"]
    for k in kept:
        k.write_bytes(b"x")
    past = time.time() - 60
    for f in [stale, *kept]:
        os.utime(f, (past, past))
    # Never mistaken for the image: vhdtool reads the image, whatever temps lie beside it.
    assert ours(path) == old
    write_and_commit(path, [(0, b"\x42" * 512)])
    assert not stale.exists() and all(k.exists() for k in kept)
    judge(path, apply(old, [(0, b"\x42" * 512)]))


@pytest.mark.parametrize("damage", ["bat-into-header", "blocks-overlap", "block-past-footer", "header-checksum",
                                    "footer-only-at-start", "saved-state", "bat-huge-sector"])
def test_hostile_layout_is_refused_before_any_write(damage, tmp_path):
    old, path, _ = make("dynamic", tmp_path)
    buf = bytearray(path.read_bytes())
    table = struct.unpack_from(">Q", buf, 512 + 16)[0]
    if damage == "bat-into-header":
        struct.pack_into(">I", buf, table, 1)  # block 0 would start inside the dynamic header
    elif damage == "blocks-overlap":
        (b0,) = struct.unpack_from(">I", buf, table)
        struct.pack_into(">I", buf, table + 4, b0 + 8)
    elif damage == "block-past-footer":
        struct.pack_into(">I", buf, table, (len(buf) - 1024) // 512)
    elif damage == "header-checksum":
        buf[512 + 100] ^= 1
    elif damage == "footer-only-at-start":
        buf[-512:] = bytes(512)
    elif damage == "saved-state":
        for at in (0, len(buf) - 512):
            buf[at + 84] = 1
            struct.pack_into(">I", buf, at + 64, footer_sum(bytes(buf[at : at + 512])))
    elif damage == "bat-huge-sector":
        # Block 2 (a hole, not written below, so no reader looks at it) points far past the end.
        assert struct.unpack_from(">I", buf, table + 8)[0] == 0xFFFFFFFF
        struct.pack_into(">I", buf, table + 8, 0xFFFFFFF0)
    path.write_bytes(bytes(buf))
    before = path.read_bytes()
    with pytest.raises(VhdtoolError) as err:
        write_and_commit(path, [(0, b"\x42" * 512), (7 * MiB, b"\x43" * 512)])
    assert isinstance(err.value, (CorruptImage, UnsupportedImage)), err.value
    assert str(path) in err.value.message and "\n" not in err.value.message
    assert path.read_bytes() == before and temps(tmp_path) == []


@pytest.mark.parametrize("how", ["copy_file_range", "read/write"])
def test_sparse_copy_when_the_filesystem_cannot_clone(how, tmp_path, monkeypatch):
    old, path, _ = make("fixed", tmp_path)
    if how == "read/write":
        monkeypatch.delattr(os, "copy_file_range")
    writes = random_writes(7, SIZE, count=6)
    result = write_and_commit(path, writes, reflink=False)
    judge(path, apply(old, writes))
    # Only the data extents are copied: the holes of the patterned content stay holes.
    assert result.bytes_written < SIZE * 0.6
    assert path.stat().st_blocks * 512 < SIZE * 0.6


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_mostly_empty_127g_vhd_costs_what_changed(subformat, tmp_path):
    path = tmp_path / "big.vhd"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vpc", "-o", f"subformat={subformat},force_size=on", str(path),
                    "127G"], check=True)
    rnd = random.Random(3)
    # One byte value per write, so that qemu-io's pattern check can judge it.
    writes = [(rnd.randrange(0, 127 * GiB // 4096) * 4096, bytes([0x41 + i]) * MiB) for i in range(4)]
    t0 = time.monotonic()
    result = write_and_commit(path, writes)
    elapsed = time.monotonic() - t0
    st = path.stat()
    # The BAT of a dynamic disk (254 KiB) and the footer are copied, then 4 MiB of data and bitmaps written.
    assert result.bytes_written < 5 * MiB, result
    assert st.st_blocks * 512 < 6 * MiB, st.st_blocks
    assert elapsed < 10
    with open_disk(path) as d:
        for offset, data in writes:
            assert d.read_at(offset, len(data)) == data
        assert d.read_at(0, 4096) == bytes(4096)
    import pyvhdi

    f = pyvhdi.file()
    f.open(str(path))
    try:
        for offset, data in writes:
            assert f.read_buffer_at_offset(len(data), offset) == data
    finally:
        f.close()
    for offset, data in writes:
        res = subprocess.run(["qemu-io", "-f", "vpc", "-r", "-c", f"read -P {data[0]} {offset} {len(data)}",
                              "-c", f"read -P 0 {offset + len(data)} 4096", str(path)], capture_output=True, text=True)
        assert res.returncode == 0 and "verification failed" not in res.stdout, res.stdout + res.stderr


def _can_reflink(folder: Path) -> bool:
    a, b = folder / "reflink-probe-a", folder / "reflink-probe-b"
    a.write_bytes(b"x" * 4096)
    try:
        with open(a, "rb") as fa, open(b, "wb") as fb:
            fcntl.ioctl(fb.fileno(), 0x40049409, fa.fileno())
        return True
    except OSError:
        return False
    finally:
        a.unlink()
        b.unlink(missing_ok=True)


def test_reflink_clone_where_the_filesystem_offers_one(tmp_path):
    folder = Path(os.environ.get("VHDTOOL_REFLINK_DIR", tmp_path))
    if not _can_reflink(folder):
        pytest.skip(f"{folder} cannot reflink (set VHDTOOL_REFLINK_DIR to a folder on XFS or btrfs)")
    work = folder / f"vhdtool-reflink-{uuid.uuid4().hex}"
    try:
        old, path, _ = make("fixed", work)
        writes = [(MiB, b"\x31" * 8192)]
        result = write_and_commit(path, writes)
        assert result.bytes_written == 8192  # nothing copied: the extents are shared
        judge(path, apply(old, writes))
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- crash safety -----------------------------------------------------------------------------------

KILL_SYSCALLS = ["openat", "fchown", "fchmod", "ioctl", "ftruncate", "copy_file_range", "pwrite64", "write", "fsync",
                 "rename", "renameat", "renameat2", "unlink", "unlinkat"]
RANDOM_KILLS = int(os.environ.get("VHDTOOL_RANDOM_KILLS", "25"))


def job_env() -> dict:
    return dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}", PYTHONDONTWRITEBYTECODE="1")


def job_writes(seed: int, size: int) -> list[tuple[int, bytes]]:
    listing = subprocess.run([sys.executable, str(JOB), "--list", str(seed), str(size)], capture_output=True, text=True,
                             check=True, env=job_env()).stdout
    return [(o, bytes.fromhex(d)) for o, d in json.loads(listing)]


def run_job(image: Path, seed: int, inject: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(JOB), str(image), str(seed)]
    if inject:
        cmd = ["strace", "-f", "-o", "/dev/null", "-e", f"inject={inject}"] + cmd
    return subprocess.run(cmd, capture_output=True, text=True, env=job_env(), timeout=120)


def commit_syscalls(image: Path, seed: int) -> tuple[dict[str, tuple[int, int]], float]:
    """For each syscall: (calls before the commit, calls in all), counted by strace on a probe copy; and the run's time."""
    trace = image.with_suffix(".trace")
    t0 = time.monotonic()
    subprocess.run(["strace", "-f", "-o", str(trace), "-e", "trace=" + ",".join(KILL_SYSCALLS), sys.executable,
                    str(JOB), str(image), str(seed)], check=True, env=job_env(), capture_output=True)
    elapsed = time.monotonic() - t0
    counts = {name: [0, 0] for name in KILL_SYSCALLS}
    started = False
    for line in trace.read_text().splitlines():
        m = re.match(r"(?:\d+\s+)?(\w+)\(", line)
        if not m or m.group(1) not in counts:
            continue
        counts[m.group(1)][1] += 1
        if not started:
            counts[m.group(1)][0] += 1
            started = '"committing' in line
    trace.unlink()
    return {k: (a, b) for k, (a, b) in counts.items()}, elapsed


def test_kill_points_lie_inside_the_commit(tmp_path):
    """The syscall counter starts at the job's "committing" line: what comes after is the commit's."""
    _, path, _ = make("dynamic", tmp_path)
    counts, _ = commit_syscalls(path, 1)
    inside = {k: b - a for k, (a, b) in counts.items() if b > a}
    assert inside["rename"] + inside.get("renameat", 0) + inside.get("renameat2", 0) == 1
    assert inside["fsync"] == 2 and inside["pwrite64"] >= 3


@pytest.mark.parametrize("sweep", SWEEPS)
@pytest.mark.parametrize("kind", ["fixed", "dynamic", "real-dynamic", "differencing"])
def test_kill_at_every_syscall_and_at_random_times(kind, sweep, tmp_path, real):
    old, original, parent = make(kind, tmp_path, real, name="orig.vhd")
    seed = sum(map(ord, kind))
    writes = job_writes(seed, len(old))
    new = apply(old, writes)
    parent_bytes = ours(parent) if parent else None
    parent_before = parent.read_bytes() if parent else None
    if parent is not None:
        changes = changes_of(original, writes)
        qemu_old = qemu_bytes(original)
        qemu_views = {qemu_old, apply(qemu_old, [(c.offset, c.data) for c in changes])}
    probe = tmp_path / "probe.vhd"
    shutil.copyfile(original, probe)
    counts, _ = commit_syscalls(probe, seed)
    assert ours(probe) == new and temps(tmp_path) == []
    points = [(name, n) for name, (before, total) in counts.items() for n in range(before + 1, total + 1)]
    assert len(points) >= 15, counts
    points = sweep_points(points, sweep)
    with open_disk(original) as d:
        assert plan_commit(d, changes_of(original, writes)).new_blocks or kind == "fixed"

    outcomes = {"old": 0, "new": 0, "temp left": 0, "random old": 0}

    def judge_killed(victim: Path, why) -> None:
        content = ours(victim)
        assert content in (old, new), why
        if parent is None:
            assert qemu_bytes(victim) == content, why
            assert pyvhdi_bytes(victim)[: len(content)] == content, why
            assert spec_read(victim) == content, why
        else:
            assert spec_read(victim, parent_bytes) == content, why
            assert qemu_bytes(victim) in qemu_views, why
            assert parent.read_bytes() == parent_before, why
        left = temps(victim.parent, victim.name)
        outcomes["old" if content == old else "new"] += 1
        outcomes["random old"] += why[0] == "random" and content == old
        outcomes["temp left"] += bool(left)
        if content == new:
            assert left == [], (why, left)  # past the rename nothing of ours is left
        else:
            # The next commit of this image removes what the killed one left, and commits.
            write_and_commit(victim, writes)
            assert spec_read(victim, parent_bytes) == new and temps(victim.parent, victim.name) == [], why
        victim.unlink()

    def by_syscall(i: int, name: str, n: int) -> None:
        victim = tmp_path / f"victim-{i}.vhd"
        shutil.copyfile(original, victim)
        res = run_job(victim, seed, f"{name}:signal=KILL:when={n}")
        assert res.returncode != 0, (name, n, res.stderr)
        judge_killed(victim, (name, n))

    # How long the commit takes, from "committing" to "committed", without strace: random kills fall inside it
    # (and a few just after).
    shutil.copyfile(original, probe)
    proc = subprocess.Popen([sys.executable, str(JOB), str(probe), str(seed)], stdout=subprocess.PIPE, env=job_env())
    assert proc.stdout.readline().strip() == b"committing"
    t0 = time.monotonic()
    assert proc.stdout.readline().strip() == b"committed"
    commit_time = time.monotonic() - t0
    proc.wait()
    proc.stdout.close()
    rnd = random.Random(seed)
    delays = [rnd.uniform(0, 1.3 * commit_time) for _ in range(sweep_count(RANDOM_KILLS, sweep))]

    def at_random(i: int, delay: float) -> None:
        victim = tmp_path / f"random-{i}.vhd"
        shutil.copyfile(original, victim)
        proc = subprocess.Popen([sys.executable, str(JOB), str(victim), str(seed)], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, env=job_env())
        assert proc.stdout.readline().strip() == b"committing"
        time.sleep(delay)
        proc.kill()
        proc.wait()
        proc.stdout.close()
        judge_killed(victim, ("random", i, delay))

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=(os.cpu_count() or 2) + 1) as pool:
        jobs = [pool.submit(by_syscall, i, name, n) for i, (name, n) in enumerate(points)]
        jobs += [pool.submit(at_random, i, d) for i, d in enumerate(delays)]
        for job in jobs:
            job.result()
    assert outcomes["old"] and outcomes["new"], outcomes
    inside = {k: b - a for k, (a, b) in counts.items() if b > a}
    print(f"\n{kind}: {len(points)} syscall kill points {inside}, {len(delays)} random kills "
          f"(commit {commit_time * 1000:.0f} ms), outcomes {outcomes}, {time.monotonic() - t0:.1f}s")


@pytest.mark.parametrize("syscall,error,whens", [
    ("pwrite64", "ENOSPC", (1, 2, 3)),
    ("copy_file_range", "ENOSPC", (1, 2)),
    ("ftruncate", "EFBIG", (1, 2)),
    ("fsync", "EIO", (1,)),
    ("rename", "EXDEV", (1,)),
])
def test_failed_syscall_leaves_the_original_untouched(syscall, error, whens, tmp_path):
    """An I/O error is never ignored: WriteFailed, one line; the original is the same file, byte-identical; no temp."""
    old, original, _ = make("dynamic", tmp_path, name="orig.vhd")
    seed = 11
    shutil.copyfile(original, tmp_path / "probe.vhd")
    counts, _ = commit_syscalls(tmp_path / "probe.vhd", seed)
    before, total = counts[syscall]
    assert total > before, counts
    victim = tmp_path / "victim.vhd"
    for when in whens:
        if before + when > total:
            continue
        shutil.copyfile(original, victim)
        st = victim.stat()
        res = run_job(victim, seed, f"{syscall}:error={error}:when={before + when}")
        assert res.returncode == WriteFailed.exit_code, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"vhdtool: {victim}: "), res.stderr
        after = victim.stat()
        assert (after.st_ino, after.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
        assert victim.read_bytes() == original.read_bytes()
        assert temps(tmp_path) == [], (syscall, when)


def test_failed_folder_flush_says_the_change_is_made(tmp_path):
    old, original, _ = make("dynamic", tmp_path, name="orig.vhd")
    seed = 11
    shutil.copyfile(original, tmp_path / "probe.vhd")
    counts, _ = commit_syscalls(tmp_path / "probe.vhd", seed)
    before, total = counts["fsync"]
    assert total - before == 2
    res = run_job(original, seed, f"fsync:error=EIO:when={before + 2}")
    assert res.returncode == WriteFailed.exit_code and "the change is made" in res.stderr, res.stderr
    assert ours(original) == apply(old, job_writes(seed, len(old))) and temps(tmp_path) == []


def test_too_little_space_for_the_copy_is_said_before_copying(tmp_path, monkeypatch):
    old, path, _ = make("fixed", tmp_path)
    before = path.read_bytes()
    real_statvfs = os.fstatvfs

    def full(fd):
        st = real_statvfs(fd)
        return os.statvfs_result((st.f_bsize, st.f_frsize, st.f_blocks, 1, 1, *tuple(st)[5:]))

    monkeypatch.setattr(os, "fstatvfs", full)
    with pytest.raises(WriteFailed, match="MiB free") as err:
        write_and_commit(path, [(0, b"\x42" * 512)], reflink=False)
    assert "unchanged" in err.value.message
    assert path.read_bytes() == before and temps(tmp_path) == []
