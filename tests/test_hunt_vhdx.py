"""Adversarial cases for the VHDX writer: headers, free space and logs as other writers leave them.

Images are made by qemu-img and changed with tests/vhdx_craft.py (written from MS-VHDX, not
from vhdtool). Judges: `qemu-img check` and qemu-img's raw conversion compared with the
expected bytes, libvhdi (pyvhdi), vhdtool's own reader, and sha256 of the file for refusals.
"""

from __future__ import annotations

import hashlib
import os
import random
import struct
import subprocess
import tracemalloc
import uuid
from pathlib import Path

import pytest

import vhdx_craft as vc
from test_container import pyvhdi_bytes
from test_vhdx_write import apply, ours, qemu_bytes, qemu_check, write_and_commit
from vhdtool import open_disk
from vhdtool.container.overlay import Overlay
from vhdtool.container.vhdx.writer import commit
from vhdtool.errors import CorruptImage, UnsupportedImage

MiB = 1024 * 1024
U64 = 2**64 - 1


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sparse_raw(path: Path, size: int, runs: list[tuple[int, int]], seed: int = 1) -> bytes:
    """Random data in ``runs`` of (offset, length), zeros elsewhere: qemu-img leaves the rest unallocated."""
    data = bytearray(size)
    rnd = random.Random(seed)
    for offset, length in runs:
        data[offset : offset + length] = rnd.randbytes(length)
    path.write_bytes(bytes(data))
    return bytes(data)


def qemu_check_errors(path: Path) -> str:
    res = subprocess.run(["qemu-img", "check", "-f", "vhdx", str(path)], capture_output=True, text=True)
    assert res.returncode != 0, res.stdout
    return res.stdout + res.stderr


# -- header sequence numbers ------------------------------------------------------------------

@pytest.mark.parametrize("sequence", [U64, U64 - 2])
def test_header_sequence_number_without_room_is_refused_before_writing(sequence, tmp_path):
    # A commit makes three header updates, each the current sequence number plus one (2.2.2);
    # a 64-bit number at its limit cannot take them. It was struct.error (exit 70) before any
    # write, or after the first update for U64 - 2.
    raw = vc.patterned_raw(tmp_path / "src.raw", 8 * MiB)
    path = vc.qemu_vhdx(tmp_path / "src.raw", tmp_path / "d.vhdx", "subformat=dynamic", "block_size=1M")
    buf = bytearray(path.read_bytes())
    vc.write_header(buf, vc.current_slot(buf), seq=sequence)
    path.write_bytes(bytes(buf))
    qemu_check(path)  # qemu-img has nothing against the image
    before = sha(path)
    with pytest.raises(UnsupportedImage, match="sequence number"):
        write_and_commit(path, [(MiB + 4096, b"\x42" * 512)])
    assert sha(path) == before
    assert ours(path) == raw


def test_header_sequence_number_near_the_limit_still_commits(tmp_path):
    raw = vc.patterned_raw(tmp_path / "src.raw", 8 * MiB)
    path = vc.qemu_vhdx(tmp_path / "src.raw", tmp_path / "d.vhdx", "subformat=dynamic", "block_size=1M")
    buf = bytearray(path.read_bytes())
    vc.write_header(buf, vc.current_slot(buf), seq=U64 - 3)
    path.write_bytes(bytes(buf))
    writes = [(MiB + 4096, b"\x42" * 512), (5 * MiB, b"\x43" * 4096)]
    write_and_commit(path, writes)
    buf = path.read_bytes()
    assert vc.read_header(buf, vc.current_slot(buf))["seq"] == U64
    qemu_check(path)
    assert qemu_bytes(path, tmp_path) == apply(raw, writes)


# -- where new blocks go --------------------------------------------------------------------

def test_truncated_block_is_refused_not_shared_with_a_new_block(tmp_path):
    # The file ends inside its last payload block (qemu-img check: "points after end of file.
    # Image has probably been truncated"). New blocks were appended at the rounded-up end of the
    # file, that is inside the truncated block: two BAT entries then shared file space, and
    # qemu-img check called the result clean.
    sparse_raw(tmp_path / "src.raw", 32 * MiB, [(0, 6 * MiB), (13 * MiB, MiB)])
    path = vc.qemu_vhdx(tmp_path / "src.raw", tmp_path / "d.vhdx", "subformat=dynamic", "block_size=4M")
    buf = path.read_bytes()
    entries = [vc.bat_entry(buf, i) for i in range(8)]
    last = max(offset for state, offset in entries if state == 6)
    os.truncate(path, last + MiB + 4096)
    assert "truncated" in qemu_check_errors(path)
    hole = next(i for i, (state, _offset) in enumerate(entries) if state != 6)
    before = sha(path)
    with pytest.raises(CorruptImage, match="end of the file"):
        write_and_commit(path, [(hole * 4 * MiB, b"\x42" * 4096)])
    assert sha(path) == before


@pytest.mark.parametrize("size", ["9M", "10M"])
def test_fixed_image_whose_last_block_outruns_the_file_is_written(size, tmp_path):
    # qemu-img makes a fixed VHDX whose last block holds only what the virtual size needs:
    # its BAT entry's block runs past the end of the file, and that is not truncation.
    path = tmp_path / "f.vhdx"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vhdx", "-o", "subformat=fixed,block_size=8M,block_state_zero=off",
                    str(path), size], check=True)
    buf = path.read_bytes()
    assert vc.bat_entry(buf, 1)[1] + 8 * MiB > len(buf)
    total = int(size[:-1]) * MiB
    writes = [(total - 8192, random.Random(2).randbytes(8192)), (MiB, random.Random(3).randbytes(2 * MiB))]
    result = write_and_commit(path, writes)
    assert result.log_moved
    qemu_check(path)
    expected = apply(bytes(total), writes)
    assert qemu_bytes(path, tmp_path) == expected
    assert ours(path) == expected


def _set_log(buf: bytearray, offset: int, length: int) -> None:
    for slot in (1, 2):
        struct.pack_into("<IQ", buf, vc.HEADER_OFFSETS[slot - 1] + 68, length, offset)
        vc.write_header(buf, slot)


def test_new_block_does_not_land_in_a_log_region_past_the_end_of_the_file(tmp_path):
    # The log region begins where the file ends (qemu-img check: clean). A new block was
    # appended there and the log sequence then written over it: qemu-img could no longer
    # open the image ("region overlaps") and the block read the log's bytes.
    raw = sparse_raw(tmp_path / "src.raw", 32 * MiB, [(0, 6 * MiB)])
    path = vc.qemu_vhdx(tmp_path / "src.raw", tmp_path / "d.vhdx", "subformat=dynamic", "block_size=1M")
    buf = bytearray(path.read_bytes())
    _set_log(buf, len(buf), MiB)
    path.write_bytes(bytes(buf))
    qemu_check(path)
    writes = [(20 * MiB, random.Random(4).randbytes(MiB)), (MiB, b"\x42" * 4096)]
    write_and_commit(path, writes)
    qemu_check(path)
    expected = apply(raw, writes)
    assert qemu_bytes(path, tmp_path) == expected
    assert ours(path) == expected
    assert pyvhdi_bytes(path)[: len(expected)] == expected


# -- a log another writer left ------------------------------------------------------------------

def test_large_zero_descriptor_is_replayed_without_holding_it_in_memory(tmp_path):
    # A 64 MiB block zeroed through the log (a zero descriptor carries no data, 2.3.1.2; blocks
    # go to 256 MiB): replaying it built bytes(length) in memory, a MemoryError for a large one.
    raw = bytearray(sparse_raw(tmp_path / "src.raw", 128 * MiB, [(0, 4 * MiB), (100 * MiB, MiB)]))
    path = vc.qemu_vhdx(tmp_path / "src.raw", tmp_path / "d.vhdx", "subformat=dynamic", "block_size=64M")
    buf = bytearray(path.read_bytes())
    state, block0 = vc.bat_entry(buf, 0)
    assert state == 6
    h = vc.read_header(buf, vc.current_slot(buf))
    guid = uuid.uuid4()
    entry = vc.log_entry(3, guid, [], [(block0, 64 * MiB)], tail=0, flushed=len(buf), last=len(buf))
    buf[h["log_offset"] : h["log_offset"] + len(entry)] = entry
    vc.write_header(buf, vc.current_slot(buf), log_guid=guid)
    path.write_bytes(bytes(buf))
    raw[0 : 64 * MiB] = bytes(64 * MiB)
    writes = [(100 * MiB + 512, b"\x42" * 512)]
    tracemalloc.start()
    try:
        with open_disk(path) as disk:
            assert disk.read_at(4096, 4096) == bytes(4096)  # the read-only replay agrees
            overlay = Overlay(disk)
            for offset, data in writes:
                overlay.write_at(offset, data)
            result = commit(disk, overlay.changes())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.log_replayed
    assert peak < 16 * MiB, peak
    qemu_check(path)
    assert qemu_bytes(path, tmp_path) == apply(bytes(raw), writes)


# -- differencing disks ------------------------------------------------------------------------

def dissect_bytes(path: Path, size: int) -> bytes:
    from dissect.hypervisor.disk.vhdx import VHDX

    disk = VHDX(path)
    try:
        disk.seek(0)
        return disk.read(size)
    finally:
        disk.fh.close()
        if disk.parent is not None:
            disk.parent.fh.close()


def test_not_present_block_with_stale_sector_bitmap_bits_keeps_reading_the_parent(tmp_path):
    # A NOT_PRESENT block reads from the parent whatever the sector bitmap says (2.5.1.1; vhdtool
    # and dissect.hypervisor read it so). With stale bits set for it (a block trimmed back to
    # NOT_PRESENT), the write that made it PARTIALLY_PRESENT left them set: every sector of it
    # the write did not touch then read as zeros instead of the parent's bytes.
    raw = vc.patterned_raw(tmp_path / "src.raw", 16 * MiB)
    parent = vc.qemu_vhdx(tmp_path / "src.raw", tmp_path / "parent.vhdx", "subformat=dynamic", "block_size=2M")
    child = tmp_path / "child.avhdx"
    vc.make_differencing(parent, child, {1: b"\x01" * 512}, relative_path=".\\parent.vhdx")
    buf = bytearray(child.read_bytes())
    chunk_ratio = (1 << 23) * 512 // (2 * MiB)
    assert vc.bat_entry(buf, 3)[0] == 0
    state, bitmap = vc.bat_entry(buf, chunk_ratio)
    assert state == 6
    first, count = 3 * 2 * MiB // 512, 2 * MiB // 512
    buf[bitmap + first // 8 : bitmap + (first + count) // 8] = b"\xff" * (count // 8)
    child.write_bytes(bytes(buf))
    base = bytearray(raw)
    base[512:1024] = b"\x01" * 512
    assert ours(child) == bytes(base)
    assert dissect_bytes(child, len(raw)) == bytes(base)
    parent_before = sha(parent)
    writes = [(first * 512 + 4096, b"\x42" * 512)]
    write_and_commit(child, writes)
    expected = apply(bytes(base), writes)
    assert vc.bat_entry(child.read_bytes(), 3)[0] == 7
    assert ours(child) == expected
    assert dissect_bytes(child, len(raw)) == expected
    assert pyvhdi_bytes(child, parent)[: len(raw)] == expected
    assert sha(parent) == parent_before
