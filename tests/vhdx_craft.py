"""Test-side VHDX surgery, written from MS-VHDX independently of vhdtool's reader.

Used to make what no Linux tool makes: a pending log, equal header sequence numbers,
a differencing disk, damaged structures. What these produce is judged by
independent readers (qemu-img, libvhdi), not by vhdtool alone.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import uuid
from pathlib import Path

from dissect.util.hash import crc32c as _crc

KiB, MiB = 1024, 1024 * 1024
HEADER_OFFSETS = (64 * KiB, 128 * KiB)
REGION_OFFSETS = (192 * KiB, 256 * KiB)
BAT_GUID = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_GUID = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAMETERS = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
VIRTUAL_DISK_ID = uuid.UUID("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR = uuid.UUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR = uuid.UUID("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR = uuid.UUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
PARENT_LOCATOR_TYPE = uuid.UUID("B04AEFB7-D19E-4A81-B789-25B8E9445913")


def crc32c(data: bytes) -> int:
    return _crc.crc32c(data) & 0xFFFFFFFF


def qemu_vhdx(raw: Path, out: Path, *options: str) -> Path:
    opts = ",".join(options) if options else "subformat=dynamic"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vhdx", "-o", opts, str(raw), str(out)], check=True)
    return out


def qemu_raw(image: Path, out: Path, fmt: str | None = None) -> bytes:
    cmd = ["qemu-img", "convert"]
    if fmt:
        cmd += ["-f", fmt]
    subprocess.run(cmd + ["-O", "raw", str(image), str(out)], check=True)
    return out.read_bytes()


def patterned_raw(path: Path, size: int, seed: int = 1) -> bytes:
    """Raw content with distinct data in some blocks and holes in others."""
    data = bytearray(size)
    rnd = __import__("random").Random(seed)
    for start in range(0, size, 3 * MiB):
        n = min(MiB // 2, size - start)
        data[start : start + n] = rnd.randbytes(n)
    path.write_bytes(bytes(data))
    return bytes(data)


# -- headers ---------------------------------------------------------------------------
def read_header(buf: bytes, slot: int) -> dict:
    off = HEADER_OFFSETS[slot - 1]
    h = buf[off : off + 4096]
    seq, = struct.unpack_from("<Q", h, 8)
    log_len, log_off = struct.unpack_from("<IQ", h, 68)
    return {
        "seq": seq,
        "file_write": uuid.UUID(bytes_le=bytes(h[16:32])),
        "data_write": uuid.UUID(bytes_le=bytes(h[32:48])),
        "log_guid": uuid.UUID(bytes_le=bytes(h[48:64])),
        "log_length": log_len,
        "log_offset": log_off,
    }


def current_slot(buf: bytes) -> int:
    return 1 if read_header(buf, 1)["seq"] >= read_header(buf, 2)["seq"] else 2


def write_header(buf: bytearray, slot: int, seq: int | None = None, log_guid: uuid.UUID | None = None, version: int | None = None) -> None:
    off = HEADER_OFFSETS[slot - 1]
    if seq is not None:
        struct.pack_into("<Q", buf, off + 8, seq)
    if log_guid is not None:
        buf[off + 48 : off + 64] = log_guid.bytes_le
    if version is not None:
        struct.pack_into("<H", buf, off + 66, version)
    struct.pack_into("<I", buf, off + 4, 0)
    struct.pack_into("<I", buf, off + 4, crc32c(bytes(buf[off : off + 4096])))


def regions(buf: bytes, table: int = 1) -> dict[uuid.UUID, tuple[int, int]]:
    off = REGION_OFFSETS[table - 1]
    count, = struct.unpack_from("<I", buf, off + 8)
    out = {}
    for i in range(count):
        e = off + 16 + 32 * i
        out[uuid.UUID(bytes_le=bytes(buf[e : e + 16]))] = struct.unpack_from("<QI", buf, e + 16)
    return out


def reseal_region_table(buf: bytearray, table: int) -> None:
    off = REGION_OFFSETS[table - 1]
    struct.pack_into("<I", buf, off + 4, 0)
    struct.pack_into("<I", buf, off + 4, crc32c(bytes(buf[off : off + 64 * KiB])))


def metadata_items(buf: bytes) -> dict[uuid.UUID, tuple[int, int, int]]:
    """item id -> (absolute file offset of its table entry, item offset in file, length)."""
    moff, _ = regions(buf)[METADATA_GUID]
    count, = struct.unpack_from("<H", buf, moff + 10)
    out = {}
    for i in range(count):
        e = moff + 32 + 32 * i
        item_off, length = struct.unpack_from("<II", buf, e + 16)
        out[uuid.UUID(bytes_le=bytes(buf[e : e + 16]))] = (e, moff + item_off, length)
    return out


def bat_entry(buf: bytes, index: int) -> tuple[int, int]:
    boff, _ = regions(buf)[BAT_GUID]
    raw, = struct.unpack_from("<Q", buf, boff + 8 * index)
    return raw & 7, (raw >> 20) * MiB


def set_bat_entry(buf: bytearray, index: int, state: int, file_offset: int) -> None:
    boff, _ = regions(buf)[BAT_GUID]
    struct.pack_into("<Q", buf, boff + 8 * index, state | (file_offset // MiB) << 20)


# -- log -------------------------------------------------------------------------------
def log_entry(seq: int, log_guid: uuid.UUID, writes: list[tuple[int, bytes]], zeros: list[tuple[int, int]],
              tail: int, flushed: int, last: int) -> bytes:
    """One log entry (MS-VHDX 2.3.1) carrying 4 KiB data writes and zero ranges."""
    count = len(writes) + len(zeros)
    desc_sectors = -(-(64 + 32 * count) // 4096)
    length = (desc_sectors + len(writes)) * 4096
    entry = bytearray(length)
    entry[0:4] = b"loge"
    struct.pack_into("<IIQII", entry, 8, length, tail, seq, count, 0)
    entry[32:48] = log_guid.bytes_le
    struct.pack_into("<QQ", entry, 48, flushed, last)
    d = 64
    for file_offset, length_z in zeros:
        entry[d : d + 4] = b"zero"
        struct.pack_into("<IQQQ", entry, d + 4, 0, length_z, file_offset, seq)
        d += 32
    for i, (file_offset, data) in enumerate(writes):
        assert len(data) == 4096
        entry[d : d + 4] = b"desc"
        struct.pack_into("<I", entry, d + 4, struct.unpack_from("<I", data, 4092)[0])
        entry[d + 8 : d + 16] = data[:8]
        struct.pack_into("<QQ", entry, d + 16, file_offset, seq)
        d += 32
        s = (desc_sectors + i) * 4096
        entry[s : s + 4] = b"data"
        struct.pack_into("<I", entry, s + 4, seq >> 32)
        entry[s + 8 : s + 4092] = data[8:4092]
        struct.pack_into("<I", entry, s + 4092, seq & 0xFFFFFFFF)
    struct.pack_into("<I", entry, 4, crc32c(bytes(entry)))
    return bytes(entry)


def add_pending_log(path: Path, writes: list[tuple[int, bytes]], zeros: list[tuple[int, int]] = ()) -> uuid.UUID:
    """Make ``path`` an image whose current header names a log holding ``writes``."""
    buf = bytearray(path.read_bytes())
    slot = current_slot(buf)
    h = read_header(buf, slot)
    guid = uuid.uuid4()
    entry = log_entry(7, guid, writes, list(zeros), tail=0, flushed=len(buf), last=len(buf))
    assert len(entry) <= h["log_length"]
    buf[h["log_offset"] : h["log_offset"] + len(entry)] = entry
    write_header(buf, slot, log_guid=guid)
    path.write_bytes(bytes(buf))
    return guid


# -- differencing ------------------------------------------------------------------------
def make_differencing(parent: Path, child: Path, sectors: dict[int, bytes], full_block: int | None = None,
                      block_size: int = 2 * MiB, relative_path: str | None = None,
                      linkage: uuid.UUID | None = None) -> None:
    """A differencing VHDX over ``parent`` whose ``sectors`` (LBA -> 512 bytes) are its own.

    Blocks holding any of ``sectors`` are PARTIALLY_PRESENT with a sector bitmap;
    ``full_block`` (if given) is FULLY_PRESENT with a 0x5A pattern; the rest is
    NOT_PRESENT and reads from the parent.
    """
    pbuf = parent.read_bytes()
    ph = read_header(pbuf, current_slot(pbuf))
    size_item = metadata_items(pbuf)[VIRTUAL_DISK_SIZE]
    size, = struct.unpack_from("<Q", pbuf, size_item[1])
    lss = 512
    chunk_ratio = (1 << 23) * lss // block_size
    data_blocks = -(-size // block_size)
    bitmap_blocks = -(-data_blocks // chunk_ratio)
    bat_entries = bitmap_blocks * (chunk_ratio + 1)
    bat_len = max(MiB, -(-bat_entries * 8 // MiB) * MiB)

    log_off, meta_off, bat_off = 1 * MiB, 2 * MiB, 3 * MiB
    next_free = bat_off + bat_len
    out = bytearray(next_free)
    out[0:8] = b"vhdxfile"
    creator = "vhdtool tests".encode("utf-16-le")
    out[8 : 8 + len(creator)] = creator
    file_write, data_write = uuid.uuid4(), uuid.uuid4()
    for slot, seq in ((1, 1), (2, 2)):
        off = HEADER_OFFSETS[slot - 1]
        out[off : off + 4] = b"head"
        struct.pack_into("<Q", out, off + 8, seq)
        out[off + 16 : off + 32] = file_write.bytes_le
        out[off + 32 : off + 48] = data_write.bytes_le
        struct.pack_into("<HHIQ", out, off + 64, 0, 1, MiB, log_off)
        write_header(out, slot)
    for table in (1, 2):
        off = REGION_OFFSETS[table - 1]
        out[off : off + 4] = b"regi"
        struct.pack_into("<I", out, off + 8, 2)
        for i, (guid, roff, rlen) in enumerate(((BAT_GUID, bat_off, bat_len), (METADATA_GUID, meta_off, MiB))):
            e = off + 16 + 32 * i
            out[e : e + 16] = guid.bytes_le
            struct.pack_into("<QII", out, e + 16, roff, rlen, 1)
        reseal_region_table(out, table)

    link = "{%s}" % (linkage or ph["data_write"])
    pairs = [("parent_linkage", link), ("relative_path", relative_path or f".\\{parent.name}"),
             ("absolute_win32_path", f"C:\\VMs\\{parent.name}")]
    loc = bytearray(20 + 12 * len(pairs))
    loc[0:16] = PARENT_LOCATOR_TYPE.bytes_le
    struct.pack_into("<HH", loc, 16, 0, len(pairs))
    for i, (k, v) in enumerate(pairs):
        kb, vb = k.encode("utf-16-le"), v.encode("utf-16-le")
        ko = len(loc)
        loc += kb
        vo = len(loc)
        loc += vb
        struct.pack_into("<IIHH", loc, 20 + 12 * i, ko, vo, len(kb), len(vb))
    items = [
        (FILE_PARAMETERS, struct.pack("<II", block_size, 2), 0b100),
        (VIRTUAL_DISK_SIZE, struct.pack("<Q", size), 0b110),
        (VIRTUAL_DISK_ID, uuid.uuid4().bytes_le, 0b110),
        (LOGICAL_SECTOR, struct.pack("<I", lss), 0b110),
        (PHYSICAL_SECTOR, struct.pack("<I", 4096), 0b110),
        (PARENT_LOCATOR, bytes(loc), 0b100),
    ]
    out[meta_off : meta_off + 8] = b"metadata"
    struct.pack_into("<H", out, meta_off + 10, len(items))
    item_off = 64 * KiB
    for i, (guid, data, flags) in enumerate(items):
        e = meta_off + 32 + 32 * i
        out[e : e + 16] = guid.bytes_le
        struct.pack_into("<III", out, e + 16, item_off, len(data), flags)
        out[meta_off + item_off : meta_off + item_off + len(data)] = data
        item_off += -(-len(data) // 4096) * 4096

    def bat_set(index: int, state: int, file_offset: int) -> None:
        struct.pack_into("<Q", out, bat_off + 8 * index, state | (file_offset // MiB) << 20)

    blocks: dict[int, list[int]] = {}
    for lba in sectors:
        blocks.setdefault(lba * lss // block_size, []).append(lba)
    bitmaps: dict[int, int] = {}
    for block, lbas in sorted(blocks.items()):
        chunk = block // chunk_ratio
        if chunk not in bitmaps:
            bitmaps[chunk] = next_free
            out += bytes(MiB)
            bat_set(chunk * (chunk_ratio + 1) + chunk_ratio, 6, next_free)
            next_free += MiB
        payload = next_free
        out += bytes(block_size)
        next_free += block_size
        bat_set(block + block // chunk_ratio, 7, payload)
        for lba in lbas:
            within = lba * lss - block * block_size
            out[payload + within : payload + within + lss] = sectors[lba]
            bit = lba - chunk * (1 << 23)
            out[bitmaps[chunk] + bit // 8] |= 1 << (bit % 8)
    if full_block is not None:
        bat_set(full_block + full_block // chunk_ratio, 6, next_free)
        out += b"\x5a" * block_size
        next_free += block_size
    child.write_bytes(bytes(out))


def copy(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst


def mtime_ns(path: Path) -> int:
    return os.stat(path).st_mtime_ns
