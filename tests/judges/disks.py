"""A raw disk's byte ranges, blkid's name for a volume, and the block states in a VHDX's BAT."""

from __future__ import annotations

import os
import struct
import uuid
from pathlib import Path

from .tools import sh


def copy_range(src: Path, dest: Path, offset: int, size: int) -> Path:
    with open(src, "rb") as fi, open(dest, "wb") as fo:
        fi.seek(offset)
        left = size
        while left:
            chunk = fi.read(min(left, 1 << 20))
            assert chunk, f"{src} ends before {offset + size}"
            if chunk.count(0) == len(chunk):
                fo.seek(len(chunk), os.SEEK_CUR)
            else:
                fo.write(chunk)
            left -= len(chunk)
        fo.truncate(size)
    return dest


def blkid_type(image: Path) -> str | None:
    proc = sh("blkid", "-p", "-o", "value", "-s", "TYPE", image, check=False)
    return proc.stdout.decode().strip() or None


def vhdx_bat_states(path: Path) -> list[int]:
    """Payload-block states from the VHDX BAT (region table at 192 KiB)."""
    with open(path, "rb") as f:
        f.seek(0x30000)
        table = f.read(64 * 1024)
        assert table[:4] == b"regi"
        count = struct.unpack_from("<I", table, 8)[0]
        bat = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
        for i in range(count):
            guid, offset, length, _ = struct.unpack_from("<16sQII", table, 16 + 32 * i)
            if uuid.UUID(bytes_le=guid) == bat:
                f.seek(offset)
                entries = struct.unpack(f"<{length // 8}Q", f.read(length))
                return [e & 7 for e in entries]
    raise AssertionError("no BAT region")


def vhdi_chain_read(child: Path, parent: Path, offset: int, length: int | None = None) -> bytes:
    """``length`` bytes (default: to the end of the disk) at ``offset`` of a differencing chain, read by libvhdi."""
    import pyvhdi

    f, p = pyvhdi.file(), pyvhdi.file()
    f.open(str(child))
    p.open(str(parent))
    try:
        f.set_parent(p)
        return f.read_buffer_at_offset(f.get_media_size() - offset if length is None else length, offset)
    finally:
        f.close()
        p.close()
