"""VHDX commit planning: where each changed extent of the virtual disk goes in the file.

``plan_commit`` maps an overlay's changed extents onto one VHDX file as read (its
pending log replayed in memory): new blocks appended at the end of the file, data
written directly into clusters nothing of the old state reaches, and everything
else (BAT entries, sector bitmaps, data in allocated blocks) as logged in-place
writes. vhdtool.container.vhdx.writer runs the plan in its crash-safe order.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from vhdtool.container.overlay import Extent
from vhdtool.container.source import Source, SourceRange
from vhdtool.container.vhdx.bat import encode_entry
from vhdtool.container.vhdx.header import ZERO_GUID
from vhdtool.container.vhdx.logwriter import LoggedWrite, sequence_size
from vhdtool.container.vhdx.reader import VhdxDisk
from vhdtool.container.vhdx.structs import (
    BAT_ENTRY,
    HEADER_SECTION_SIZE,
    HEADER_SIZE,
    LOG_SECTOR_SIZE,
    PAYLOAD_BLOCK_FULLY_PRESENT,
    PAYLOAD_BLOCK_NOT_PRESENT,
    PAYLOAD_BLOCK_PARTIALLY_PRESENT,
    SB_BLOCK_PRESENT,
    SECTORS_PER_BITMAP_BLOCK,
)
from vhdtool.errors import CorruptImage, UnsupportedImage
from vhdtool.units import MiB

MAX_SEQUENCE_NUMBER = 2**64 - 1
HEADER_UPDATES = 3  # steps 1, 4 and 6 of a commit; one more to retire a pending log
FULL_BAT_CHECK = 16 * MiB  # BATs up to this size are checked whole for blocks that share file space
ALLOCATED = (PAYLOAD_BLOCK_FULLY_PRESENT, PAYLOAD_BLOCK_PARTIALLY_PRESENT)


@dataclass
class CommitPlan:
    """What a commit will write, decided on the read-only view before anything is opened for writing."""

    appended: list[tuple[int, int, list[tuple[int, bytes]]]] = field(default_factory=list)
    """(file offset, length, [(offset in it, bytes)]) of each new 1 MiB-aligned block; the rest of it is zeros."""
    logged: list[LoggedWrite] = field(default_factory=list)
    direct: list[tuple[int, bytes | SourceRange]] = field(default_factory=list)
    """(file offset, bytes) written in place before the log: nothing of the old state reaches them."""
    end_of_file: int = 0  # the file's size once the new blocks are appended
    free_from: int = 0  # where free file space begins: past the new blocks and everything the old state uses

    def written_ranges(self) -> list[tuple[int, int]]:
        """(file offset, length) of every byte step 2 and step 5 write: what ``reserve`` allocates first."""
        out = [(offset + within, len(data)) for offset, _length, pieces in self.appended for within, data in pieces]
        out += [(offset, len(data)) for offset, data in self.direct]
        out += [(w.file_offset, w.length) for w in self.logged]
        return out

    def sources(self) -> list[Source]:
        """The local files whose bytes step 2 copies."""
        found = {}
        for data in [d for _o, _l, pieces in self.appended for _w, d in pieces] + [d for _o, d in self.direct]:
            if isinstance(data, SourceRange):
                found[id(data.source)] = data.source
        return list(found.values())

    @property
    def empty(self) -> bool:
        return not self.appended and not self.logged and not self.direct

    @property
    def write_size(self) -> int:
        """Bytes ``VhdxCommit.run`` writes: three header updates, the new blocks' data, the direct
        writes, the log sequence and the logged writes applied (a pending log replayed comes on top)."""
        return (3 * HEADER_SIZE
                + sum(len(data) for _offset, _length, pieces in self.appended for _within, data in pieces)
                + sum(len(data) for _offset, data in self.direct)
                + sequence_size(self.logged) + sum(w.length for w in self.logged))


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


class _Planner:
    """Maps changed virtual-disk extents onto one VHDX file (2.4 sector bitmaps, 2.5 BAT)."""

    def __init__(self, disk: VhdxDisk, unreachable: list[tuple[int, int]] = ()):
        self.disk = disk
        # Only whole 4 KiB log sectors: the log replays whole sectors, so a sector that also holds logged bytes
        # would put its old bytes back over data written in place beside them (payload blocks are 1 MiB aligned
        # in the file, so the virtual disk's 4 KiB boundaries are the file's).
        self.unreachable = [(a, b) for a, b in ((-(-lo // LOG_SECTOR_SIZE) * LOG_SECTOR_SIZE,
                                                 hi // LOG_SECTOR_SIZE * LOG_SECTOR_SIZE) for lo, hi in unreachable)
                            if a < b]
        self.geometry = disk.geometry
        self.lss = disk.logical_sector_size
        self.spans = self._structures()
        self.owners = self._allocated_blocks()
        self.end = self._append_point()
        self.plan = CommitPlan()
        self.in_place: dict[int, bytearray] = {}  # 4 KiB-aligned file offset -> new sector contents
        self.bat: dict[int, int] = {}  # BAT index -> new raw entry
        self.new_bitmaps: dict[int, tuple[int, bytearray]] = {}  # chunk -> (file offset, bitmap block)
        self.targets: dict[int, tuple[int, int]] = {}  # BAT index written into in place -> (file offset, length)

    def _allocated_blocks(self) -> dict[int, tuple[int, int]]:
        """File offset -> (BAT index, length) of every allocated block (whole BATs up to FULL_BAT_CHECK bytes).

        A block whose part inside the virtual disk runs past the end of the file is refused, as
        ``qemu-img check`` reports it: the file was truncated. The last block may end early (qemu-img
        makes fixed images so): what lies past the virtual disk's end is never read.
        """
        d, g = self.disk, self.geometry
        owners: dict[int, tuple[int, int]] = {}
        # Beyond FULL_BAT_CHECK, the last payload block alone: the one a fixed image ends early.
        whole = g.entries * BAT_ENTRY.size <= FULL_BAT_CHECK
        for i in range(g.entries) if whole else [g.payload_index(g.data_blocks - 1)]:
            state, offset = d.bat[i]
            chunk, j = divmod(i, g.chunk_ratio + 1)
            if j == g.chunk_ratio:
                if state != SB_BLOCK_PRESENT or not offset:
                    continue
                length = used = MiB
            else:
                if state not in ALLOCATED or not offset:
                    continue
                length = d.block_size
                used = min(length, d.size - (chunk * g.chunk_ratio + j) * length)
            if offset + used > d.image.size:
                raise CorruptImage(d.path, f"truncated: the block of BAT entry {i} runs past the end of the file "
                                           f"(offset {offset}, file size {d.image.size})")
            # The commit writes the headers, the BAT and the log: a block there would change with them.
            self._check_structures(i, offset, length)
            owners.setdefault(offset, (i, length))
        return owners

    def _structures(self) -> list[tuple[int, int, str]]:
        """(start, end, name) of the header section, the regions and the log."""
        d, h = self.disk, self.disk.header
        spans = [(0, HEADER_SECTION_SIZE, "the header section"),
                 (d.bat_region.file_offset, d.bat_region.file_offset + d.bat_region.length, "the BAT"),
                 (d.metadata_region.file_offset, d.metadata_region.file_offset + d.metadata_region.length,
                  "the metadata region")]
        if h.log_length:
            spans.append((h.log_offset, h.log_offset + h.log_length, "the log"))
        return spans

    def _check_structures(self, index: int, offset: int, length: int) -> None:
        """Refuse a block of BAT entry ``index`` that shares file space with the header section or a region."""
        for lo, hi, what in self.spans:
            if offset < hi and lo < offset + length:
                raise CorruptImage(self.disk.path, f"BAT entry {index} points into {what}; writing there would damage it")

    def _append_point(self) -> int:
        """Where new blocks go: past the file, every region, the log and every allocated block, even where
        these lie past the end of the file, so that nothing shares file space with a new block (2.5.1)."""
        ends = [self.disk.image.size] + [hi for _lo, hi, _what in self.spans]
        ends += [offset + length for offset, (_index, length) in self.owners.items()]
        return _round_up(max(ends), MiB)

    def _append(self, length: int) -> int:
        offset = self.end
        self.end += _round_up(length, MiB)
        return offset

    def _file_sector(self, offset: int) -> bytearray:
        base = offset - offset % LOG_SECTOR_SIZE
        sector = self.in_place.get(base)
        if sector is None:
            sector = self.in_place[base] = bytearray(self.disk.image.read_exact(base, LOG_SECTOR_SIZE, "a sector to log"))
        return sector

    def _write_in_place(self, file_offset: int, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            sector = self._file_sector(file_offset + pos)
            within = (file_offset + pos) % LOG_SECTOR_SIZE
            n = min(LOG_SECTOR_SIZE - within, len(data) - pos)
            sector[within : within + n] = data[pos : pos + n]
            pos += n

    def _bitmap_bits(self, chunk: int, first_sector: int, count: int) -> None:
        """Mark chunk sectors [first_sector, first_sector + count) present (2.4: bit s % 8 of byte s // 8)."""
        state, offset = self.disk.bat[self.geometry.bitmap_index(chunk)]
        if state == SB_BLOCK_PRESENT:
            target = None
            self.targets[self.geometry.bitmap_index(chunk)] = (offset, MiB)
        elif chunk in self.new_bitmaps:
            target = self.new_bitmaps[chunk][1]
        else:
            # A new sector bitmap block: all zero (every sector from the parent) but ours.
            offset = self._append(MiB)
            target = bytearray(MiB)
            self.new_bitmaps[chunk] = (offset, target)
            self.bat[self.geometry.bitmap_index(chunk)] = encode_entry(SB_BLOCK_PRESENT, offset)
        for s in range(first_sector, first_sector + count):
            if target is not None:
                target[s // 8] |= 1 << (s % 8)
            else:
                byte = self._file_sector(offset + s // 8)
                byte[(offset + s // 8) % LOG_SECTOR_SIZE] |= 1 << (s % 8)

    def _clear_bitmap_bits(self, chunk: int, first_sector: int, count: int) -> None:
        """Clear what an existing sector bitmap says of a NOT_PRESENT block's sectors before it becomes
        PARTIALLY_PRESENT: such a block reads from the parent whatever its bits say (2.5.1.1), so bits
        left set (a block trimmed back to NOT_PRESENT) would make its untouched sectors read zeros."""
        state, offset = self.disk.bat[self.geometry.bitmap_index(chunk)]
        if state != SB_BLOCK_PRESENT or chunk in self.new_bitmaps:
            return
        # A block is at least 1 MiB of 4 KiB sectors at most: its bits are whole bytes.
        lo, hi = offset + first_sector // 8, offset + (first_sector + count) // 8
        if not any(self.disk.image.read_exact(lo, hi - lo, "sector bitmap")):
            return
        for base in range(lo - lo % LOG_SECTOR_SIZE, hi, LOG_SECTOR_SIZE):
            sector = self._file_sector(base)
            a, b = max(lo, base) - base, min(hi, base + LOG_SECTOR_SIZE) - base
            sector[a:b] = bytes(b - a)

    def _split_unreachable(self, virtual: int, data: bytes) -> list[tuple[int, bytes, bool]]:
        """(offset in data, bytes, unreachable?) runs of a piece at virtual-disk ``virtual``."""
        out, pos, end = [], 0, len(data)
        for lo, hi in self.unreachable:
            if hi <= virtual + pos or lo >= virtual + end:
                continue
            a, b = max(lo - virtual, pos), min(hi - virtual, end)
            if a > pos:
                out.append((pos, data[pos:a], False))
            out.append((a, data[a:b], True))
            pos = b
        if pos < end:
            out.append((pos, data[pos:], False))
        return out

    def add_block(self, block: int, pieces: list[tuple[int, bytes]]) -> None:
        """``pieces``: (offset within the block, bytes) of one payload block's changes."""
        index = self.geometry.payload_index(block)
        state, file_offset = self.disk.bat[index]
        bs = self.disk.block_size
        differencing = self.disk.has_parent
        chunk = block // self.geometry.chunk_ratio
        chunk_first_sector = (block * bs - chunk * SECTORS_PER_BITMAP_BLOCK * self.lss) // self.lss
        if state in (PAYLOAD_BLOCK_FULLY_PRESENT, PAYLOAD_BLOCK_PARTIALLY_PRESENT):
            # Allocated: data nothing old can reach goes straight in; the rest through the log.
            self.targets[index] = (file_offset, bs)
            for within, data in pieces:
                for at, run, unreachable in self._split_unreachable(block * bs + within, data):
                    if unreachable:
                        self.plan.direct.append((file_offset + within + at, run))
                    else:
                        # A local file's bytes over clusters the old volume uses (libntfs-3g reused
                        # what this session freed) go through the log like any other change.
                        self._write_in_place(file_offset + within + at, bytes(run))
                if state == PAYLOAD_BLOCK_PARTIALLY_PRESENT:
                    self._bitmap_bits(chunk, chunk_first_sector + within // self.lss, len(data) // self.lss)
            return
        # Not allocated: a new block at the end of the file. In a differencing disk a
        # block the parent supplies becomes partially present, holding only what
        # changed; anything else reads as zeros, so the new block is zeros and changes.
        new_offset = self._append(bs)
        self.plan.appended.append((new_offset, bs, pieces))
        if differencing and state == PAYLOAD_BLOCK_NOT_PRESENT:
            self._clear_bitmap_bits(chunk, chunk_first_sector, bs // self.lss)
            for within, data in pieces:
                self._bitmap_bits(chunk, chunk_first_sector + within // self.lss, len(data) // self.lss)
            self.bat[index] = encode_entry(PAYLOAD_BLOCK_PARTIALLY_PRESENT, new_offset)
        else:
            self.bat[index] = encode_entry(PAYLOAD_BLOCK_FULLY_PRESENT, new_offset)

    def check_targets(self) -> None:
        """Refuse to write in place into a block that shares file space with anything else (2.5.1).

        The reader follows a BAT entry wherever it points, but a write there would also
        change what the other structure holds: the header section, the BAT, the metadata,
        the log, or another block. Each block written is checked against the regions and
        against every allocated block of the BAT (whole BATs up to FULL_BAT_CHECK bytes;
        beyond that, against the blocks this commit writes).
        """
        d = self.disk
        owners = self.owners
        for index, (offset, length) in sorted(self.targets.items()):
            self._check_structures(index, offset, length)
            for other, (o_off, o_len) in self.targets.items():
                if other != index and offset < o_off + o_len and o_off < offset + length:
                    raise CorruptImage(d.path, f"BAT entries {index} and {other} share file space")
            # Another block overlaps this one if it starts inside it, or less than a block before it.
            for at in range(max(0, offset - d.block_size + MiB), offset + length, MiB):
                owner, owner_length = owners.get(at, (index, 0))
                if owner != index and at < offset + length and offset < at + owner_length:
                    raise CorruptImage(d.path, f"BAT entries {index} and {owner} share file space")

    def finish(self) -> CommitPlan:
        self.check_targets()
        bat_base = self.disk.bat_region.file_offset
        for index, raw in self.bat.items():
            self._write_in_place(bat_base + index * BAT_ENTRY.size, BAT_ENTRY.pack(raw))
        for chunk, (offset, bitmap) in self.new_bitmaps.items():
            self.plan.appended.append((offset, MiB, [(0, bytes(bitmap))]))
        self.plan.appended.sort()
        # Contiguous logged sectors become one write, so one descriptor run per extent.
        # (Joined once per run: adding sector by sector would copy a long run once per sector.)
        runs: list[tuple[int, list[bytes]]] = []
        for base in sorted(self.in_place):
            if runs and runs[-1][0] + len(runs[-1][1]) * LOG_SECTOR_SIZE == base:
                runs[-1][1].append(bytes(self.in_place[base]))
            else:
                runs.append((base, [bytes(self.in_place[base])]))
        self.plan.logged = [LoggedWrite(base, len(parts) * LOG_SECTOR_SIZE, b"".join(parts)) for base, parts in runs]
        self.plan.end_of_file = self.end if self.plan.appended else self.disk.image.size
        self.plan.free_from = self.end
        self.plan.direct.sort()
        return self.plan


def plan_commit(disk: VhdxDisk, changes: list[Extent], unreachable: list[tuple[int, int]] = ()) -> CommitPlan:
    """Where each changed extent goes in the file: appended blocks, direct writes, logged in-place writes.

    ``unreachable``: virtual-disk ranges no structure of the old state points into.
    """
    if disk.parent is None and disk.has_parent:
        raise UnsupportedImage(disk.path, "a differencing disk is written only with its parent chain open")
    updates = HEADER_UPDATES + (disk.header.log_guid != ZERO_GUID)
    if disk.header.sequence_number > MAX_SEQUENCE_NUMBER - updates:
        # 2.2.2: each header update takes the next 64-bit sequence number; there is no wrapping.
        raise UnsupportedImage(disk.path, f"its header sequence number {disk.header.sequence_number} leaves no room "
                                          f"for the {updates} header updates of a commit",
                               "convert the image (qemu-img convert, or Convert-VHD on a Hyper-V host) to renew its headers")
    planner = _Planner(disk, unreachable)
    bs = disk.block_size
    per_block: dict[int, list[tuple[int, bytes]]] = defaultdict(list)
    for extent in changes:
        pos = extent.offset
        while pos < extent.end:
            block, within = divmod(pos, bs)
            n = min(bs - within, extent.end - pos)
            per_block[block].append((within, extent.data[pos - extent.offset : pos - extent.offset + n]))
            pos += n
    for block in sorted(per_block):
        planner.add_block(block, per_block[block])
    return planner.finish()
