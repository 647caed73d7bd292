"""Adversarial probes of vhdtool's writes into Linux guests (`services` on systemd links, `stage`).

Guest trees are built here with mkfs.ext4 -d (test_linux_services.tree_image) and judged by tools we
did not write: debugfs (stat of the links), ``e2fsck -fn`` on the extracted partition, ``qemu-img
check``, and the host's ``systemctl --root=TREE is-enabled`` on the tree debugfs rdump extracts.

A ``.wants`` folder of /etc/systemd/system that is a symbolic link to a folder: the guest's systemd
(the manager's drop-in lookup) opens it through the link, so the links in the folder it names start
their units at boot, and ``vhdtool services`` lists such a unit as enabled. ``systemctl --root``
(install.c) does not descend into a linked folder, so the judge is given the tree as the boot reads
it: the linked folder replaced by a copy of what it points to (``as_booted``).

A guest that mounts /var from another partition (/etc/fstab): stage writes the root volume only, where the
booted guest's /var mount hides /var/lib/vhdtool, so the unit could never run install.sh; it is refused,
the image byte-identical. A separate /var/log hides nothing of ours and is staged (debugfs, e2fsck judge).

A file or a dangling link where a parent folder of what stage writes goes: refused before the write (exit
5, byte-identical), not left to libext2fs (which met it mid-commit, exit 4 "run e2fsck").

install.sh run as the unit runs it, in a chroot with busybox as /bin/sh (tests/linux_boot.py), on an
attempts.txt it did not write.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import assert_one_line_error, digest
from fixtures.build.disks import Part, build_raw_disk, mbr_layout, write
from fixtures.build.linux import ubuntu_tree as ubuntu_guest
from fixtures.build.tools import MiB, run
from judges.volumes import partition_volume
from linux_boot import Unavailable, make_guest
from test_ext4_write import debugfs
from test_ext4_write import e2fsck_clean, image_ok, stat_of
from test_linux_services import SYSTEMCTL, extracted, root_volume, systemctl, tree_image
from test_linux_units import ubuntu_tree, unit
from vhdtool.stage.linux_script import LinuxStagedScript
from vhdtool.stage.script import MAX_ATTEMPTS

pytestmark = pytest.mark.fixtures
needs_systemctl = pytest.mark.skipif(SYSTEMCTL is None, reason="systemctl (the judge) is not installed")
WANTS = "/etc/systemd/system/multi-user.target.wants"


def linked_wants_tree(root: Path) -> None:
    """ubuntu_tree (kvp enabled, vss masked) plus an fcopy unit; multi-user.target.wants is a relative link
    to /etc/real-wants, which holds kvp's link and a stale fcopy link to a unit file that is gone."""
    ubuntu_tree(root)
    write(root, "usr/sbin/hv_fcopy_daemon", "#!/bin/sh\n", 0o755)
    write(root, "lib/systemd/system/hv-fcopy-daemon.service", unit("fcopy", "/usr/sbin/hv_fcopy_daemon"))
    etc = root / "etc/systemd/system"
    os.rename(etc / "multi-user.target.wants", root / "etc/real-wants")
    os.symlink("../../real-wants", etc / "multi-user.target.wants")
    os.symlink("/opt/old/hv-fcopy-daemon.service", root / "etc/real-wants/hv-fcopy-daemon.service")


def as_booted(volume: Path, tmp: Path, name: str) -> str:
    """``systemctl --root is-enabled NAME`` on the volume's tree with the linked .wants folder made a real one."""
    tree = extracted(volume, tmp)
    try:
        wants = tree / WANTS.lstrip("/")
        assert wants.is_symlink()
        real = tree / "etc/real-wants"
        wants.unlink()
        shutil.copytree(real, wants, symlinks=True)
        return systemctl(tree, "is-enabled", name)
    finally:
        shutil.rmtree(tree)


def listed(cli, image: Path) -> dict[str, str]:
    code, out, err = cli("services", "--json", image)
    assert code == 0, err
    return {s["name"]: s["start"] for s in json.loads(out)["services"]}


def changed(cli, image: Path, flag: str, name: str) -> list[dict]:
    was = digest(image)
    code, out, err = cli("services", "--json", image, flag, name)
    assert code == 0, err
    files = json.loads(out)["changes"]["files"]
    assert files and digest(image) != was, err
    image_ok(image)
    return files


@needs_systemctl
def test_disable_removes_the_link_in_a_linked_wants_folder(cli, tmp_path):
    # On main: "nothing to change" (exit 0, image unchanged), though `services` lists kvp as enabled and the
    # boot starts it: disable looked only into .wants folders that are real folders.
    image = tree_image(tmp_path, "linked-wants", linked_wants_tree)
    volume = root_volume(image, tmp_path, False)
    assert as_booted(volume, tmp_path, "hv-kvp-daemon.service") == "enabled"
    volume.unlink()
    assert listed(cli, image)["kvp"] == "enabled"
    files = changed(cli, image, "--disable", "kvp")
    assert [(f["action"], f["path"]) for f in files] == [("delete", f"{WANTS}/hv-kvp-daemon.service")]
    volume = root_volume(image, tmp_path, False)
    e2fsck_clean(volume)
    assert as_booted(volume, tmp_path, "hv-kvp-daemon.service") == "disabled"
    # The linked folder stays a link, to the same folder; the stale fcopy link in it is left alone.
    assert stat_of(volume, WANTS)["link"] == "../../real-wants"
    assert stat_of(volume, "/etc/real-wants/hv-fcopy-daemon.service")["link"] == "/opt/old/hv-fcopy-daemon.service"
    assert listed(cli, image)["kvp"] == "disabled"
    # Again: nothing to change, not a byte.
    was = digest(image)
    code, out, err = cli("services", "--json", image, "--disable", "kvp")
    assert code == 0 and json.loads(out)["changes"]["files"] == [] and digest(image) == was, err


@needs_systemctl
def test_enable_replaces_a_stale_link_in_a_linked_wants_folder(cli, tmp_path):
    # On main: refused (exit 5), "multi-user.target.wants is a folder in the guest, not a folder": the folder of
    # the replaced link was offered for removal, and a link to a folder is not one.
    image = tree_image(tmp_path, "linked-wants", linked_wants_tree)
    files = changed(cli, image, "--enable", "fcopy")
    link = f"{WANTS}/hv-fcopy-daemon.service"
    assert [(f["action"], f["path"]) for f in files] == [("delete", link), ("symlink", link)]
    volume = root_volume(image, tmp_path, False)
    e2fsck_clean(volume)
    assert as_booted(volume, tmp_path, "hv-fcopy-daemon.service") == "enabled"
    assert stat_of(volume, WANTS)["link"] == "../../real-wants"
    made = stat_of(volume, "/etc/real-wants/hv-fcopy-daemon.service")
    assert (made["type"], made["uid"], made["link"]) == ("symlink", 0, "/lib/systemd/system/hv-fcopy-daemon.service")
    # Disabling it and kvp empties the linked-to folder: the link to it and the folder both stay.
    files = changed(cli, image, "--disable", "fcopy")
    assert [f["action"] for f in files] == ["delete"]
    files = changed(cli, image, "--disable", "kvp")
    assert [f["action"] for f in files] == ["delete"]
    volume = root_volume(image, tmp_path, False)
    e2fsck_clean(volume)
    assert stat_of(volume, WANTS)["link"] == "../../real-wants"
    assert stat_of(volume, "/etc/real-wants")["type"] == "directory"



def sibling_wants_tree(root: Path) -> None:
    """ubuntu_tree with graphical.target.wants a link to its sibling multi-user.target.wants (kvp's link in it)."""
    ubuntu_tree(root)
    os.symlink("multi-user.target.wants", root / "etc/systemd/system/graphical.target.wants")


@needs_systemctl
def test_disable_deletes_a_link_once_when_two_wants_names_lead_to_its_folder(cli, tmp_path):
    image = tree_image(tmp_path, "sibling-wants", sibling_wants_tree)
    files = changed(cli, image, "--disable", "kvp")
    assert [(f["action"], f["path"]) for f in files] == [("delete", f"{WANTS}/hv-kvp-daemon.service"),
                                                           ("rmdir", WANTS)]
    volume = root_volume(image, tmp_path, False)
    e2fsck_clean(volume)
    tree = extracted(volume, tmp_path)
    assert systemctl(tree, "is-enabled", "hv-kvp-daemon.service") == "disabled"
    assert os.readlink(tree / "etc/systemd/system/graphical.target.wants") == "multi-user.target.wants"



def long_wanted_by_tree(root: Path) -> None:
    """ubuntu_tree plus an fcopy unit WantedBy= a 252-byte target name: its .wants folder's name is 258 bytes."""
    ubuntu_tree(root)
    write(root, "usr/sbin/hv_fcopy_daemon", "#!/bin/sh\n", 0o755)
    write(root, "lib/systemd/system/hv-fcopy-daemon.service",
          "[Service]\nExecStart=/usr/sbin/hv_fcopy_daemon\n[Install]\nWantedBy=" + "a" * 245 + ".target\n")


def test_a_folder_name_longer_than_ext4_allows_is_refused_before_writing(cli, tmp_path):
    # On main: exit 4, "... is not a folder; boot the guest once ... or run e2fsck -f on the volume" (a sound
    # volume called damaged): libext2fs met the name inside the commit.
    image = tree_image(tmp_path, "long", long_wanted_by_tree)
    was = digest(image)
    code, out, err = cli("services", image, "--enable", "fcopy")
    assert_one_line_error(code, out, err, image)
    assert code == 5 and "longer than ext4's 255 bytes" in err and "e2fsck" not in err, err
    assert digest(image) == was


# -- stage on a guest with a separate /var -----------------------------------------------------------

def _guest_without_daemons(root: Path, fstab: str) -> None:
    """The ubuntu-ext4 fixture's tree with its daemons gone (the plan stages linux-cloud-tools-generic), an empty
    /var to mount on, and ``fstab``."""
    ubuntu_guest(root)
    for unit_name in ("hv-kvp-daemon", "hv-vss-daemon"):
        os.unlink(root / f"usr/sbin/{unit_name.replace('-', '_')}")
        os.unlink(root / f"lib/systemd/system/{unit_name}.service")
    shutil.rmtree(root / "var")
    (root / "var").mkdir()
    write(root, "etc/fstab", fstab)


def _ext4(label: str, tree):
    def fill(image: Path, part: Part, work: Path) -> None:
        root = work / f"tree-{label}"
        root.mkdir()
        tree(root)
        run("mkfs.ext4", "-q", "-F", "-b", 4096, "-L", label, "-d", root, image)
    return fill


def two_volume_guest(tmp: Path, fstab: str, var_link: str | None = None) -> Path:
    """A VHDX: partition 1 the root ext4 with ``fstab`` (/var a link to ``var_link``, a folder there, if given),
    partition 2 an ext4 labelled var (log/, lib/)."""
    def root_tree(root: Path) -> None:
        _guest_without_daemons(root, fstab)
        if var_link:
            (root / "var").rmdir()
            (root / var_link.lstrip("/")).mkdir(parents=True)
            os.symlink(var_link, root / "var")

    layout = mbr_layout(96 * MiB, 0x5A7E0B11,
                        Part(start=1 * MiB, size=56 * MiB, filesystem="ext4", mbr_type="83",
                             fill=_ext4("root", root_tree)),
                        Part(start=57 * MiB, size=38 * MiB, filesystem="ext4", mbr_type="83",
                             fill=_ext4("var", lambda r: [(r / d).mkdir() for d in ("log", "lib")])))
    work = tmp / "build"
    work.mkdir()
    raw = build_raw_disk(work, layout)
    image = tmp / "guest.vhdx"
    run("qemu-img", "convert", "-q", "-f", "raw", "-O", "vhdx", "-o", "subformat=dynamic", raw, image)
    shutil.rmtree(work)
    return image


ROOT = "LABEL=root / ext4 defaults 0 1\n"
HIDDEN = {"var": "LABEL=var /var ext4 defaults 0 2\n", "var-slash": "# mounted at boot\nLABEL=var\t/var/\text4 0 2\n",
          "var-lib": "/dev/sda2 /var/lib ext4 defaults 0 2\n"}


HIDDEN["var-linked-to-data"] = "LABEL=var /data ext4 defaults 0 2\n"  # and /var a link to /data/var


@pytest.mark.parametrize("case", sorted(HIDDEN))
def test_stage_refuses_a_guest_that_mounts_var_from_another_volume(cli, tmp_path, case):
    # On main: staged (exit 0) into partition 1's /var, which the guest's /var mount hides at boot.
    image = two_volume_guest(tmp_path, ROOT + "LABEL=swap none swap sw 0 0\n" + HIDDEN[case],
                             var_link="/data/var" if case == "var-linked-to-data" else None)
    was = digest(image)
    code, out, err = cli("stage", image, "--host", "auto")
    assert_one_line_error(code, out, err, image)
    assert code == 5 and "/etc/fstab" in err and "linux-cloud-tools-generic" in err, err
    assert digest(image) == was


def test_stage_with_a_separate_var_log_writes_the_root_volume(cli, tmp_path):
    image = two_volume_guest(tmp_path, ROOT + "LABEL=var /var/log ext4 defaults 0 2\n")
    code, out, err = cli("stage", "--json", image, "--host", "auto")
    assert code == 0 and json.loads(out)["staged"], err
    image_ok(image)
    volume = partition_volume(image, tmp_path, 1)
    e2fsck_clean(volume)
    script = "/var/lib/vhdtool/linux-cloud-tools-generic/install.sh"
    assert (stat_of(volume, script)["type"], stat_of(volume, script)["mode"]) == ("regular", 0o755)
    assert debugfs(volume, f"cat {script}").startswith("#!/bin/sh\n")


# -- install.sh on an attempt count it did not write ---------------------------------------------------

@pytest.mark.parametrize("count", [b"08\n", b"09\n", b"0019\n"])
def test_install_sh_gives_up_on_a_count_with_a_leading_zero(tmp_path, count):
    # On main: sh's arithmetic reads 08 and 09 as bad octal numbers and install.sh stops there (busybox:
    # "arithmetic syntax error", exit 2) before it counts, writes a result or removes its link: the unit
    # fails at every boot, for ever.
    script = LinuxStagedScript("linux-cloud-tools-generic", "apt", ("linux-cloud-tools-generic",), ())
    try:
        g = make_guest(tmp_path / "root", script)
    except Unavailable as e:
        pytest.skip(str(e))
    g.folder.joinpath("attempts.txt").write_bytes(count)
    run_ = g.boot({"apt-get-install": 100})
    assert run_ is not None and run_.returncode == 0, run_.stderr
    lines = g.file("result.txt").decode().splitlines()
    assert lines[:2] == ["exit_code=-1", f"attempts={MAX_ATTEMPTS}"], lines
    assert not os.path.lexists(g.wants_link)
    assert not [c for c in g.calls() if c.program == "apt-get"]


# -- a file or a dangling link where a folder of ours goes ---------------------------------------------------

def _staging_root_file(root: Path) -> None:
    _guest_without_daemons(root, ROOT)
    write(root, "var/lib/vhdtool", "not a folder\n")


def _staging_root_dangling(root: Path) -> None:
    _guest_without_daemons(root, ROOT)
    (root / "var/lib").mkdir(parents=True)
    os.symlink("/nowhere", root / "var/lib/vhdtool")


@pytest.mark.parametrize("tree,what", [(_staging_root_file, "is a file"),
                                       (_staging_root_dangling, "is a symbolic link that leads to no folder")],
                         ids=["file", "dangling-link"])
def test_stage_refuses_a_parent_that_is_not_a_folder_before_writing(cli, tmp_path, tree, what):
    # On main: exit 4, "libext2fs cannot make the folder /var/lib/vhdtool (...); ... run e2fsck -f on the volume"
    # (a sound volume called damaged), from inside the commit.
    image = tree_image(tmp_path, "guest", tree)
    was = digest(image)
    code, out, err = cli("stage", image, "--host", "auto")
    assert_one_line_error(code, out, err, image)
    assert code == 5 and f"/var/lib/vhdtool {what} in the guest" in err and "e2fsck" not in err, err
    assert digest(image) == was
