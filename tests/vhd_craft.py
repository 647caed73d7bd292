"""Test-side builder of differencing VHDs (VHD spec 2006: footer, dynamic header, BAT, blocks).

No Linux tool writes differencing VHDs; this one is written from the spec and its
output is judged by libvhdi as well as by expected bytes.
"""

from __future__ import annotations

import struct
import time
import uuid
from pathlib import Path

SECTOR = 512


def checksum(data: bytes, skip: tuple[int, int]) -> int:
    return ~(sum(data[: skip[0]]) + sum(data[skip[1] :])) & 0xFFFFFFFF


def footer(size: int, disk_type: int, data_offset: int, unique: uuid.UUID) -> bytes:
    f = bytearray(512)
    f[0:8] = b"conectix"
    struct.pack_into(">IIQI", f, 8, 2, 0x00010000, data_offset, int(time.time()) - 946684800)
    f[28:32] = b"vtst"
    struct.pack_into(">I", f, 32, 0x00010000)
    f[36:40] = b"Wi2k"
    struct.pack_into(">QQ", f, 40, size, size)
    struct.pack_into(">I", f, 56, 0xFFFF10FF)  # geometry: unused with Current Size
    struct.pack_into(">I", f, 60, disk_type)
    f[68:84] = unique.bytes
    struct.pack_into(">I", f, 64, checksum(bytes(f), (64, 68)))
    return bytes(f)


def make_differencing_vhd(parent: Path, child: Path, sectors: dict[int, bytes], block_size: int = 2 * 1024 * 1024,
                          parent_id: bytes | None = None) -> None:
    pdata = parent.read_bytes()
    pfooter = pdata[-512:]
    assert pfooter[:8] == b"conectix"
    size, = struct.unpack_from(">Q", pfooter, 48)
    ptimestamp, = struct.unpack_from(">I", pfooter, 24)
    blocks = -(-size // block_size)
    table_off = 512 + 1024
    bat_bytes = -(-blocks * 4 // SECTOR) * SECTOR
    locators = [(b"W2ru", f".\\{parent.name}"), (b"W2ku", f"C:\\VMs\\{parent.name}")]
    loc_off = table_off + bat_bytes
    data_start = loc_off + SECTOR * len(locators)

    header = bytearray(1024)
    header[0:8] = b"cxsparse"
    struct.pack_into(">QQIII", header, 8, 0xFFFFFFFFFFFFFFFF, table_off, 0x00010000, blocks, block_size)
    header[40:56] = parent_id if parent_id is not None else pfooter[68:84]
    struct.pack_into(">I", header, 56, ptimestamp)
    name = parent.name.encode("utf-16-be")[:512]
    header[64 : 64 + len(name)] = name
    for i, (code, path) in enumerate(locators):
        data = path.encode("utf-16-le")
        e = 576 + 24 * i
        header[e : e + 4] = code
        struct.pack_into(">IIIQ", header, e + 4, SECTOR, len(data), 0, loc_off + SECTOR * i)
    struct.pack_into(">I", header, 36, checksum(bytes(header), (36, 40)))

    bat = bytearray(b"\xff" * bat_bytes)
    body = bytearray()
    bitmap_bytes = -(-(block_size // SECTOR) // 8 // SECTOR) * SECTOR
    by_block: dict[int, list[int]] = {}
    for lba in sectors:
        by_block.setdefault(lba * SECTOR // block_size, []).append(lba)
    for block, lbas in sorted(by_block.items()):
        start = data_start + len(body)
        struct.pack_into(">I", bat, 4 * block, start // SECTOR)
        bitmap = bytearray(bitmap_bytes)
        data = bytearray(block_size)
        for lba in lbas:
            s = lba - block * (block_size // SECTOR)
            bitmap[s // 8] |= 0x80 >> (s % 8)  # most significant bit first
            data[s * SECTOR : (s + 1) * SECTOR] = sectors[lba]
        body += bitmap + data
    foot = footer(size, 4, 512, uuid.uuid4())
    out = bytearray(foot) + header + bat
    for _code, path in locators:
        out += path.encode("utf-16-le").ljust(SECTOR, b"\0")
    out += body + foot
    child.write_bytes(bytes(out))
