"""Damage the guest inside an image (MFT, hives, partition table): inspect fails cleanly or not at all.

The container is a fixed VHDX, so a virtual disk offset maps to one file offset and
the damage lands exactly where the NTFS and registry parsers will read.
"""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vhdx_craft as vc
from conftest import SWEEPS, sweep_count
from fixtures import build as fb
from vhdtool import inspect, open_disk
from vhdtool.errors import VhdtoolError
from vhdtool.filesystem import NtfsFilesystem
from vhdtool.volume import list_partitions, open_partition

pytestmark = pytest.mark.fixtures
EXAMPLES = int(os.environ.get("VHDTOOL_GUEST_FUZZ_EXAMPLES", "300"))


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    src = fb.build("ws2008r2-x64-fixed")
    path = tmp_path_factory.mktemp("guestfuzz") / "g.vhdx"
    data = src.read_bytes()
    path.write_bytes(data)
    with open_disk(path) as d:
        part = [p for p in list_partitions(d) if p.index == 2][0]
        fs = NtfsFilesystem(open_partition(d, part))
        spots = {"mbr": 0, "boot": part.offset}
        spots["mft"] = part.offset + fs.ntfs.boot_sector.MftStartLcn * fs.ntfs.cluster_size
        for hive in ("SYSTEM", "SOFTWARE"):
            runs = fs.ntfs.mft.get(f"Windows/System32/config/{hive}").dataruns()
            lcn = next(r[0] for r in runs if r[0] is not None)
            spots[hive] = part.offset + lcn * fs.ntfs.cluster_size
        block_size = d.block_size

    def file_offset(virtual: int) -> int:
        _, off = vc.bat_entry(data, virtual // block_size + (virtual // block_size) // ((1 << 23) * 512 // block_size))
        return off + virtual % block_size

    return path, data, spots, file_offset


@pytest.mark.parametrize("sweep", SWEEPS)
def test_damaged_guest_gives_typed_errors_only(target, sweep):
    @settings(max_examples=sweep_count(EXAMPLES, sweep, EXAMPLES // 10), deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(
        spot=st.sampled_from(["mbr", "boot", "mft", "SYSTEM", "SOFTWARE"]),
        mutations=st.lists(st.tuples(st.integers(0, 256 * 1024 - 1), st.integers(0, 255)), min_size=1, max_size=12),
    )
    def run(spot, mutations):
        damage_and_inspect(target, spot, mutations)

    run()


def damage_and_inspect(target, spot, mutations):
    path, data, spots, file_offset = target
    fd = os.open(path, os.O_RDWR)
    touched = []
    try:
        for pos, value in mutations:
            off = file_offset(spots[spot] + (pos if spot != "mbr" else pos % 512))
            touched.append(off)
            os.pwrite(fd, bytes([value]), off)
        try:
            inspect(path)
        except VhdtoolError as e:
            assert e.message and "\n" not in e.message
    finally:
        for off in touched:
            os.pwrite(fd, data[off : off + 1], off)
        os.close(fd)
