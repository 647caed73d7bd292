"""NTFS volume state on a volume formatted and used by Windows (fixtures/real/ntfs/ntfs.bin.gz)."""

from __future__ import annotations

import io
import struct

from vhdtool.filesystem import NtfsFilesystem


def _volume_info_offset(raw: bytes) -> int:
    """Offset of $Volume's VOLUME_INFORMATION flags in the raw volume (MFT record 3)."""
    bps, spc = struct.unpack_from("<HB", raw, 11)
    mft_lcn, = struct.unpack_from("<Q", raw, 48)
    record = mft_lcn * bps * spc + 3 * 1024
    attr, = struct.unpack_from("<H", raw, record + 20)
    while True:
        atype, alen = struct.unpack_from("<II", raw, record + attr)
        assert atype != 0xFFFFFFFF, "no VOLUME_INFORMATION"
        if atype == 0x70:
            value_off, = struct.unpack_from("<H", raw, record + attr + 20)
            return record + attr + value_off + 10
        attr += alen


def test_windows_volume_is_clean(real):
    raw = real("ntfs/ntfs.bin.gz").read_bytes()
    fs = NtfsFilesystem(io.BytesIO(raw), "ntfs.bin", "volume")
    assert fs.volume_dirty() is False
    assert fs.logfile_clean() is True  # a real NTFS 3.1 restart area with the clean flag
    assert {"Directory", "File.txt", "Large Directory", "Large.txt", "Random.bin"} <= set(fs.listdir("/"))
    assert fs.hibernated() is False


def test_dirty_bit_is_seen(real):
    raw = bytearray(real("ntfs/ntfs.bin.gz").read_bytes())
    off = _volume_info_offset(bytes(raw))
    flags, = struct.unpack_from("<H", raw, off)
    struct.pack_into("<H", raw, off, flags | 1)
    fs = NtfsFilesystem(io.BytesIO(bytes(raw)), "ntfs.bin", "volume")
    assert fs.volume_dirty() is True
