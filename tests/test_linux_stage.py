"""`vhdtool stage` and `vhdtool status` on Linux guests, end to end: staged into an image, booted in a
simulation, read back from the image.

Images: copies of the debian-lvm-ext4 fixture (no VSS daemon: the plan stages hyperv-daemons with apt)
and of ubuntu-ext4 with its daemons and their units removed by debugfs (the plan stages
linux-cloud-tools-generic).

What stage wrote is judged by tools we did not write: debugfs (content, mode, owner, link target) and
``e2fsck -fn`` on the root volume cut out of qemu-img's raw conversion (through the LVM tools,
read-only, for the LVM guest), ``qemu-img check``, and dissect.extfs for every other path
(``judges.linux.ext_tree``: content, mode and owner unchanged).

A boot (``boot``): the root volume's tree is extracted with ``debugfs rdump``; busybox and the stub
package manager and systemctl are added (tests/linux_boot.py); the unit's ExecStart runs in a chroot
of it; the ``systemctl enable`` calls the script made are replayed on the tree by the host's own
``systemctl --root`` (which makes the links from each unit's [Install] section); and every change
to the guest's files, the simulation's own files left out, is written back into the volume with
``debugfs -w`` and the volume into the image with qemu-img. The write-back is e2fsprogs', not
vhdtool's: the image status then reads holds what another ext4 writer (as the guest's kernel would)
left, so a fault of vhdtool's writer cannot hide one of its reader, or the reverse.

Crash safety: `vhdtool stage` killed (SIGKILL, injected by strace) at its writes and flushes leaves
the old guest tree or the staged one, e2fsck clean after QEMU replays the VHDX log.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import FULL, SWEEPS, assert_one_line_error, digest, sweep_points, work_copy
from judges.disks import blkid_type, copy_range
from judges.linux import ext_tree, logical_volumes
from judges.tools import sh
from judges.volumes import extract_partition, partition_table, raw_image
from linux_boot import LinuxGuest, Unavailable, add_simulation
from test_ext4_write import e2fsck_clean, image_ok, present, stat_of, unchanged_but
from vhdtool.stage.linux_script import LinuxStagedScript, render_script, render_unit

pytestmark = pytest.mark.fixtures
WANTS = "/etc/systemd/system/multi-user.target.wants"
FAIL = {"apt-get-install": 100}


def daemon_unit(daemon: str) -> str:
    return (f"[Unit]\nDescription=Hyper-V {daemon.split('_')[1].upper()} Protocol Daemon\n"
            "ConditionVirtualization=microsoft\n\n"
            f"[Service]\nExecStart=/usr/sbin/{daemon} -n\n\n[Install]\nWantedBy=multi-user.target\n")


DAEMONS = ("hv_kvp_daemon", "hv_vss_daemon", "hv_fcopy_daemon")


@dataclass(frozen=True)
class GuestKind:
    fixture: str
    package: str
    units: tuple[str, ...]  # what the package installs (under /lib/systemd/system), and the script enables

    def payload(self) -> dict[str, tuple[bytes, int]]:
        """The package's files as its install unpacks them: the daemons and their units."""
        files = {f"usr/sbin/{d}": (b"#!/bin/sh\nexec sleep 1000000\n", 0o755) for d in DAEMONS}
        files.update({f"lib/systemd/system/{u}": (daemon_unit(d).encode(), 0o644) for u, d in zip(self.units, DAEMONS)})
        return files


DEBIAN = GuestKind("debian-lvm-ext4", "hyperv-daemons", tuple(f"hyperv-daemons.{d.replace('_', '-')}.service"
                                                              for d in DAEMONS))
UBUNTU = GuestKind("ubuntu-ext4", "linux-cloud-tools-generic", ("hv-kvp-daemon.service", "hv-vss-daemon.service",
                                                                 "hv-fcopy-daemon.service"))


# -- the root volume inside an image -----------------------------------------------------------------

@dataclass
class Located:
    raw: Path  # qemu-img's raw conversion of the image
    offset: int  # where the root volume starts in it
    volume: Path  # the root volume, cut out of it


def locate(image: Path, tmp: Path) -> Located:
    """The root ext4 volume of ``image``: partition 1, or the LVM volume on it that holds /etc/os-release."""
    work = tmp / f"locate-{time.monotonic_ns()}"
    work.mkdir()
    raw = raw_image(image, work / "disk.raw")
    table = partition_table(raw)
    part = table["partitions"][0]
    start = part["start"] * table.get("sectorsize", 512)
    volume = extract_partition(raw, 1, work / "p1")
    if part["type"] != "8e":
        return Located(raw, start, volume)
    _size, volumes = logical_volumes(volume, work)
    roots = [(offset, lv) for offset, lv in volumes.values()
             if blkid_type(lv) == "ext4" and present(lv, "/etc/os-release")]
    assert len(roots) == 1, volumes
    return Located(raw, start + roots[0][0], roots[0][1])


def put_back(image: Path, loc: Located) -> None:
    """The (changed) volume written into the raw disk at its place, and the raw disk made the image again."""
    sh("dd", f"if={loc.volume}", f"of={loc.raw}", "bs=1M", f"seek={loc.offset}", "oflag=seek_bytes",
       "conv=notrunc", "status=none")
    new = loc.raw.with_suffix(".vhdx")
    sh("qemu-img", "convert", "-f", "raw", "-O", "vhdx", "-o", "subformat=dynamic", loc.raw, new)
    os.replace(new, image)
    shutil.rmtree(loc.raw.parent)


def debugfs_write(volume: Path, requests: list[str]) -> None:
    """Run debugfs -w requests; any error message fails the test (debugfs itself exits 0)."""
    script = volume.with_suffix(".requests")
    script.write_text("\n".join(requests) + "\n")
    proc = sh("debugfs", "-w", "-f", script, volume)
    errors = [line for line in proc.stderr.decode().splitlines() if not line.startswith("debugfs ")]
    assert not errors, errors


def guest_image(kind: GuestKind, tmp: Path) -> Path:
    image = work_copy(kind.fixture, tmp)
    if kind is UBUNTU:  # the fixture has the daemons: take them away, as a guest without them would be
        loc = locate(image, tmp)
        debugfs_write(loc.volume, [f"rm /usr/sbin/{d}" for d in DAEMONS[:2]]
                      + [f"rm /lib/systemd/system/{u}" for u in kind.units[:2]])
        e2fsck_clean(loc.volume)
        put_back(image, loc)
    return image


# -- the guest tree, a simulated boot, and the write-back ---------------------------------------------

def snapshot(root: Path, skip: set[str]) -> dict[str, tuple]:
    """guest path -> (kind, mode, uid, gid, sha256 or link target) of a tree, ``skip`` and /stub left out."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            host = Path(folder) / name
            path = "/" + str(host.relative_to(root))
            if path in skip or path == "/stub" or path.startswith("/stub/"):
                continue
            st = os.lstat(host)
            if stat.S_ISLNK(st.st_mode):
                what = ("link", os.readlink(host))
            elif stat.S_ISDIR(st.st_mode):
                what = ("dir", None)
            elif stat.S_ISREG(st.st_mode):
                what = ("file", hashlib.sha256(host.read_bytes()).hexdigest())
            else:
                what = ("other", None)
            out[path] = (what[0], stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, what[1])
    return out


def write_back_requests(root: Path, before: dict, after: dict) -> list[str]:
    """debugfs requests that make the volume's tree ``after`` where it was ``before``."""
    requests = []
    for path in sorted(after, key=lambda p: (p.count("/"), p)):
        new, old = after[path], before.get(path)
        if new == old:
            continue
        kind, mode, uid, gid, what = new
        parent, name = path.rsplit("/", 1)
        if old is not None and not (kind == old[0] == "dir"):
            requests.append(f"rm {path}")
        requests.append(f"cd {parent or '/'}")
        if kind == "dir":
            if old is None:
                requests.append(f"mkdir {name}")
            requests.append(f"sif {path} mode 0{stat.S_IFDIR | mode:o}")
        elif kind == "file":
            requests += [f"write {root / path.lstrip('/')} {name}", f"sif {path} mode 0{stat.S_IFREG | mode:o}"]
        elif kind == "link":
            requests.append(f"symlink {name} {what}")
        else:
            raise AssertionError(f"{path}: the boot made a special file")
        if kind != "link":
            requests += [f"sif {path} uid {uid}", f"sif {path} gid {gid}"]
    for path in sorted(set(before) - set(after), key=lambda p: -p.count("/")):
        requests.append(f"rmdir {path}" if before[path][0] == "dir" else f"rm {path}")
    return requests


def boot(image: Path, tmp: Path, script: LinuxStagedScript, payload: dict, rc: dict | None = None):
    """One boot of the guest in ``image``; what it changed is written back. Returns (the run or None, the calls)."""
    if shutil.which("systemctl") is None:
        pytest.skip("systemctl (systemd), which makes the links `systemctl enable` asks for, is not installed")
    loc = locate(image, tmp)
    root = loc.volume.parent / "root"
    root.mkdir()
    sh("debugfs", "-R", f"rdump / {root}", loc.volume)
    before = snapshot(root, set())
    try:
        skip = add_simulation(root)
    except Unavailable as e:
        pytest.skip(str(e))
    for rel, (data, mode) in payload.items():
        path = root / "stub/payload" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(mode)
    guest = LinuxGuest(root, script)
    run = guest.boot(rc)
    calls = guest.calls()
    for call in calls:  # systemctl enable, as the guest's own systemctl would have done it
        if call.program == "systemctl" and "enable" in call.args:
            sh("systemctl", f"--root={root}", "enable", call.args[-1])
    after = snapshot(root, skip)
    requests = write_back_requests(root, before, after)
    if requests:
        debugfs_write(loc.volume, requests)
    e2fsck_clean(loc.volume)
    put_back(image, loc)
    return run, calls


# -- driving vhdtool -------------------------------------------------------------------------------------

def cli_json(cli, *args) -> dict:
    code, out, err = cli(*args, "--json")
    assert code == 0, err
    return json.loads(out)


def status(cli, image: Path) -> dict:
    doc = cli_json(cli, "status", image)
    assert set(doc) == {"schema", "image", "state", "staged", "ic_version", "ic_source", "cbs"}
    assert doc["cbs"] is None and all(s["cbs"] is None for s in doc["staged"])  # Windows' servicing record only
    return doc


def staged_script(doc: dict) -> LinuxStagedScript:
    return LinuxStagedScript(doc["id"], doc["package_manager"], tuple(doc["packages"]), tuple(doc["units"]))


def judge_staged(image: Path, tmp: Path, doc: dict, before: dict) -> None:
    """What stage wrote, read back by debugfs, e2fsck, qemu-img and dissect.extfs."""
    image_ok(image)
    volume = locate(image, tmp).volume
    e2fsck_clean(volume)
    s = staged_script(doc)
    expected = {s.script_path: (render_script(s), 0o755), s.unit_path: (render_unit(s), 0o644)}
    for path, (data, mode) in expected.items():
        got = stat_of(volume, path)
        assert (got["type"], got["mode"], got["uid"], got["gid"]) == ("regular", mode, 0, 0), path
        assert sh("debugfs", "-R", f"cat {path}", volume).stdout == data
    assert [(f["path"], f["sha256"]) for f in doc["files"]] == [
        (p, hashlib.sha256(d).hexdigest()) for p, (d, _) in expected.items()]
    link = stat_of(volume, s.wants_link)
    assert (link["type"], link["uid"], link["gid"]) == ("symlink", 0, 0)
    assert link_target(volume, s.wants_link) == s.unit_path
    assert doc["boot_hook"] == {"kind": "systemd-unit", "command": f"/bin/sh {s.script_path}", "unit": s.unit_name,
                                "link": s.wants_link, "target": s.unit_path}
    after = ext_tree(volume)
    added = {s.script_path, s.unit_path, s.wants_link}
    added |= {p for path in added for p in _parents(path) if p not in before}
    unchanged_but(before, after, set(), added)


def link_target(volume: Path, path: str) -> str:
    """A symlink's target as debugfs reads it: from the inode (a fast link) or from its block."""
    got = stat_of(volume, path)
    assert got["type"] == "symlink", got["text"]
    return got["link"] if got["link"] is not None else sh("debugfs", "-R", f"cat {path}", volume).stdout.decode()


def _parents(path: str) -> list[str]:
    parts = path.split("/")[1:-1]
    return ["/" + "/".join(parts[:i]) for i in range(1, len(parts) + 1)]


# -- the tests -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", [DEBIAN, UBUNTU], ids=lambda k: k.fixture)
def test_stage_writes_the_script_unit_and_link(cli, tmp_path, kind):
    image = guest_image(kind, tmp_path)
    plan = cli_json(cli, "plan", image, "--host", "auto")
    assert (plan["action"], plan["packages"], plan["package_manager"]) == ("stage", [kind.package], "apt")
    assert status(cli, image)["state"] == "none"
    before = ext_tree(locate(image, tmp_path).volume)
    # --dry-run and --output leave the image as it was.
    was = digest(image)
    dry = cli_json(cli, "stage", image, "--host", "auto", "--dry-run")
    assert dry["dry_run"] and not dry["committed"] and not dry["staged"] and dry["changes"]["files"]
    out = tmp_path / "copy.vhdx"
    copy = cli_json(cli, "stage", image, "--host", "auto", "--output", out)
    assert copy["output"] == str(out) and copy["committed"] and digest(image) == was
    judge_staged(out, tmp_path, copy, before)
    doc = cli_json(cli, "stage", image, "--host", "win10")
    assert doc["staged"] and doc["committed"] and doc["id"] == kind.package
    assert [(c["path"], c["action"]) for c in doc["changes"]["files"] if c["action"] != "mkdir"] == [
        (f"/var/lib/vhdtool/{kind.package}/install.sh", "add"),
        (f"/etc/systemd/system/vhdtool-{kind.package}.service", "add"),
        (f"{WANTS}/vhdtool-{kind.package}.service", "symlink")]
    judge_staged(image, tmp_path, doc, before)
    # The same staging, pending: staging again changes nothing, and says so.
    was = digest(image)
    code, out_text, err = cli("stage", image, "--host", "auto")
    assert code == 0 and f"already staged {kind.package}" in out_text, err
    assert f"{WANTS}/vhdtool-{kind.package}.service -> /etc/systemd/system/vhdtool-{kind.package}.service" in out_text
    assert digest(image) == was
    st = status(cli, image)
    assert st["state"] == "pending" and [s["id"] for s in st["staged"]] == [kind.package]
    assert (st["ic_version"], st["ic_source"]) == (None, None)


def test_a_guest_with_the_daemons_gets_nothing(cli, tmp_path):
    image = work_copy("ubuntu-ext4", tmp_path)
    was = digest(image)
    code, out, err = cli("stage", image, "--host", "auto")
    assert code == 0, err
    assert "action     none" in out and "the KVP and VSS daemons are installed" in out
    assert digest(image) == was and status(cli, image)["state"] == "none"


OUTCOMES = {  # the stub package manager's exit code at each boot, and what status says after the last
    "success": ([None], "installed", 0, 1),
    "failure-then-success": ([FAIL, None], "installed", 0, 2),
    "three-failures": ([FAIL, FAIL, FAIL], "failed", 100, 3),
}


@pytest.mark.parametrize("kind", [DEBIAN, UBUNTU], ids=lambda k: k.fixture)
@pytest.mark.parametrize("outcome", sorted(OUTCOMES))
def test_boots_and_status(cli, tmp_path, kind, outcome):
    boots, final, exit_code, attempts = OUTCOMES[outcome]
    image = guest_image(kind, tmp_path)
    doc = cli_json(cli, "stage", image, "--host", "auto")
    script = staged_script(doc)
    assert status(cli, image)["staged"][0]["state"] == "pending"
    for n, rc in enumerate(boots, 1):
        run, calls = boot(image, tmp_path, script, kind.payload(), rc)
        assert run is not None and run.returncode == 0, run and run.stderr
        st = status(cli, image)
        (one,) = st["staged"]
        volume = locate(image, tmp_path).volume
        e2fsck_clean(volume)
        if n < len(boots):  # failed, attempts left: the unit runs again at the next boot
            assert (st["state"], one["attempts"], one["exit_code"]) == ("running", n, None)
            assert link_target(volume, script.wants_link) == script.unit_path
    assert (st["state"], one["exit_code"], one["attempts"]) == (final, exit_code, attempts)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", one["finished"])
    assert any(line.endswith(f"] exit code {exit_code}") for line in one["log_tail"]), one["log_tail"]
    assert not present(volume, script.wants_link)  # the hook is gone: no boot loop
    assert present(volume, script.unit_path) and present(volume, script.script_path)
    enabled = [c.args[-1] for c in calls if c.program == "systemctl"]
    services = {s["name"]: s for s in cli_json(cli, "services", image)["services"]}
    plan = cli_json(cli, "plan", image, "--host", "auto")
    if final == "installed":
        assert enabled == list(kind.units)
        for name, unit in zip(("kvp", "vss", "fcopy"), kind.units):
            assert (services[name]["unit"], services[name]["start"]) == (unit, "enabled")
            assert link_target(volume, f"{WANTS}/{unit}") == f"/lib/systemd/system/{unit}"
        assert (plan["method"], plan["action"]) == ("up-to-date", "none")
    else:
        assert enabled == [] and plan["action"] == "stage"
        assert "stub apt-get install: exit 100" in one["log_tail"]
        # Staging again after the last failure starts the attempts afresh (install.log is kept).
        again = cli_json(cli, "stage", image, "--host", "auto")
        removed = {(c["path"], c["action"]) for c in again["changes"]["files"]}
        assert removed >= {(f"{script.folder}/result.txt", "delete"), (f"{script.folder}/attempts.txt", "delete"),
                           (script.wants_link, "symlink")}
        st = status(cli, image)
        assert st["state"] == "pending" and st["staged"][0]["log_tail"]
        run, _ = boot(image, tmp_path, script, kind.payload())
        assert status(cli, image)["staged"][0]["state"] == "installed"


def test_another_enabled_staging_is_refused(cli, tmp_path):
    import vhdtool

    image = work_copy("debian-lvm-ext4", tmp_path)
    other = LinuxStagedScript("linux-cloud-tools-azure", "apt", ("linux-cloud-tools-azure",), ())
    with vhdtool.edit(image) as ed:
        ed.write_file(other.script_path, render_script(other), mode=0o755)
        ed.write_file(other.unit_path, render_unit(other))
        ed.symlink(other.wants_link, other.unit_path)
    was = digest(image)
    result = cli("stage", image, "--host", "auto")
    assert_one_line_error(*result, image)
    assert result[0] == 20 and "linux-cloud-tools-azure" in result[2] and digest(image) == was


def test_batch_stage_and_status_over_a_mixed_fleet(tmp_path):
    from conftest import ROOT
    from fixtures.cabs import CabSpec, build_iso

    folder = tmp_path / "fleet"
    folder.mkdir()
    for name in ("ws2008r2-x64", "debian-lvm-ext4", "ubuntu-ext4"):
        shutil.copyfile(work_copy(name, tmp_path), folder / f"{name}.vhdx")
    iso = build_iso([CabSpec("6.1", "x64", "6.2.9200.16384")], tmp_path / "vmguest.iso")
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def vhdtool(*args):
        import sys

        return subprocess.run([sys.executable, "-m", "vhdtool.cli.main", *map(str, args)], capture_output=True,
                              text=True, env=env, timeout=300)

    stage_report, status_report = tmp_path / "stage.jsonl", tmp_path / "status.jsonl"
    run = vhdtool("batch", "stage", f"{folder}/*", "--host", "win8", "--cabs", iso, "--jobs", "2",
                  "--report", stage_report)
    assert run.returncode == 0, run.stderr
    run = vhdtool("batch", "status", f"{folder}/*", "--jobs", "2", "--report", status_report)
    assert run.returncode == 0, run.stderr
    doc = json.loads(vhdtool("report", stage_report, status_report, "--json").stdout)
    assert doc["outcomes"] == {"ok": 6, "failed": 0}
    assert doc["by_method"] == {"integration-services-disk (staged)": 1, "package-manager (staged)": 1,
                                "up-to-date (none)": 1, "status pending": 2, "status none": 1}


def test_what_is_not_a_staging_folder(cli, tmp_path):
    """Names under /var/lib/vhdtool that are a file or a link loop are nobody's staging; a file where the
    staging folder goes is refused (exit 5), the image byte-identical."""
    import vhdtool

    image = work_copy("debian-lvm-ext4", tmp_path)
    with vhdtool.edit(image) as ed:
        ed.write_file("/var/lib/vhdtool/hyperv-daemons", b"not a folder\n")
        ed.symlink("/var/lib/vhdtool/loop", "/var/lib/vhdtool/loop")
        ed.write_file("/var/lib/vhdtool/older/result.txt", b"exit_code=0\nattempts=1\nfinished=2026-01-01T00:00:00Z\n")
    st = status(cli, image)
    assert [(s["id"], s["state"]) for s in st["staged"]] == [("older", "installed")] and st["state"] == "installed"
    was = digest(image)
    result = cli("stage", image, "--host", "auto")
    assert_one_line_error(*result, image)
    assert result[0] == 5 and "/var/lib/vhdtool/hyperv-daemons is a file" in result[2] and digest(image) == was


# -- crash safety -------------------------------------------------------------------------------------------

def stage_process(image: Path, strace: list[str]) -> subprocess.CompletedProcess:
    import sys

    from conftest import ROOT

    return subprocess.run(["strace", "-f", *strace, sys.executable, "-m", "vhdtool.cli.main", "stage", str(image),
                           "--host", "auto"], capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))


def replayed_tree(image: Path, tmp: Path, where: tuple[int, int]) -> dict:
    """The root volume's tree once QEMU has replayed what the VHDX log holds (as Hyper-V would), e2fsck clean.
    ``where``: the volume's (offset, size) in the disk, as ``locate`` found them (a stage does not move it)."""
    copy = tmp / f"replayed-{time.monotonic_ns()}.vhdx"
    shutil.copyfile(image, copy)
    sh("qemu-img", "check", "-r", "all", copy, check=False)
    image_ok(copy)
    raw = raw_image(copy, copy.with_suffix(".raw"))
    volume = copy_range(raw, copy.with_suffix(".volume"), *where)
    e2fsck_clean(volume)
    tree = ext_tree(volume)
    for path in (copy, raw, volume):
        path.unlink()
    return tree


@pytest.mark.parametrize("sweep", SWEEPS)
def test_kill_linux_stage_at_every_write_and_flush(tmp_path, sweep):
    """SIGKILL at each pwrite64 and fsync of `vhdtool stage` on the LVM guest: the guest tree is the old one
    or the staged one, e2fsck clean either way, and staging again finishes the job."""
    original = work_copy("debian-lvm-ext4", tmp_path)
    loc = locate(original, tmp_path)
    where = (loc.offset, loc.volume.stat().st_size)
    old = replayed_tree(original, tmp_path, where)
    probe = tmp_path / "probe.vhdx"
    shutil.copyfile(original, probe)
    trace = tmp_path / "trace"
    assert stage_process(probe, ["-o", str(trace), "-e", "trace=pwrite64,fsync"]).returncode == 0
    counts = {name: sum(1 for line in trace.read_text().splitlines() if re.search(rf"(^|\s){name}\(", line))
              for name in ("pwrite64", "fsync")}
    new = replayed_tree(probe, tmp_path, where)
    assert "/var/lib/vhdtool/hyperv-daemons/install.sh" in new and "/var/lib/vhdtool/hyperv-daemons/install.sh" \
        not in old
    points = sweep_points([(name, n) for name, total in counts.items() for n in range(1, total + 1)], sweep)
    assert len(points) >= 6, counts
    outcomes = {"old": 0, "new": 0}
    victim = tmp_path / "victim.vhdx"
    for name, n in points:
        shutil.copyfile(original, victim)
        res = stage_process(victim, ["-o", "/dev/null", "-e", f"inject={name}:signal=KILL:when={n}"])
        assert res.returncode != 0, (name, n)
        tree = replayed_tree(victim, tmp_path, where)
        assert tree in (old, new), (name, n)
        outcomes["old" if tree == old else "new"] += 1
        if sweep == FULL or (name, n) == points[-1]:  # the next run finishes the job
            assert stage_process(victim, ["-o", "/dev/null"]).returncode == 0, (name, n)
            assert replayed_tree(victim, tmp_path, where) == new, (name, n)
    assert outcomes["old"] and outcomes["new"], outcomes
    print(f"\nLinux stage: {len(points)} kill points of {counts}, outcomes {outcomes}")
