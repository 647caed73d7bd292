"""`vhdtool services --enable/--disable` on Linux guests: the daemons' systemd links written into ext4.

On copies of the ubuntu-ext4 and debian-lvm-ext4 fixtures, and of images made here with mkfs.ext4 -d
from the RHEL-style and Ubuntu-style trees of test_linux_units (merged /usr through absolute links, a
udev-started daemon, a masked one), each daemon is enabled and disabled through the CLI and judged by
tools we did not write: debugfs (the link is a symlink, its target text, owned by root), ``e2fsck -fn``
on the extracted partition or logical volume, ``qemu-img check``, dissect.extfs over the whole tree
(every path but the changed links and folders keeps content, mode and owner), and what the change
means: the host's ``systemctl --root=TREE is-enabled UNIT`` on the tree debugfs extracts. A second run
changes no byte of the image file; refusals, ``--dry-run`` leave it byte-identical; ``--output`` never
touches it. The crash test kills the writing process at each write and flush of a Linux services
change: the guest is the old one or the new one, e2fsck clean, and running it again completes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import SWEEPS, assert_one_line_error, digest, sweep_points, work_copy
from fixtures.build.disks import Part, build_raw_disk, ext4_fill, mbr_layout
from fixtures.build.tools import MiB, run
from judges.linux import Ext4Volume, ext_tree, resolve
from judges.linux import logical_volumes as judged_lvs
from judges.tools import sh
from judges.volumes import partition_volume
from test_ext4_write import e2fsck_clean, guest_tree, image_ok, stat_of, write_calls
from test_linux_units import etc_dirs, etc_links, rhel_tree, ubuntu_tree

pytestmark = pytest.mark.fixtures
SYSTEMCTL = shutil.which("systemctl")
needs_systemctl = pytest.mark.skipif(SYSTEMCTL is None, reason="systemctl (the judge) is not installed")
CONFIG = "/etc/systemd/system"
WANTS = f"{CONFIG}/multi-user.target.wants"


# -- images -------------------------------------------------------------------------------------

def tree_image(tmp: Path, name: str, tree) -> Path:
    """A VHDX with one MBR partition holding ext4 made by mkfs.ext4 -d from ``tree(root)``."""
    layout = mbr_layout(40 * MiB, 0x5E7A1C2D, Part(start=1 * MiB, size=38 * MiB, filesystem="ext4", mbr_type="83",
                                                   fill=ext4_fill("root", "3c9d5e7f-1a2b-4c3d-8e4f-5a6b7c8d9e0f", tree)))
    work = tmp / f"build-{name}"
    work.mkdir()
    raw = build_raw_disk(work, layout)
    image = tmp / f"{name}.vhdx"
    run("qemu-img", "convert", "-q", "-f", "raw", "-O", "vhdx", "-o", "subformat=dynamic", raw, image)
    shutil.rmtree(work)
    return image


# name: (how to get a writable copy, whether the root is the LVM volume vg0/root)
GUESTS = {
    "ubuntu-ext4": (lambda tmp: work_copy("ubuntu-ext4", tmp), False),
    "debian-lvm-ext4": (lambda tmp: work_copy("debian-lvm-ext4", tmp), True),
    "rhel-ext4": (lambda tmp: tree_image(tmp, "rhel-ext4", rhel_tree), False),
    "ubuntu-masked": (lambda tmp: tree_image(tmp, "ubuntu-masked", ubuntu_tree), False),
}


def root_volume(image: Path, tmp: Path, lvm: bool) -> Path:
    """The guest's root ext4 volume as a file: partition 1, or LVM's vg0/root on it as lvs places it."""
    part = partition_volume(image, tmp, 1)
    if not lvm:
        return part
    _size, volumes = judged_lvs(part, tmp / f"lvs-{time.monotonic_ns()}")
    part.unlink()
    return volumes["vg0/root"][1]


def extracted(volume: Path, tmp: Path) -> Path:
    """The volume's files as debugfs rdump extracts them (links kept as links), in a new folder."""
    tree = tmp / f"tree-{time.monotonic_ns()}"
    tree.mkdir()
    sh("debugfs", "-R", f"rdump / {tree}", volume)
    return tree


def systemctl(tree: Path, *args: str) -> str:
    proc = subprocess.run([SYSTEMCTL, f"--root={tree}", *args], capture_output=True, text=True, timeout=60)
    return proc.stdout.strip() or proc.stderr.strip()


def systemd_says(volume: Path, tmp: Path, unit: str) -> str:
    """``systemctl --root=TREE is-enabled UNIT`` on the volume's files."""
    tree = extracted(volume, tmp)
    try:
        return systemctl(tree, "is-enabled", unit)
    finally:
        shutil.rmtree(tree)


def systemd_config(tree: Path) -> tuple[set[str], dict[str, str]]:
    """/etc/systemd/system of an extracted tree: its folders, and its links with their targets resolved."""
    return etc_dirs(tree), etc_links(tree)


# -- one change, judged ------------------------------------------------------------------------------

def judged_change(cli, image: Path, tmp: Path, lvm: bool, flag: str, name: str, unit: str, want: str) -> dict:
    """``services --json IMAGE --enable|--disable NAME``, then every judge; returns the change set."""
    before_volume = root_volume(image, tmp, lvm)
    before = ext_tree(before_volume)
    expected = None
    if SYSTEMCTL:  # what systemctl itself makes of the same change on the same files
        tree = extracted(before_volume, tmp)
        systemctl(tree, flag[2:], unit)
        expected = systemd_config(tree)
        shutil.rmtree(tree)
    before_volume.unlink()
    code, out, err = cli("services", "--json", image, flag, name)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["committed"] and not doc["dry_run"] and doc["changes"]["registry"] == []
    files = doc["changes"]["files"]
    image_ok(image)
    volume = root_volume(image, tmp, lvm)
    e2fsck_clean(volume)
    after = ext_tree(volume)
    by_action: dict[str, list[dict]] = {}
    for f in files:
        by_action.setdefault(f["action"], []).append(f)
    assert set(by_action) <= {"symlink", "delete", "mkdir", "rmdir"}, files
    links = by_action.get("symlink", []) + by_action.get("delete", [])
    assert links and all(f["path"].startswith(CONFIG + "/") and f["path"].endswith("/" + unit) for f in links)
    for f in by_action.get("symlink", []):
        made = stat_of(volume, f["path"])  # debugfs: a symlink, root's, pointing at the unit file by absolute path
        assert (made["type"], made["uid"], made["gid"], made["link"]) == ("symlink", 0, 0, f["target"]), made
        assert f["target"].startswith("/") and f["target"].endswith("/" + unit)
        real = resolve(Ext4Volume(volume), f["target"])
        assert real is not None and Ext4Volume(volume).kind(real) == "regular", f["target"]
    for f in by_action.get("delete", []):
        assert f["path"] not in after and before[f["path"]][0] == "link" and before[f["path"]][4] == f["target"]
    for f in by_action.get("mkdir", []):
        assert f["path"] not in before and after[f["path"]][:4] == ("dir", 0o755, 0, 0)
    for f in by_action.get("rmdir", []):
        assert before[f["path"]][0] == "dir" and f["path"] not in after
    # Every other path keeps its kind, content, mode and owner; nothing else appears or goes.
    changed = {f["path"] for f in files}
    assert {p: v for p, v in before.items() if p not in changed} == {p: v for p, v in after.items() if p not in changed}
    assert set(after) - set(before) == {f["path"] for f in files if f["action"] in ("symlink", "mkdir")}
    assert set(before) - set(after) == {f["path"] for f in files if f["action"] in ("delete", "rmdir")}
    if SYSTEMCTL:
        tree = extracted(volume, tmp)
        assert systemctl(tree, "is-enabled", unit) == want
        assert systemd_config(tree) == expected
        shutil.rmtree(tree)
    volume.unlink()
    # The same command again: nothing to change, not a byte of the image file.
    was = digest(image)
    code, out, err = cli("services", "--json", image, flag, name)
    assert code == 0 and json.loads(out)["changes"]["files"] == [] and "nothing to change" in err
    assert digest(image) == was
    return doc


# (guest, the name given, the unit, its state before): each daemon is set the other way and back.
CASES = [
    ("ubuntu-ext4", "kvp", "hv-kvp-daemon.service", "disabled"),
    ("ubuntu-ext4", "hv_vss_daemon", "hv-vss-daemon.service", "disabled"),
    ("debian-lvm-ext4", "vmickvpexchange", "hyperv-daemons.hv-kvp-daemon.service", "disabled"),
    ("rhel-ext4", "vmicguestinterface", "hypervfcopyd.service", "enabled"),
    ("rhel-ext4", "hypervfcopyd", "hypervfcopyd.service", "enabled"),
    ("ubuntu-masked", "hv-kvp-daemon", "hv-kvp-daemon.service", "enabled"),
]


@pytest.mark.parametrize("guest,name,unit,state", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_enable_and_disable_each_daemon(cli, tmp_path, guest, name, unit, state):
    make, lvm = GUESTS[guest]
    image = make(tmp_path)
    if SYSTEMCTL:
        volume = root_volume(image, tmp_path, lvm)
        assert systemd_says(volume, tmp_path, unit) == state
        volume.unlink()
    first, then = ("--disable", "--enable") if state == "enabled" else ("--enable", "--disable")
    other = "disabled" if state == "enabled" else "enabled"
    one = judged_change(cli, image, tmp_path, lvm, first, name, unit, other)
    two = judged_change(cli, image, tmp_path, lvm, then, name, unit, state)
    # Enabling makes the folders the link needs; disabling removes those it empties (as systemctl does):
    # the links and .wants folders end as they began.
    made = {f["path"] for f in one["changes"]["files"] + two["changes"]["files"] if f["action"] in ("mkdir", "symlink")}
    gone = {f["path"] for f in one["changes"]["files"] + two["changes"]["files"] if f["action"] in ("rmdir", "delete")}
    assert {p for p in made if p.startswith(WANTS)} == {p for p in gone if p.startswith(WANTS)}


def test_several_daemons_in_one_commit(cli, tmp_path):
    image = work_copy("ubuntu-ext4", tmp_path)
    # Two names of one daemon (kvp, hv_kvp_daemon) make one link.
    code, out, err = cli("services", "--json", image, "--enable", "kvp", "--enable", "vss", "--enable", "hv_kvp_daemon")
    assert code == 0, err
    assert [f["action"] for f in json.loads(out)["changes"]["files"]].count("symlink") == 2
    # Disabling both empties the .wants folder that neither plan empties alone: it goes too.
    code, out, err = cli("services", "--json", image, "--disable", "kvp", "--disable", "hv-vss-daemon.service")
    assert code == 0, err
    files = json.loads(out)["changes"]["files"]
    assert {(f["action"], f["path"]) for f in files} == {
        ("delete", f"{WANTS}/hv-kvp-daemon.service"), ("delete", f"{WANTS}/hv-vss-daemon.service"), ("rmdir", WANTS)}
    image_ok(image)
    volume = root_volume(image, tmp_path, False)
    e2fsck_clean(volume)
    tree = ext_tree(volume)
    assert WANTS not in tree and tree[CONFIG][:4] == ("dir", 0o755, 0, 0)
    if SYSTEMCTL:
        assert systemd_says(volume, tmp_path, "hv-kvp-daemon.service") == "disabled"


def test_rmdir_removes_only_a_folder_left_empty(tmp_path):
    import vhdtool
    from vhdtool.errors import UnsupportedLayout

    image = work_copy("ubuntu-ext4", tmp_path)
    volume = root_volume(image, tmp_path, False)
    before, root_links = ext_tree(volume), stat_of(volume, "/")["links"]
    volume.unlink()
    was = digest(image)
    for path in ("/etc", "/etc/hostname"):  # not empty; not a folder
        with pytest.raises(UnsupportedLayout), vhdtool.edit(image) as ed:
            ed.rmdir(path)
        assert digest(image) == was
    with vhdtool.edit(image) as ed:
        assert ed.rmdir("/nowhere") is None
        assert ed.rmdir("/tmp").action == "rmdir"
    image_ok(image)
    volume = root_volume(image, tmp_path, False)
    e2fsck_clean(volume)  # the inode, its block and the parent's link count are all accounted for
    after = ext_tree(volume)
    assert stat_of(volume, "/")["links"] == root_links - 1
    assert {p: v for p, v in before.items() if p != "/tmp"} == after


# -- refusals and nothing-to-do ----------------------------------------------------------------------

def refused(cli, image: Path, *args: str) -> tuple[int, str]:
    was = digest(image)
    code, out, err = cli("services", image, *args)
    assert_one_line_error(code, out, err, image)
    assert digest(image) == was
    return code, err


def test_masked_unknown_and_missing_are_refused_byte_identical(cli, tmp_path):
    masked = GUESTS["ubuntu-masked"][0](tmp_path)
    for flag in ("--enable", "--disable"):
        code, err = refused(cli, masked, flag, "vss")
        assert code == 5 and "masked" in err and "unmask" in err, err
    # One refused daemon refuses the whole command: the other's change is not written either.
    code, err = refused(cli, masked, "--disable", "kvp", "--enable", "vss")
    assert code == 5 and "masked" in err
    image = work_copy("ubuntu-ext4", tmp_path)
    code, err = refused(cli, image, "--enable", "vmicnothing")
    assert code == 5 and "vmickvpexchange" in err
    code, err = refused(cli, image, "--enable", "fcopy")  # no fcopy unit in this guest
    assert code == 5 and "hv-fcopy-daemon.service" in err
    code, err = refused(cli, image, "--enable", "kvp", "--disable", "vmickvpexchange")
    assert code == 5 and "same daemon" in err


def test_udev_started_and_windows_only_names_need_nothing(cli, tmp_path):
    rhel = GUESTS["rhel-ext4"][0](tmp_path)
    was = digest(rhel)
    code, out, err = cli("services", "--json", rhel, "--enable", "kvp", "--enable", "vss")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["changes"]["files"] == [] and not doc["committed"] and "nothing to change" in err
    notes = " ".join(doc["notes"])
    assert "udev starts hypervkvpd.service" in notes and "static" in notes
    code, out, err = cli("services", rhel, "--enable", "kvp")
    assert code == 0 and "note     udev starts hypervkvpd.service" in out
    # A daemon udev starts is not disabled by links: refused, with the way that works.
    code, err = refused(cli, rhel, "--disable", "kvp")
    assert code == 5 and "udev" in err and "systemctl mask" in err
    assert digest(rhel) == was
    # A mixed fleet's command: the Windows-only service is passed by with a note, the rest is done.
    image = work_copy("ubuntu-ext4", tmp_path)
    code, out, err = cli("services", "--json", image, "--disable", "vmictimesync", "--enable", "vmickvpexchange")
    assert code == 0, err
    doc = json.loads(out)
    assert [f["path"] for f in doc["changes"]["files"] if f["action"] == "symlink"] == \
        [f"{WANTS}/hv-kvp-daemon.service"]
    assert any("vmictimesync has no Linux daemon" in n and "hv_utils" in n for n in doc["notes"])
    was = digest(image)
    code, out, err = cli("services", image, "--disable", "vmictimesync", "--disable", "vmicheartbeat")
    assert code == 0 and "nothing to change" in err and "vmicheartbeat has no Linux daemon" in out
    assert digest(image) == was


def test_an_xfs_root_is_answered_but_never_written(cli, tmp_path):
    image = work_copy("rhel-xfs", tmp_path)
    code, err = refused(cli, image, "--disable", "vmictimesync", "--enable", "vmickvpexchange")
    assert code == 5 and "xfs" in err and "systemctl enable hypervkvpd.service" in err
    # What needs no link is still answered: a Windows-only name, a daemon already disabled.
    was = digest(image)
    code, out, err = cli("services", image, "--disable", "vmictimesync", "--disable", "kvp")
    assert code == 0 and "vmictimesync has no Linux daemon" in out and "nothing to change" in err
    assert digest(image) == was


def test_dry_run_and_output(cli, tmp_path):
    image = work_copy("debian-lvm-ext4", tmp_path)
    was = digest(image)
    code, out, err = cli("services", "--json", "--dry-run", image, "--enable", "kvp")
    assert code == 0, err
    doc = json.loads(out)
    link = f"{WANTS}/hyperv-daemons.hv-kvp-daemon.service"
    assert doc["dry_run"] and not doc["committed"] and doc["bytes_written"] == 0
    assert {"path": link, "action": "symlink", "size": None, "sha256": None, "partition": 1,
            "target": "/lib/systemd/system/hyperv-daemons.hv-kvp-daemon.service"} in doc["changes"]["files"]
    code, out, err = cli("services", "--dry-run", image, "--enable", "kvp")
    assert code == 0 and "would change" in out and f"symlink  {link} -> /lib/systemd/system/" in out
    assert digest(image) == was
    new = tmp_path / "new.vhdx"
    code, out, err = cli("services", "--json", "--output", new, image, "--enable", "kvp")
    assert code == 0, err
    assert json.loads(out)["output"] == str(new) and digest(image) == was
    image_ok(new)
    volume = root_volume(new, tmp_path, True)
    e2fsck_clean(volume)
    assert stat_of(volume, link)["link"] == "/lib/systemd/system/hyperv-daemons.hv-kvp-daemon.service"
    if SYSTEMCTL:
        assert systemd_says(volume, tmp_path, "hyperv-daemons.hv-kvp-daemon.service") == "enabled"


# -- a mixed fleet -----------------------------------------------------------------------------------

def test_batch_services_over_a_mixed_fleet(cli, tmp_path):
    from test_services import start_values, system_files

    fleet = tmp_path / "fleet"
    fleet.mkdir()
    windows, linux = work_copy("ws2008r2-x64", fleet), work_copy("ubuntu-ext4", fleet)
    before = start_values(system_files(windows, tmp_path, 2)["SYSTEM"], tmp_path, 1, ("vmictimesync", "vmickvpexchange"))
    report = tmp_path / "report.jsonl"
    root = Path(__file__).resolve().parent.parent
    res = subprocess.run([sys.executable, "-m", "vhdtool.cli.main", "batch", "services", "--disable", "vmictimesync",
                          "--enable", "vmickvpexchange", "--report", str(report), "-j", "2", str(windows), str(linux)],
                         capture_output=True, text=True, timeout=300, env={**os.environ,
                                                                           "PYTHONPATH": str(root)})
    assert res.returncode == 0, res.stderr
    records = {Path(r["image"]).name: r for r in map(json.loads, report.read_text().splitlines())}
    assert {n: r["outcome"] for n, r in records.items()} == {windows.name: "ok", linux.name: "ok"}
    win = records[windows.name]["result"]["changes"]
    assert {r["key"].rsplit("\\", 1)[-1] for r in win["registry"]} == \
        {"vmictimesync"} | ({"vmickvpexchange"} if before["vmickvpexchange"] != 3 else set())
    after = start_values(system_files(windows, tmp_path, 2)["SYSTEM"], tmp_path, 1, ("vmictimesync", "vmickvpexchange"))
    assert after == {"vmictimesync": 4, "vmickvpexchange": 3}
    lx = records[linux.name]["result"]
    assert [f["path"] for f in lx["changes"]["files"] if f["action"] == "symlink"] == [f"{WANTS}/hv-kvp-daemon.service"]
    assert any("vmictimesync" in n for n in lx["notes"])
    # The other way round: a Linux daemon's name on a Windows guest is the Windows service of the same IC.
    code, out, err = cli("services", "--json", "--dry-run", windows, "--disable", "hv_vss_daemon")
    assert code == 0, err
    assert [r["key"].rsplit("\\", 1)[-1] for r in json.loads(out)["changes"]["registry"]] == ["vmicvss"]
    image_ok(linux)
    volume = root_volume(linux, tmp_path, False)
    e2fsck_clean(volume)
    if SYSTEMCTL:
        assert systemd_says(volume, tmp_path, "hv-kvp-daemon.service") == "enabled"


# -- crash safety ------------------------------------------------------------------------------------

JOB = Path(__file__).resolve().parent / "linux_services_job.py"


def job(*args: str, inject: str | None = None) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": f"{root}"}
    trace = ["strace", "-f", "-o", "/dev/null", "-e", inject] if inject else []
    return subprocess.run([*trace, sys.executable, str(JOB), *args], capture_output=True, env=env, timeout=120)


@pytest.mark.parametrize("sweep", SWEEPS)
def test_kill_at_every_write_and_flush(cli, tmp_path, sweep):
    """SIGKILL at each pwrite64 and fsync of ``services --disable kvp --disable vss`` (two links removed and
    their .wants folder): the guest is the old one or the new one, e2fsck clean, and the command run again
    completes to the new one."""
    original = work_copy("ubuntu-ext4", tmp_path)
    code, _out, err = cli("services", original, "--enable", "kvp", "--enable", "vss")
    assert code == 0, err
    old = guest_tree(original, tmp_path, replay=True)
    probe = tmp_path / "probe.vhdx"
    shutil.copyfile(original, probe)
    counts = write_calls(probe, JOB)
    new = guest_tree(probe, tmp_path, replay=True)
    assert f"{WANTS}/hv-kvp-daemon.service" in old and WANTS not in new
    points = sweep_points([(name, n) for name, total in counts.items() for n in range(1, total + 1)], sweep)
    assert len(points) >= 6, counts
    outcomes = {"old": 0, "new": 0}
    victim = tmp_path / "victim.vhdx"
    for name, n in points:
        shutil.copyfile(original, victim)
        res = job(str(victim), inject=f"inject={name}:signal=KILL:when={n}")
        assert res.returncode != 0, (name, n)
        tree = guest_tree(victim, tmp_path, replay=True)
        assert tree in (old, new), (name, n)
        outcomes["old" if tree == old else "new"] += 1
        again = job(str(victim))
        assert again.returncode == 0, (name, n, again.stderr)
        assert guest_tree(victim, tmp_path, replay=False) == new, (name, n)
    assert outcomes["old"] and outcomes["new"], outcomes
    print(f"\nLinux services change: {len(points)} kill points of {counts}, outcomes {outcomes}")
