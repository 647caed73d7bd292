"""Fuzz the VHDX header, region table, metadata, BAT and log parsing.

Mutations hit one structure at a time and, half of the time, reseal the CRCs so
the damage reaches the parsers behind the checksums. Only vhdtool's typed errors
may escape. VHDTOOL_FUZZ_EXAMPLES sets the number of cases of the full sweep (default 10000, marked
slow); the default run makes a tenth of them.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vhdx_craft as vc
from conftest import SWEEPS, sweep_count
from vhdtool import open_disk
from vhdtool.errors import VhdtoolError

MiB = 1024 * 1024
EXAMPLES = int(os.environ.get("VHDTOOL_FUZZ_EXAMPLES", "10000"))


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    # Many small rewrites per case: keep the files in memory where the machine allows.
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="vhdtool-fuzz-", dir=shm))
    else:
        tmp = tmp_path_factory.mktemp("fuzz")
    raw = tmp / "src.raw"
    vc.patterned_raw(raw, 6 * MiB)
    dyn = vc.qemu_vhdx(raw, tmp / "dyn.vhdx", "subformat=dynamic", "block_size=1M")
    buf = dyn.read_bytes()
    _, off = vc.bat_entry(buf, 0)
    vc.add_pending_log(dyn, [(off, b"\x77" * 4096), (off + 8192, b"\x66" * 4096)], zeros=[(off + 4096, 4096)])
    parent = vc.qemu_vhdx(raw, tmp / "parent.vhdx", "subformat=dynamic", "block_size=1M")
    child = tmp / "child.vhdx"
    vc.make_differencing(parent, child, {1: b"\x01" * 512, 3000: b"\x03" * 512}, full_block=4, block_size=MiB)
    out = {}
    for name, path in (("log", dyn), ("diff", child)):
        data = path.read_bytes()
        out[name] = (path, data, structures(data))
    yield out
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


def structures(buf: bytes) -> dict[str, tuple[int, int]]:
    regions = vc.regions(buf)
    meta_off, _ = regions[vc.METADATA_GUID]
    bat_off, _ = regions[vc.BAT_GUID]
    h = vc.read_header(buf, vc.current_slot(buf))
    return {
        "header1": (vc.HEADER_OFFSETS[0], 4096),
        "header2": (vc.HEADER_OFFSETS[1], 4096),
        "region1": (vc.REGION_OFFSETS[0], 16 + 32 * 4),
        "region2": (vc.REGION_OFFSETS[1], 16 + 32 * 4),
        "metadata_table": (meta_off, 32 + 32 * 8),
        "metadata_items": (meta_off + 64 * 1024, 8192),
        "bat": (bat_off, 128),
        "log": (h["log_offset"], 3 * 4096),
    }


def reseal(buf: bytearray) -> None:
    for slot in (1, 2):
        vc.write_header(buf, slot)
    for table in (1, 2):
        vc.reseal_region_table(buf, table)
    h = vc.read_header(buf, vc.current_slot(buf))
    lo = h["log_offset"]
    if buf[lo : lo + 4] == b"loge":
        length, = struct.unpack_from("<I", buf, lo + 8)
        if 0 < length <= h["log_length"]:
            struct.pack_into("<I", buf, lo + 4, 0)
            struct.pack_into("<I", buf, lo + 4, vc.crc32c(bytes(buf[lo : lo + length])))


mutation = st.tuples(st.integers(0, 1 << 16), st.sampled_from([0x00, 0xFF, 0x01, 0x80, 0x7F]) | st.integers(0, 255))


@pytest.mark.parametrize("sweep", SWEEPS)
def test_fuzz_vhdx_structures(bases, sweep):
    @settings(
        max_examples=sweep_count(EXAMPLES, sweep, EXAMPLES // 10),
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        derandomize=True,
    )
    @given(
        base=st.sampled_from(["log", "diff"]),
        target=st.sampled_from(["header1", "header2", "region1", "region2", "metadata_table", "metadata_items", "bat",
                                "log"]),
        mutations=st.lists(mutation, min_size=1, max_size=6),
        wide=st.booleans(),
        resealed=st.booleans(),
        truncate=st.integers(0, 3),
        cut=st.integers(0, 12 * MiB),
    )
    def run(base, target, mutations, wide, resealed, truncate, cut):
        fuzz_case(bases, base, target, mutations, wide, resealed, truncate, cut)

    run()


def fuzz_case(bases, base, target, mutations, wide, resealed, truncate, cut):
    path, original, spans = bases[base]
    start, length = spans[target]
    buf = bytearray(original)
    for pos, value in mutations:
        # Narrow mutations hit the fields; wide ones land anywhere in the structure's area.
        buf[start + pos % (length if not wide else 64 * 1024)] = value
    if resealed:
        reseal(buf)
    size = cut if truncate == 0 else len(buf)  # a quarter of the cases cut the file short
    pages = [p for p in _pages_near(spans) if buf[p : p + 4096] != original[p : p + 4096]]
    _write(path, buf, pages, size)
    try:
        try:
            with open_disk(path) as d:
                for off in (0, 4096, MiB - 512, 3 * MiB + 100, 4 * MiB, d.size - 512):
                    d.seek(max(0, off))
                    d.read(1024)
        except VhdtoolError as e:
            assert e.message and "\n" not in e.message
    finally:
        _write(path, original, pages, len(original), restore_from=min(size, len(original)))


def _pages_near(spans: dict[str, tuple[int, int]]) -> list[int]:
    """Every page a mutation or a reseal can touch: each structure's 64 KiB, the log's first entries."""
    pages = set()
    for start, _ in spans.values():
        base = start - start % 4096
        pages.update(range(base, base + 64 * 1024, 4096))
    return sorted(pages)


def _write(path: Path, data, pages: list[int], size: int, restore_from: int | None = None) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        for p in pages:
            if p < size:
                os.pwrite(fd, bytes(data[p : min(p + 4096, size)]), p)
        if restore_from is not None and restore_from < len(data):
            os.pwrite(fd, bytes(data[restore_from:]), restore_from)
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
