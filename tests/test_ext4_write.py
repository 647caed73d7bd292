"""ext2/3/4 writes through libext2fs (vhdtool.filesystem.ext2fs), judged by tools we did not write.

Images are made here with mkfs.ext4/mkfs.ext3/mkfs.ext2 -d from a small Linux tree, sfdisk and
qemu-img (or are copies of the ubuntu-ext4 and debian-lvm-ext4 fixtures). Each edit goes through
``vhdtool.edit`` (the overlay, the sandbox, one commit). Judges: ``e2fsck -fn`` clean on the
extracted volume, debugfs for the changed paths, dissect.extfs for every other path (content,
mode, owner unchanged), ``qemu-img check`` on the image. Refusals leave the image byte-identical.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import vhdtool
from conftest import SWEEPS, assert_one_line_error, digest, run_cli, sweep_points, work_copy
from judges.linux import ext_tree, lvm_readonly
from judges.linux import logical_volumes as judged_lvs
from judges.tools import sh
from judges.volumes import partition_volume
from vhdtool.errors import GuestNotClean, UnsupportedLayout, VolumeFull

MiB = 1 << 20
KVP_UNIT = "/lib/systemd/system/hv-kvp-daemon.service"
WANTS = "/etc/systemd/system/multi-user.target.wants"


# -- images ------------------------------------------------------------------------------------

def linux_tree(root: Path, many: int = 0) -> None:
    """A small Linux root: os-release, units, merged /usr links (absolute and relative), a hard link."""
    def put(rel: str, data: bytes | str, mode: int = 0o644) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        os.chmod(path, mode)

    put("etc/os-release", 'ID=debian\nVERSION_ID="12"\nPRETTY_NAME="Debian GNU/Linux 12"\n')
    put("etc/hostname", "guest\n")
    put("etc/shadow", "root:*:19000:0:99999:7:::\n", 0o640)
    put("usr/lib/systemd/system/hv-kvp-daemon.service",
        "[Service]\nExecStart=/usr/sbin/hv_kvp_daemon -n\n[Install]\nWantedBy=multi-user.target\n")
    put("usr/lib/systemd/system/ssh.service", "[Service]\nExecStart=/usr/sbin/sshd -D\n")
    put("usr/sbin/hv_kvp_daemon", b"\x7fELF" + bytes(range(256)) * 64, 0o755)
    put("var/lib/big.bin", os.urandom(3 * MiB))
    os.symlink("usr/lib", root / "lib")
    os.symlink("usr/sbin", root / "sbin")
    (root / "etc/systemd/system/multi-user.target.wants").mkdir(parents=True)
    os.symlink("/lib/systemd/system/ssh.service", root / "etc/systemd/system/multi-user.target.wants/ssh.service")
    os.symlink("../../../usr/lib/systemd/system/ssh.service", root / "etc/systemd/system/sshd.service")
    os.link(root / "etc/hostname", root / "etc/hostname.bak")
    for i in range(many):
        put(f"var/many/entry-with-a-long-name-{i:05d}", f"{i}\n")


def ext_image(tmp: Path, name: str, mkfs: list[str], *, many: int = 0, index_dirs: bool = False,
              dirty: tuple = (), size: int = 64 * MiB) -> Path:
    """A VHDX with one MBR partition (1 MiB in) holding a filesystem made by ``mkfs`` -d from linux_tree."""
    work = tmp / f"build-{name}"
    root = work / "root"
    root.mkdir(parents=True)
    linux_tree(root, many)
    part_size = size - 2 * MiB
    volume = work / "volume.img"
    with open(volume, "wb") as f:
        f.truncate(part_size)
    sh(*mkfs, "-q", "-F", "-d", root, volume)
    if index_dirs:  # e2fsck -D indexes every directory large enough (htree): what a long-lived guest has
        code = subprocess.run(["e2fsck", "-fyD", volume], capture_output=True).returncode
        assert code in (0, 1), code
    for request in dirty:  # a debugfs request, or a function of the volume file that makes one
        sh("debugfs", "-w", "-R", request if isinstance(request, str) else request(volume), volume)
    raw = work / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(size)
    subprocess.run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(raw)], check=True,
                   input=f"label: dos\nunit: sectors\nstart=2048, size={part_size // 512}, type=83\n".encode(),
                   capture_output=True)
    sh("dd", f"if={volume}", f"of={raw}", "bs=1M", "seek=1", "conv=notrunc,sparse", "status=none")
    image = tmp / f"{name}.vhdx"
    sh("qemu-img", "convert", "-f", "raw", "-O", "vhdx", "-o", "subformat=dynamic", raw, image)
    return image


# -- judges ------------------------------------------------------------------------------------

def e2fsck_clean(volume: Path) -> None:
    proc = sh("e2fsck", "-fn", volume, check=False)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()


def debugfs(volume: Path, request: str) -> str:
    return sh("debugfs", "-R", request, volume).stdout.decode(errors="replace")


def present(volume: Path, path: str) -> bool:
    proc = sh("debugfs", "-R", f"stat {path}", volume)
    return "File not found" not in proc.stderr.decode() + proc.stdout.decode()


def stat_of(volume: Path, path: str) -> dict:
    text = debugfs(volume, f"stat {path}")
    m = re.search(r"Type: (\w+)\s+Mode:\s+(\d+)", text)
    owner = re.search(r"User:\s+(\d+)\s+Group:\s+(\d+)", text)
    links = re.search(r"Links: (\d+)", text)
    link = re.search(r'Fast link dest: "(.*)"', text)
    assert m and owner, text
    return {"type": m.group(1), "mode": int(m.group(2), 8), "uid": int(owner.group(1)), "gid": int(owner.group(2)),
            "links": int(links.group(1)), "link": link.group(1) if link else None, "text": text}


def image_ok(image: Path) -> None:
    sh("qemu-img", "check", image)


def unchanged_but(before: dict, after: dict, changed: set[str], added: set[str]) -> None:
    """Every path but ``changed`` keeps kind, mode, owner and content; exactly ``added`` are new."""
    for path, was in before.items():
        if path in changed:
            continue
        assert after.get(path) == was, path
    assert set(after) - set(before) == added


EXT2_INDEX_FL = 0x1000  # ext2_fs.h: a hashed (htree) directory


def dir_flags(volume: Path, path: str) -> int:
    return int(re.search(r"Flags: (0x[0-9a-f]+)", debugfs(volume, f"stat {path}")).group(1), 16)


def free_blocks(volume: Path) -> int:
    return int(re.search(r"Free blocks:\s+(\d+)", sh("dumpe2fs", "-h", volume).stdout.decode()).group(1))


# -- the operations ------------------------------------------------------------------------------

FEATURES = {
    "ext4": ["mkfs.ext4", "-b", "4096"],
    "ext4-1k-linear-dirs": ["mkfs.ext4", "-b", "1024", "-O", "^dir_index"],
    "ext4-no-csum": ["mkfs.ext4", "-O", "^metadata_csum,^64bit"],
    "ext4-casefold": ["mkfs.ext4", "-O", "casefold"],
    "ext4-orphan-file": ["mkfs.ext4", "-O", "orphan_file"],
    "ext4-meta-bg": ["mkfs.ext4", "-O", "meta_bg,^resize_inode"],
    "ext3": ["mkfs.ext3"],
    "ext2": ["mkfs.ext2"],
}


@pytest.mark.parametrize("kind", sorted(FEATURES))
def test_operations_on_each_layout(tmp_path, kind):
    image = ext_image(tmp_path, kind, FEATURES[kind])
    before_volume = partition_volume(image, tmp_path, 1)
    before = ext_tree(before_volume)
    blocks_before = free_blocks(before_volume)
    long_target = "/usr/lib/systemd/system/" + "x" * 80 + ".service"  # too long for a fast link
    script = b"#!/bin/sh\necho installed\n" * 40
    with vhdtool.edit(image) as ed:
        ed.symlink(f"{WANTS}/hv-kvp-daemon.service", KVP_UNIT)
        ed.symlink(f"{WANTS}/long.service", long_target)
        ed.unlink(f"{WANTS}/ssh.service")
        ed.mkdir("/var/lib/vhdtool/abc/logs")
        ed.write_file("/var/lib/vhdtool/abc/install.sh", script, mode=0o755)
        ed.write_file("/etc/hostname", b"renamed\n")  # replaced in place: its hard link sees it too
        ed.unlink("/var/lib/big.bin")
        # enough entries that a 1 KiB linear folder must grow by blocks (ext2fs_expand_dir)
        for i in range(120):
            ed.symlink(f"/etc/systemd/system/many.wants/unit-with-a-rather-long-name-{i:04d}.service", KVP_UNIT)
    image_ok(image)
    volume = partition_volume(image, tmp_path, 1)
    e2fsck_clean(volume)
    link = stat_of(volume, f"{WANTS}/hv-kvp-daemon.service")
    assert (link["type"], link["mode"], link["uid"], link["gid"], link["link"]) == ("symlink", 0o777, 0, 0, KVP_UNIT)
    assert stat_of(volume, f"{WANTS}/long.service")["type"] == "symlink"
    assert not present(volume, f"{WANTS}/ssh.service")
    assert debugfs(volume, "cat /var/lib/vhdtool/abc/install.sh").encode() == script
    made = stat_of(volume, "/var/lib/vhdtool/abc/install.sh")
    assert (made["type"], made["mode"], made["uid"], made["gid"]) == ("regular", 0o755, 0, 0)
    folder = stat_of(volume, "/var/lib/vhdtool/abc/logs")
    assert (folder["type"], folder["mode"], folder["uid"]) == ("directory", 0o755, 0)
    assert debugfs(volume, "cat /etc/hostname.bak") == "renamed\n"
    assert stat_of(volume, "/etc/hostname")["links"] == 2
    after = ext_tree(volume)
    assert after[f"{WANTS}/long.service"][4] == long_target
    assert len([p for p in after if p.startswith("/etc/systemd/system/many.wants/")]) == 120
    added = {f"{WANTS}/hv-kvp-daemon.service", f"{WANTS}/long.service", "/var/lib/vhdtool", "/var/lib/vhdtool/abc",
             "/var/lib/vhdtool/abc/logs", "/var/lib/vhdtool/abc/install.sh", "/etc/systemd/system/many.wants"}
    added |= {f"/etc/systemd/system/many.wants/unit-with-a-rather-long-name-{i:04d}.service" for i in range(120)}
    changed = {"/etc/hostname", "/etc/hostname.bak", f"{WANTS}/ssh.service", "/var/lib/big.bin"}
    unchanged_but(before, after, changed, added)
    assert f"{WANTS}/ssh.service" not in after and "/var/lib/big.bin" not in after
    # the 3 MiB file's blocks are free again (e2fsck's pass 5 checked the bitmaps agree)
    assert free_blocks(volume) > blocks_before + 2 * MiB // 4096 - 64


def test_a_repeated_edit_changes_nothing(tmp_path):
    image = work_copy("ubuntu-ext4", tmp_path)

    def edit():
        with vhdtool.edit(image) as ed:
            ed.symlink(f"{WANTS}/hv-kvp-daemon.service", KVP_UNIT)
            ed.write_file("/var/lib/vhdtool/run.sh", b"#!/bin/sh\n", mode=0o755)
            ed.mkdir("/var/lib/vhdtool/logs")
            ed.unlink("/etc/does-not-exist")
        return ed.result

    first = edit()
    assert first.committed and [f.action for f in first.files] == ["symlink", "add", "mkdir"]
    assert first.files[0].to_dict()["target"] == KVP_UNIT
    with vhdtool.edit(image, dry_run=True) as ed:
        link = ed.entry(f"{WANTS}/hv-kvp-daemon.service")
        assert (link.kind, link.link, link.mode, link.uid) == ("link", KVP_UNIT, 0o777, 0)
        assert ed.entry("/var/lib/vhdtool/run.sh").mode == 0o755 and ed.entry("/nothing") is None
    was = digest(image)
    second = edit()
    assert not second.committed and second.files == ()
    assert digest(image) == was
    e2fsck_clean(partition_volume(image, tmp_path, 1))


def test_dry_run_and_output_leave_the_image(tmp_path):
    image = work_copy("ubuntu-ext4", tmp_path)
    was = digest(image)
    with vhdtool.edit(image, dry_run=True) as ed:
        ed.symlink(f"{WANTS}/x.service", KVP_UNIT)
    assert ed.result.changed_bytes > 0 and not ed.result.committed
    out = tmp_path / "out.vhdx"
    with vhdtool.edit(image, output=out) as ed:
        ed.symlink(f"{WANTS}/x.service", KVP_UNIT)
    assert digest(image) == was
    volume = partition_volume(out, tmp_path, 1)
    e2fsck_clean(volume)
    assert stat_of(volume, f"{WANTS}/x.service")["link"] == KVP_UNIT


def test_hashed_directories_stay_indexed(tmp_path):
    image = ext_image(tmp_path, "htree", ["mkfs.ext4", "-b", "1024"], many=600, index_dirs=True)
    volume = partition_volume(image, tmp_path, 1)
    assert dir_flags(volume, "/var/many") & EXT2_INDEX_FL, "e2fsck -D did not index the folder"
    before = ext_tree(volume)
    names = [f"/var/many/added-by-vhdtool-with-a-long-name-{i:05d}" for i in range(400)]
    with vhdtool.edit(image) as ed:
        for i, name in enumerate(names):
            ed.symlink(name, f"/target/{i}")
        for i in range(0, 600, 3):
            ed.unlink(f"/var/many/entry-with-a-long-name-{i:05d}")
    volume = partition_volume(image, tmp_path, 1)
    e2fsck_clean(volume)
    assert dir_flags(volume, "/var/many") & EXT2_INDEX_FL, "the folder lost its hash index"
    assert "Number of entries" in debugfs(volume, "htree_dump /var/many")
    after = ext_tree(volume)
    removed = {f"/var/many/entry-with-a-long-name-{i:05d}" for i in range(0, 600, 3)}
    unchanged_but(before, after, removed, set(names))
    assert not removed & set(after)


def test_write_file_replaces_with_mode_and_owner(tmp_path):
    image = ext_image(tmp_path, "owner", FEATURES["ext4"])
    big = os.urandom(2 * MiB + 123)
    with vhdtool.edit(image) as ed:
        change = ed.write_file("/etc/shadow", b"root:!:1:0:99999:7:::\n", mode=0o600, uid=0, gid=42)
        ed.write_file("/home/user/data.bin", big, mode=0o640, uid=1000, gid=1000)
        kept = ed.write_file("/etc/os-release", b"ID=debian\n")  # mode and owner kept
    assert change.action == "replace" and kept.action == "replace"
    volume = partition_volume(image, tmp_path, 1)
    e2fsck_clean(volume)
    shadow = stat_of(volume, "/etc/shadow")
    assert (shadow["mode"], shadow["uid"], shadow["gid"]) == (0o600, 0, 42)
    data = stat_of(volume, "/home/user/data.bin")
    assert (data["mode"], data["uid"], data["gid"]) == (0o640, 1000, 1000)
    dumped = tmp_path / "data.bin"
    debugfs(volume, f"dump /home/user/data.bin {dumped}")
    assert dumped.read_bytes() == big
    assert stat_of(volume, "/etc/os-release")["mode"] == 0o644


def test_paths_through_merged_usr_links(tmp_path):
    image = ext_image(tmp_path, "merged", FEATURES["ext4"])
    with vhdtool.edit(image) as ed:
        ed.write_file("/lib/systemd/system/vhdtool-x.service", b"[Service]\n")  # /lib -> usr/lib
        ed.symlink("/sbin/hv_vss_daemon", "hv_kvp_daemon")
    volume = partition_volume(image, tmp_path, 1)
    e2fsck_clean(volume)
    assert debugfs(volume, "cat /usr/lib/systemd/system/vhdtool-x.service") == "[Service]\n"
    assert stat_of(volume, "/usr/sbin/hv_vss_daemon")["link"] == "hv_kvp_daemon"
    assert stat_of(volume, "/lib")["type"] == "symlink"


def test_a_full_volume_is_refused_unchanged(tmp_path):
    image = ext_image(tmp_path, "full", FEATURES["ext4"], size=16 * MiB)
    was = digest(image)
    with pytest.raises(VolumeFull):
        with vhdtool.edit(image) as ed:
            ed.write_file("/var/huge.bin", os.urandom(20 * MiB))
    assert digest(image) == was


def test_inline_data_written_by_libext2fs_but_refused_by_the_session(tmp_path):
    """libext2fs writes inline_data volumes (judged by e2fsck and debugfs only: dissect.extfs cannot read
    inline folders); the edit session refuses them, because its own reads of such a volume are wrong."""
    from vhdtool.container.chain import open_image
    from vhdtool.container.commit import commit
    from vhdtool.container.overlay import Overlay
    from vhdtool.filesystem import ext2fs
    from vhdtool.volume.mapping import VolumeMap

    image = ext_image(tmp_path, "inline", ["mkfs.ext4", "-O", "inline_data"])
    was = digest(image)
    with pytest.raises(UnsupportedLayout, match="inline_data"):
        with vhdtool.edit(image) as ed:
            ed.symlink(f"{WANTS}/hv-kvp-daemon.service", KVP_UNIT)
    assert digest(image) == was
    disk = open_image(str(image))
    try:
        overlay = Overlay(disk)
        ops = [ext2fs.Symlink(f"{WANTS}/hv-kvp-daemon.service", KVP_UNIT), ext2fs.Unlink(f"{WANTS}/ssh.service"),
               ext2fs.WriteFile("/var/lib/vhdtool/small.sh", b"#!/bin/sh\n", 0o755),
               ext2fs.WriteFile("/var/lib/vhdtool/large.bin", b"x" * 10000), ext2fs.Unlink("/var/lib/big.bin")]
        assert ext2fs.apply(overlay, VolumeMap.whole(MiB, 62 * MiB), ops, str(image), "ext4 on partition 1") > 0
        commit(disk, overlay.changes())
    finally:
        disk.close()
    volume = partition_volume(image, tmp_path, 1)
    e2fsck_clean(volume)
    assert stat_of(volume, f"{WANTS}/hv-kvp-daemon.service")["link"] == KVP_UNIT
    # debugfs cat shows an inline file's whole 60 bytes of i_block (mkfs.ext4 -d's files too): cut to its size
    small = stat_of(volume, "/var/lib/vhdtool/small.sh")
    assert int(re.search(r"Size: (\d+)", small["text"]).group(1)) == 10 and small["mode"] == 0o755
    assert debugfs(volume, "cat /var/lib/vhdtool/small.sh")[:10] == "#!/bin/sh\n"
    assert debugfs(volume, "cat /var/lib/vhdtool/large.bin") == "x" * 10000
    assert not present(volume, f"{WANTS}/ssh.service") and present(volume, f"{WANTS}/hv-kvp-daemon.service")


@pytest.mark.parametrize("name,mkfs,needle", [
    ("quota", ["mkfs.ext4", "-O", "quota"], "quota"),  # libext2fs would leave the quota files stale
])
def test_volumes_vhdtool_cannot_keep_right_are_refused(tmp_path, name, mkfs, needle):
    image = ext_image(tmp_path, name, mkfs)
    was = digest(image)
    with pytest.raises(UnsupportedLayout, match=needle):
        with vhdtool.edit(image) as ed:
            ed.symlink(f"{WANTS}/hv-kvp-daemon.service", KVP_UNIT, partition=1)
    assert digest(image) == was


def test_refusals_of_what_is_not_a_file_or_link(tmp_path):
    image = ext_image(tmp_path, "kinds", FEATURES["ext4"])
    was = digest(image)
    for call in (lambda ed: ed.unlink("/etc/systemd"), lambda ed: ed.symlink("/etc/hostname", "/x"),
                 lambda ed: ed.write_file("/etc", b"x"), lambda ed: ed.mkdir("/etc/hostname")):
        with pytest.raises(UnsupportedLayout):
            with vhdtool.edit(image) as ed:
                call(ed)
    assert digest(image) == was


# -- refusals of a volume not unmounted cleanly, or with features libext2fs does not know ---------

def with_feature_bit(field: str, offset: int, bit: int):
    """A debugfs request setting ``bit`` on top of the superblock's feature word at ``offset`` (ext4 disk layout)."""
    def request(volume: Path) -> str:
        with open(volume, "rb") as f:
            f.seek(1024 + offset)
            word = int.from_bytes(f.read(4), "little")
        return f"ssv {field} 0x{word | bit:x}"
    return request


DIRTY = {
    "error-state": ("ssv state 2", GuestNotClean),
    "not-clean": ("ssv state 0", GuestNotClean),
    "needs-recovery": ("feature needs_recovery", GuestNotClean),
    "orphans": ("ssv last_orphan 12", GuestNotClean),
    "error-count": ("ssv error_count 3", GuestNotClean),
    "orphan-file-entries": ("feature orphan_present", GuestNotClean),
    # bits e2fsprogs 1.47 does not know: incompat DIRDATA (0x1000), ro_compat REPLICA (0x800)
    "unknown-incompat": (with_feature_bit("feature_incompat", 96, 0x1000), UnsupportedLayout),
    "unknown-ro-compat": (with_feature_bit("feature_ro_compat", 100, 0x800), UnsupportedLayout),
}


@pytest.mark.parametrize("kind", sorted(DIRTY))
def test_unclean_or_unknown_volumes_are_refused_byte_identical(tmp_path, kind):
    request, error = DIRTY[kind]
    image = ext_image(tmp_path, kind, ["mkfs.ext4"], dirty=(request,))
    was = digest(image)
    with pytest.raises(error) as caught:
        with vhdtool.edit(image) as ed:
            ed.symlink(f"{WANTS}/hv-kvp-daemon.service", KVP_UNIT)
    assert "\n" not in caught.value.message
    assert digest(image) == was
    local = tmp_path / "unit.service"
    local.write_text("[Service]\n")
    code, out, err = run_cli("copy-in", image, local, "/etc/systemd/system")
    assert_one_line_error(code, out, err, image)
    assert code == error.exit_code
    assert digest(image) == was


# -- LVM ------------------------------------------------------------------------------------------

def test_linear_lvm_volume(tmp_path):
    image = work_copy("debian-lvm-ext4", tmp_path)
    raw_before = tmp_path / "before.raw"
    sh("qemu-img", "convert", "-O", "raw", image, raw_before)
    pv_before = partition_volume(image, tmp_path, 1)
    _size, volumes = judged_lvs(pv_before, tmp_path / "before")
    root_offset, root_before = volumes["vg0/root"]
    before = ext_tree(root_before)
    with vhdtool.edit(image) as ed:
        ed.symlink("/etc/systemd/system/multi-user.target.wants/hyperv-daemons.hv-kvp-daemon.service",
                   "/lib/systemd/system/hyperv-daemons.hv-kvp-daemon.service")
        ed.write_file("/var/lib/vhdtool/x/run.sh", b"#!/bin/sh\n", mode=0o755)
    image_ok(image)
    pv_after = partition_volume(image, tmp_path, 1)
    _size, after_volumes = judged_lvs(pv_after, tmp_path / "after")
    offset, root_after = after_volumes["vg0/root"]
    assert offset == root_offset
    e2fsck_clean(root_after)
    after = ext_tree(root_after)
    made = ["/etc/systemd/system/multi-user.target.wants/hyperv-daemons.hv-kvp-daemon.service",
            "/var/lib/vhdtool/x/run.sh"]
    added = {p[:i] for p in made for i in range(1, len(p) + 1) if i == len(p) or p[i] == "/"} - set(before) - {""}
    unchanged_but(before, after, set(), added)
    # Nothing outside the root volume moved: the swap volume, the LVM metadata, the partition table.
    raw_after = tmp_path / "after.raw"
    sh("qemu-img", "convert", "-O", "raw", image, raw_after)
    lo, hi = MiB + root_offset, MiB + root_offset + root_after.stat().st_size
    with open(raw_before, "rb") as a, open(raw_after, "rb") as b:
        old, new = a.read(), b.read()
    assert old[:lo] == new[:lo] and old[hi:] == new[hi:]
    assert old[lo:hi] != new[lo:hi]


def test_lvm_volume_in_two_segments(tmp_path):
    """root is made of two runs of the PV (lvcreate root, lvcreate pad, lvextend root): both are written
    through the mapping, and the LV read back through the segments LVM reports is clean."""
    from fixtures.build.tools import loop_device, lvm_report, lvm_session

    work = tmp_path / "seg"
    work.mkdir()
    pv = work / "pv.img"
    with open(pv, "wb") as f:
        f.truncate(62 * MiB)
    with loop_device(pv) as dev, lvm_session(dev, "vg1", work) as lvm:
        lvm("pvcreate", "--quiet", dev)
        lvm("vgcreate", "--quiet", "--physicalextentsize", "4096k", "vg1", dev)
        for args in (["--name", "root", "--extents", "4"], ["--name", "pad", "--extents", "2"]):
            lvm("lvcreate", "--quiet", "--activate", "n", "--zero", "n", "--wipesignatures", "n", *args, "vg1")
        lvm("lvextend", "--quiet", "--extents", "+6", "vg1/root")
        (pv_row,) = lvm_report(lvm, "pvs", "-o", "pv_name,pe_start")
        segments = [s for s in lvm_report(lvm, "lvs", "--segments", "-o", "lv_name,seg_pe_ranges,seg_start_pe", "vg1")
                    if s["lv_name"] == "root"]
    assert len(segments) == 2, segments
    extent, pe_start = 4 * MiB, int(pv_row["pe_start"])
    runs = []
    for s in sorted(segments, key=lambda s: int(s["seg_start_pe"])):
        first, last = map(int, re.fullmatch(r".+:(\d+)-(\d+)", s["seg_pe_ranges"]).groups())
        runs.append((pe_start + first * extent, (last - first + 1) * extent))
    root = work / "root"
    root.mkdir()
    linux_tree(root)
    lv = work / "lv.img"
    with open(lv, "wb") as f:
        f.truncate(sum(n for _, n in runs))
    sh("mkfs.ext4", "-q", "-F", "-d", root, lv)
    data = lv.read_bytes()
    with open(pv, "r+b") as f:
        at = 0
        for offset, n in runs:
            f.seek(offset)
            f.write(data[at : at + n])
            at += n
    raw = work / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(64 * MiB)
    subprocess.run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(raw)], check=True,
                   input=b"label: dos\nunit: sectors\nstart=2048, size=126976, type=8e\n", capture_output=True)
    sh("dd", f"if={pv}", f"of={raw}", "bs=1M", "seek=1", "conv=notrunc", "status=none")
    image = tmp_path / "segments.vhdx"
    sh("qemu-img", "convert", "-O", "vhdx", raw, image)
    assert vhdtool.inspect(image).guest.os == "linux"
    with vhdtool.edit(image) as ed:
        for i in range(200):  # enough to reach blocks in the second run
            ed.write_file(f"/var/fill/file-{i:03d}", os.urandom(40 * 1024))
        ed.symlink(f"{WANTS}/hv-kvp-daemon.service", KVP_UNIT)
    out = partition_volume(image, tmp_path, 1)
    joined = tmp_path / "joined.img"
    with open(out, "rb") as fi, open(joined, "wb") as fo:
        for offset, n in runs:
            fi.seek(offset)
            fo.write(fi.read(n))
    e2fsck_clean(joined)
    assert stat_of(joined, f"{WANTS}/hv-kvp-daemon.service")["link"] == KVP_UNIT
    assert len([p for p in ext_tree(joined) if p.startswith("/var/fill/")]) == 200
    with lvm_readonly(out, tmp_path / "lvm-after") as (_dev, report):
        assert {r["lv_name"] for r in report("lvs", "-o", "lv_name")} == {"root", "pad"}


def test_a_striped_lvm_volume_is_refused_unchanged(tmp_path):
    """A VG over two PVs (two partitions) with a volume striped over both, made with the LVM tools: refused
    with a one-line message naming the layout, the image byte-identical."""
    from fixtures.build.tools import loop_device, lvm_config, run

    work = tmp_path / "striped"
    (work / "lvm-system" / "lock").mkdir(parents=True)
    images = [work / "pv1.img", work / "pv2.img"]
    for pv in images:
        with open(pv, "wb") as f:
            f.truncate(30 * MiB)
    with loop_device(images[0]) as one, loop_device(images[1]) as two:
        config = lvm_config(one, work / "lvm-system" / "lock").replace(
            f'"a|^{re.escape(one)}$|"', f'"a|^{re.escape(one)}$|", "a|^{re.escape(two)}$|"')
        (work / "lvm-system" / "lvm.conf").write_text(config)
        env = {"LVM_SYSTEM_DIR": str(work / "lvm-system"), "LVM_SUPPRESS_FD_WARNINGS": "1"}

        def lvm(*args):
            return run("lvm", args[0], "--devices", one, "--devices", two, "--driverloaded", "n", *args[1:], env=env)

        lvm("pvcreate", "--quiet", one, two)
        lvm("vgcreate", "--quiet", "--physicalextentsize", "4096k", "vg3", one, two)
        lvm("lvcreate", "--quiet", "--activate", "n", "--zero", "n", "--wipesignatures", "n", "--type", "striped",
            "--stripes", "2", "--stripesize", "64k", "--extents", "4", "--name", "root", "vg3")
    raw = work / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(64 * MiB)
    subprocess.run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(raw)], check=True, capture_output=True,
                   input=b"label: dos\nunit: sectors\nstart=2048, size=61440, type=8e\nstart=63488, size=61440, type=8e\n")
    for i, pv in enumerate(images):
        sh("dd", f"if={pv}", f"of={raw}", "bs=1M", f"seek={1 + 30 * i}", "conv=notrunc", "status=none")
    image = tmp_path / "striped.vhdx"
    sh("qemu-img", "convert", "-O", "vhdx", raw, image)
    was = digest(image)
    with pytest.raises(UnsupportedLayout, match="striped over 2 stripes"):
        with vhdtool.edit(image) as ed:
            ed.symlink(f"{WANTS}/hv-kvp-daemon.service", KVP_UNIT, partition=1)
    local = tmp_path / "unit.service"
    local.write_text("[Service]\n")
    code, out, err = run_cli("copy-in", "--partition", "1", image, local, "/etc")
    assert_one_line_error(code, out, err, image)
    assert code == UnsupportedLayout.exit_code and "linear" in err
    assert digest(image) == was


def test_copy_in_to_a_linux_guest(tmp_path):
    image = work_copy("ubuntu-ext4", tmp_path)
    local = tmp_path / "notes.txt"
    local.write_bytes(b"from the host\n")
    code, out, err = run_cli("copy-in", "--json", image, local, "/etc/vhdtool")
    assert code == 0, err
    assert '"action": "add"' in out and '"/etc/vhdtool/notes.txt"' in out
    volume = partition_volume(image, tmp_path, 1)
    e2fsck_clean(volume)
    made = stat_of(volume, "/etc/vhdtool/notes.txt")
    assert (made["mode"], made["uid"], made["gid"]) == (0o644, 0, 0)
    assert debugfs(volume, "cat /etc/vhdtool/notes.txt") == "from the host\n"
    was = digest(image)
    code, out, err = run_cli("copy-in", image, local, "/etc/vhdtool")
    assert code == 0 and "nothing to change" in err + out
    assert digest(image) == was


# -- crash safety ---------------------------------------------------------------------------------

CRASH_JOB = Path(__file__).resolve().parent / "ext4_write_job.py"


def job_env() -> dict:
    root = Path(__file__).resolve().parent.parent
    return dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{root / 'tests'}")


def write_calls(image: Path, job: Path = CRASH_JOB) -> dict[str, int]:
    """How many pwrite64 and fsync calls ``job`` makes on ``image`` (all its processes), counted by strace."""
    trace = image.with_suffix(".trace")
    subprocess.run(["strace", "-f", "-o", str(trace), "-e", "trace=pwrite64,fsync", sys.executable, str(job),
                    str(image)], check=True, env=job_env(), capture_output=True)
    counts = {"pwrite64": 0, "fsync": 0}
    for line in trace.read_text().splitlines():
        for name in counts:
            if f" {name}(" in line or line.startswith(f"{name}("):
                counts[name] += 1
    return counts


def guest_tree(image: Path, tmp: Path, replay: bool = True) -> dict:
    """The root volume's tree, qemu-img check and e2fsck -fn clean; with ``replay`` read from a copy whose
    VHDX log QEMU replays first (as Hyper-V would at open)."""
    import shutil

    if replay:
        copy = tmp / "replayed.vhdx"
        shutil.copyfile(image, copy)
        sh("qemu-img", "check", "-r", "all", copy, check=False)
        image = copy
    image_ok(image)
    volume = partition_volume(image, tmp, 1)
    e2fsck_clean(volume)
    tree = ext_tree(volume)
    volume.unlink()
    return tree


@pytest.mark.parametrize("sweep", SWEEPS)
def test_kill_at_every_write_and_flush(tmp_path, sweep):
    """SIGKILL at each pwrite64 and fsync of an ext4 edit's commit: the guest is the old one or the new one,
    e2fsck clean either way."""
    import shutil

    original = ext_image(tmp_path, "crash", FEATURES["ext4"])
    old = guest_tree(original, tmp_path)
    probe = tmp_path / "probe.vhdx"
    shutil.copyfile(original, probe)
    counts = write_calls(probe)
    new = guest_tree(probe, tmp_path)
    assert new != old and f"{WANTS}/hv-kvp-daemon.service" in new
    points = sweep_points([(name, n) for name, total in counts.items() for n in range(1, total + 1)], sweep)
    assert len(points) >= 6, counts
    outcomes = {"old": 0, "new": 0}
    victim = tmp_path / "victim.vhdx"
    for name, n in points:
        shutil.copyfile(original, victim)
        res = subprocess.run(["strace", "-f", "-o", "/dev/null", "-e", f"inject={name}:signal=KILL:when={n}",
                              sys.executable, str(CRASH_JOB), str(victim)], capture_output=True, env=job_env(),
                             timeout=120)
        assert res.returncode != 0, (name, n)
        tree = guest_tree(victim, tmp_path)
        assert tree in (old, new), (name, n)
        outcomes["old" if tree == old else "new"] += 1
    assert outcomes["old"] and outcomes["new"], outcomes
    print(f"\next4 edit: {len(points)} kill points of {counts}, outcomes {outcomes}")
