"""An adversarial look at `vhdtool copy-in` into ext2/3/4 (session 7's hunt): layouts, sizes and states that the
streaming path (vhdtool.filesystem.ext2stream, extbitmap) and the VHDX commit under it must get right or refuse.

Images are made here by mkfs.ext4/mkfs.ext2 -d, debugfs -w, sfdisk and qemu-img (tests/test_ext4_write.py's
``ext_image``). Judges we did not write: ``e2fsck -fn`` clean, ``debugfs -R dump`` and dissect.extfs give the
copied file's sha256, ``qemu-img check`` on the container; refusals leave the image byte-identical.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import assert_one_line_error, digest
from judges.volumes import partition_volume
from test_ext4_stream import GUEST, copy_in, dissect_sha, dumped_sha, patterned
from judges.tools import sh
from test_ext4_write import debugfs, e2fsck_clean, free_blocks, image_ok, linux_tree
from test_stream_write import file_sha
from vhdtool.errors import GuestNotClean, UnsupportedLayout, VolumeFull
from vhdtool.filesystem.extsuper import blocks_needed

MiB = 1 << 20


def judged(image: Path, local: Path, tmp: Path, guest: str = GUEST) -> None:
    """The container checks, the volume is clean and both readers give the local file's bytes at ``guest``."""
    image_ok(image)
    volume = partition_volume(image, tmp, 1)
    e2fsck_clean(volume)
    want = file_sha(local)
    assert dumped_sha(volume, guest, tmp) == want
    assert dissect_sha(volume, guest) == want
    volume.unlink()


# -- data written in place beside data that goes through the VHDX log ----------------------------------------

def ext_disk(tmp: Path, name: str, mkfs: list[str], size: int, start: int = 2048, dirty: tuple = ()) -> Path:
    """A dynamic VHDX with one MBR partition at sector ``start`` (63: the layout of disks partitioned before 2008)
    holding ``mkfs`` -d of the small Linux tree, then each ``debugfs -w`` request of ``dirty`` (or call of it on
    the volume file)."""
    work = tmp / f"build-{name}"
    root = work / "root"
    root.mkdir(parents=True)
    linux_tree(root)
    sectors = (size - 2 * MiB) // 512
    volume, raw = work / "volume.img", work / "disk.raw"
    for path, length in ((volume, sectors * 512), (raw, size)):
        with open(path, "wb") as f:
            f.truncate(length)
    sh(*mkfs, "-q", "-F", "-d", root, volume)
    for request in dirty:
        request(volume) if callable(request) else sh("debugfs", "-w", "-R", request, volume)
    subprocess.run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(raw)], check=True, capture_output=True,
                   input=f"label: dos\nunit: sectors\nstart={start}, size={sectors}, type=83\n".encode())
    sh("dd", f"if={volume}", f"of={raw}", "bs=512", f"seek={start}", "conv=notrunc,sparse", "status=none")
    image = tmp / f"{name}.vhdx"
    sh("qemu-img", "convert", "-f", "raw", "-O", "vhdx", "-o", "subformat=dynamic", raw, image)
    return image


@pytest.mark.parametrize("mkfs,start,image_mib,size", [
    # 1 KiB blocks, 22 groups of 1024: the file runs from a group whose bitmap says free into BLOCK_UNINIT
    # groups, whose first blocks the parent does not take as free (a backup may be there), at a block boundary
    # that is no 4 KiB boundary (the first data block is 1).
    (["mkfs.ext4", "-b", "1024", "-g", "1024", "-N", "64"], 2048, 24, 3 * MiB + 7),
    # 4 KiB blocks in small groups on a partition at sector 63: no block boundary is a 4 KiB one on the disk.
    (["mkfs.ext4", "-b", "4096", "-g", "1024", "-N", "64"], 63, 48, 20 * MiB + 5),
], ids=["1k-blocks", "sector-63"])
def test_data_in_place_and_logged_data_share_no_4k_log_sector(mkfs, start, image_mib, size, tmp_path):
    """The VHDX log holds whole 4 KiB sectors: data put in place before the log (blocks the old volume leaves
    free) must not share one with data that goes through it, whose sector would bring the old bytes back."""
    image = ext_disk(tmp_path, "disk", mkfs, image_mib * MiB, start)
    local = patterned(tmp_path / "local" / "payload.bin", size)
    code, out, err = copy_in(image, local)
    assert code == 0, err
    judged(image, local, tmp_path)


# -- replacing a file whose inode says more than its bytes --------------------------------------------------------

def test_a_file_sealed_by_fs_verity_is_not_replaced(tmp_path):
    """An fs-verity file's Merkle tree lies past its end: new content under the kept flag is a file the guest's
    kernel refuses to read. Refused (exit 5, one line), the image byte-identical; immutable and append-only
    files are replaced (their flags kept, as the inode is), judged by e2fsck, debugfs and dissect.extfs."""
    flags = {"verity": 0x180000, "immutable": 0x80010, "append-only": 0x80020}  # each with EXT4_EXTENTS_FL
    requests = tuple(f"set_inode_field /etc/{name} flags 0x{value:x}" for name, value in flags.items())
    files = tuple(f"write /dev/null /etc/{name}" for name in flags)
    image = ext_disk(tmp_path, "flags", ["mkfs.ext4", "-b", "4096", "-O", "verity"], 48 * MiB, dirty=files + requests)
    local = tmp_path / "local"
    for name in flags:
        patterned(local / name, MiB + 3)
    was = digest(image)
    code, out, err = copy_in(image, local / "verity", "/etc")
    assert code == UnsupportedLayout.exit_code == 5
    assert_one_line_error(code, out, err, image)
    assert "fs-verity" in err
    assert digest(image) == was
    for name in ("immutable", "append-only"):
        code, out, err = copy_in(image, local / name, "/etc")
        assert code == 0, err
        judged(image, local / name, tmp_path, f"/etc/{name}")
        volume = partition_volume(image, tmp_path, 1)
        assert f"Flags: 0x{flags[name]:x}" in debugfs(volume, f"stat /etc/{name}")
        volume.unlink()


# -- layouts vhdtool cannot read: refused in one line, exit 5 -------------------------------------------------

@pytest.mark.parametrize("mkfs,needle", [
    (["mkfs.ext4", "-O", "bigalloc", "-C", "16384"], "cannot read"),  # dissect.extfs reads no bigalloc volume
    (["mkfs.ext4", "-O", "inline_data"], "inline_data"),  # its parser logs every inline folder it misreads
], ids=["bigalloc", "inline_data"])
def test_volumes_vhdtool_cannot_read_are_refused_in_one_line(mkfs, needle, tmp_path):
    image = ext_disk(tmp_path, "unreadable", mkfs, 24 * MiB)
    local = patterned(tmp_path / "local" / "payload.bin", 5000)
    was = digest(image)
    # A process of its own, as a user runs it: pytest's log capture would hide what Python prints to stderr.
    proc = subprocess.run([sys.executable, "-m", "vhdtool.cli.main", "copy-in", str(image), str(local), "/opt"],
                          capture_output=True, text=True)
    code, out, err = proc.returncode, proc.stdout, proc.stderr
    assert code == UnsupportedLayout.exit_code == 5, err
    assert_one_line_error(code, out, err, image)
    assert needle in err and "chkdsk" not in err
    assert digest(image) == was


# -- a volume whose journal is not empty --------------------------------------------------------------------

def test_a_journal_holding_transactions_is_refused_though_marked_clean(tmp_path):
    """needs_recovery clear, the journal not empty (debugfs's journal writer, then the flag cleared): e2fsck
    -y replays it ("Run journal anyway? yes"), its old blocks over what was written since. Exit 18, one line,
    the image byte-identical."""
    block = tmp_path / "block.bin"
    block.write_bytes(b"journalled" * 400)
    script = tmp_path / "journal.cmds"
    script.write_text(f"jo\njw -b 300 {block}\njc\nfeature -needs_recovery\n")

    def fill_the_journal(volume: Path) -> None:
        sh("debugfs", "-w", "-f", script, volume)
        assert "journal has data" in sh("e2fsck", "-fn", volume, check=False).stdout.decode()

    image = ext_disk(tmp_path, "journal", ["mkfs.ext4", "-b", "4096"], 24 * MiB, dirty=(fill_the_journal,))
    local = patterned(tmp_path / "local" / "payload.bin", 5000)
    was = digest(image)
    code, out, err = copy_in(image, local)
    assert code == GuestNotClean.exit_code == 18, err
    assert_one_line_error(code, out, err, image)
    assert "journal" in err
    assert digest(image) == was


# -- fragmented free space, and a file past 4 GiB ------------------------------------------------------------

def test_a_file_in_fragmented_free_space_gets_an_extent_tree_two_levels_deep(tmp_path):
    """2000 files of 6 KiB written by debugfs, every other one removed: the free space is 1 KiB blocks in runs
    of six, holding the removed files' bytes (so the VHDX blocks there are allocated and written in place or
    through the log). A payload of 90% of it takes thousands of extents: a tree of depth 2."""
    junk = tmp_path / "junk.bin"
    junk.write_bytes(os.urandom(6 * 1024))
    script = tmp_path / "fragment.cmds"
    script.write_text("\n".join(["mkdir /frag"] + [f"write {junk} /frag/f{i}" for i in range(2000)]
                                + [f"rm /frag/f{i}" for i in range(0, 2000, 2)]) + "\n")
    image = ext_disk(tmp_path, "frag", ["mkfs.ext4", "-b", "1024"], 48 * MiB,
                     dirty=(lambda volume: sh("debugfs", "-w", "-f", script, volume),))
    volume = partition_volume(image, tmp_path, 1)
    room = free_blocks(volume) * 1024
    volume.unlink()
    local = patterned(tmp_path / "local" / "payload.bin", int(room * 0.9) + 7)
    code, out, err = copy_in(image, local)
    assert code == 0, err
    judged(image, local, tmp_path)
    volume = partition_volume(image, tmp_path, 1)
    assert re.search(r"^\s*0/\s*2\s", debugfs(volume, f"ex {GUEST}"), re.M)  # the root is two levels up
    assert sh("debugfs", "-R", "ls /frag", volume).stdout.decode().count("f1999") == 1  # the kept files stay


@pytest.mark.slow
@pytest.mark.parametrize("mkfs", [["mkfs.ext3", "-b", "4096"], ["mkfs.ext4", "-b", "4096"]], ids=["ext3", "ext4"])
def test_a_file_past_4_gib(mkfs, tmp_path):
    """4 GiB + 4 MiB + 1 bytes (a sparse local file, marked at the block map's boundaries): ext3 maps it through
    the triple indirect block, both keep the size's high half."""
    size = (4 << 30) + 4 * MiB + 1
    local = tmp_path / "local" / "payload.bin"
    local.parent.mkdir()
    with open(local, "wb") as f:
        f.truncate(size)
        for at in (0, 4096 * 12, 4096 * (12 + 1024), 4096 * (12 + 1024 + 1024 * 1024) - 7, size - 5):
            f.seek(at)
            f.write(hashlib.sha256(str(at).encode()).digest())
    image = ext_disk(tmp_path, "big", mkfs, 4700 * MiB)
    code, out, err = copy_in(image, local)
    assert code == 0, err
    judged(image, local, tmp_path)


# -- a volume of many block groups ---------------------------------------------------------------------------

@pytest.mark.slow
def test_a_volume_of_50000_initialised_groups_is_written(tmp_path):
    """libext2fs writes every initialised group's bitmaps and every descriptor block (and the backups) back at
    close, nearly all unchanged. 49 000 groups of 256 KiB, each bitmap in its own 64 KiB page of the child's
    overlay (no flex_bg, no uninit_bg): held whole, that is more than the sandbox child may take, and the
    copy-in failed with exit 4 ("Can't write a block bitmap"). Only changed blocks are held now."""
    mkfs = ["mkfs.ext4", "-b", "1024", "-g", "256", "-O", "^flex_bg,^metadata_csum,^uninit_bg,^resize_inode",
            "-N", "400000"]
    image = ext_disk(tmp_path, "groups", mkfs, 12 << 30)
    local = patterned(tmp_path / "local" / "payload.bin", 100000)
    code, out, err = copy_in(image, local)
    assert code == 0, err
    judged(image, local, tmp_path)


# -- a case-insensitive folder ----------------------------------------------------------------------------------

def test_a_name_a_casefold_folder_holds_in_another_case_is_refused(tmp_path):
    """In a casefold folder (ext4 -O casefold, the folder's EXT4_CASEFOLD_FL set while empty) README.TXT is the
    guest's Readme.txt: libext2fs, comparing bytes, added a second entry beside it. Refused (exit 5, one line,
    byte-identical); a name of its own is written there as anywhere."""
    old = tmp_path / "Readme.txt"
    old.write_text("old\n")
    script = tmp_path / "casefold.cmds"
    script.write_text(f"mkdir /ci\nset_inode_field /ci flags 0x40080000\ncd /ci\nwrite {old} Readme.txt\n")
    image = ext_disk(tmp_path, "casefold", ["mkfs.ext4", "-O", "casefold"], 24 * MiB,
                     dirty=(lambda volume: sh("debugfs", "-w", "-f", script, volume),))
    local = tmp_path / "local"
    local.mkdir()
    (local / "README.TXT").write_text("new\n")
    was = digest(image)
    code, out, err = copy_in(image, local / "README.TXT", "/ci")
    assert code == UnsupportedLayout.exit_code == 5, err
    assert_one_line_error(code, out, err, image)
    assert "Readme.txt" in err
    assert digest(image) == was
    other = patterned(local / "other.bin", 5000)
    code, out, err = copy_in(image, other, "/ci")
    assert code == 0, err
    judged(image, other, tmp_path, "/ci/other.bin")


# -- room: the parent's estimate, then libext2fs's own count -------------------------------------------------

def test_folders_made_on_the_way_can_leave_too_little_room_exit_26(tmp_path):
    """A payload the session's estimate lets through (its blocks and their map fit the free count) but not once
    ten new folders took their blocks: the libext2fs child finds it (exit 26), nothing is written, and the
    message names the volume as what it is (ext3)."""
    image = ext_disk(tmp_path, "room", ["mkfs.ext3", "-b", "4096"], 40 * MiB)
    volume = partition_volume(image, tmp_path, 1)
    free = free_blocks(volume)
    volume.unlink()
    size = max(s for s in range(0, free * 4096, 4096) if blocks_needed(s, 4096) <= free)
    local = tmp_path / "local" / "payload.bin"
    local.parent.mkdir()
    with open(local, "wb") as f:
        f.truncate(size)
    was = digest(image)
    code, out, err = copy_in(image, local, "/a/b/c/d/e/f/g/h/i/j")
    assert code == VolumeFull.exit_code == 26, err
    assert_one_line_error(code, out, err, image)
    assert "ext3 on partition 1" in err
    assert digest(image) == was
