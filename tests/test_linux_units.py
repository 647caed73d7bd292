"""Linux guests' Hyper-V daemons: unit lookup, start state and enable/disable link plans.

Guest trees in Ubuntu, Debian and RHEL layouts (a real /lib, merged /usr through a relative
/lib -> usr/lib, and through an absolute /lib -> /usr/lib) are judged twice: the real
``systemctl --root=TREE`` (systemd on this machine) says what each unit's state is and which
links ``enable``/``disable`` make or remove on a copy of the tree; vhdtool reads the same tree
from an ext4 image made by ``mkfs.ext4 -d`` (dissect.extfs underneath) and must agree.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from fixtures.build.disks import Part, build_raw_disk, ext4_fill, mbr_layout, write
from fixtures.build.tools import MiB, run
from vhdtool.filesystem.linuxfs import open_linux_filesystem
from vhdtool.guest import hvdaemons, systemd
from vhdtool.guest.unitfile import exec_start_binary, parse_install, udev_wanted_units

SYSTEMCTL = shutil.which("systemctl")
needs_systemctl = pytest.mark.skipif(SYSTEMCTL is None, reason="systemctl (the judge) is not installed")
needs_mkfs = pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="mkfs.ext4 is not installed")

# -- guest trees ------------------------------------------------------------------------------

OS_RELEASE = {
    "ubuntu": 'ID=ubuntu\nID_LIKE=debian\nVERSION_ID="22.04"\nPRETTY_NAME="Ubuntu 22.04.3 LTS"\n',
    "debian": 'ID=debian\nVERSION_ID="12"\nPRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n',
    "rhel": 'ID="rhel"\nID_LIKE="fedora"\nVERSION_ID="9.3"\nPRETTY_NAME="Red Hat Enterprise Linux 9.3 (Plow)"\n',
}
# Unit texts as the distributions ship them (see vhdtool/guest/hvdaemons.py for the sources).
WANTED = "[Install]\nWantedBy=multi-user.target\n"


def unit(description: str, exec_start: str, install: str = WANTED) -> str:
    return (f"[Unit]\nDescription={description}\nConditionVirtualization=microsoft\n\n"
            f"[Service]\nExecStart={exec_start} -n\n\n{install}")


def merged_usr(root: Path, absolute: bool) -> None:
    for d in ("lib", "bin", "sbin"):
        (root / "usr" / d).mkdir(parents=True, exist_ok=True)
        os.symlink(f"/usr/{d}" if absolute else f"usr/{d}", root / d)


def ubuntu_tree(root: Path) -> None:
    """A real /lib (jammy): kvp enabled through an absolute link, vss masked, no fcopy at all."""
    write(root, "etc/os-release", OS_RELEASE["ubuntu"])
    for d in ("kvp", "vss"):
        write(root, f"usr/sbin/hv_{d}_daemon", "#!/bin/sh\n", 0o755)
        write(root, f"lib/systemd/system/hv-{d}-daemon.service", unit(d, f"/usr/sbin/hv_{d}_daemon"))
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True)
    os.symlink("/lib/systemd/system/hv-kvp-daemon.service", wants / "hv-kvp-daemon.service")
    os.symlink("/dev/null", root / "etc/systemd/system/hv-vss-daemon.service")


def debian_tree(root: Path) -> None:
    """Merged /usr through relative links: kvp enabled by a relative link, vss disabled, fcopy static."""
    merged_usr(root, absolute=False)
    write(root, "etc/os-release", OS_RELEASE["debian"])
    for d in ("kvp", "vss", "fcopy"):
        write(root, f"usr/sbin/hv_{d}_daemon", "\x7fELF", 0o755)
        install = "" if d == "fcopy" else WANTED
        write(root, f"usr/lib/systemd/system/hyperv-daemons.hv-{d}-daemon.service",
              unit(d, f"/usr/sbin/hv_{d}_daemon", install))
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True)
    os.symlink("../../../../lib/systemd/system/hyperv-daemons.hv-kvp-daemon.service",
               wants / "hyperv-daemons.hv-kvp-daemon.service")


def rhel_tree(root: Path) -> None:
    """Merged /usr through absolute links: kvp started by its udev rule; vss's rule overridden by a
    /dev/null rule in /etc, so its unit (no [Install]) is static; fcopy the uio kind, enabled."""
    merged_usr(root, absolute=True)
    write(root, "usr/lib/os-release", OS_RELEASE["rhel"])
    (root / "etc").mkdir(exist_ok=True)
    os.symlink("../usr/lib/os-release", root / "etc/os-release")
    for d, rule in (("kvp", "hypervkvp"), ("vss", "hypervvss")):
        write(root, f"usr/sbin/hyperv{d}d", "\x7fELF", 0o755)
        write(root, f"usr/lib/systemd/system/hyperv{d}d.service", unit(d, f"/usr/sbin/hyperv{d}d", ""))
        write(root, f"usr/lib/udev/rules.d/70-{rule}.rules",
              f'# started when the host offers the device\nSUBSYSTEM=="misc", KERNEL=="vmbus/hv_{d}", '
              f'TAG+="systemd", \\\n  ENV{{SYSTEMD_WANTS}}+="hyperv{d}d.service"\n')
    (root / "etc/udev/rules.d").mkdir(parents=True)
    os.symlink("/dev/null", root / "etc/udev/rules.d/70-hypervvss.rules")
    write(root, "usr/sbin/hv_fcopy_uio_daemon", "\x7fELF", 0o755)
    write(root, "usr/lib/systemd/system/hypervfcopyd.service", unit("fcopy", "hv_fcopy_uio_daemon"))
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True)
    os.symlink("/usr/lib/systemd/system/hypervfcopyd.service", wants / "hypervfcopyd.service")


def extra_units(root: Path) -> dict[str, str]:
    """Units that exercise each rule of systemd's state, and the state vhdtool must report."""
    vendor = "usr/lib/systemd/system" if (root / "lib").is_symlink() else "lib/systemd/system"
    etc = root / "etc/systemd/system"
    (etc / "multi-user.target.wants").mkdir(parents=True, exist_ok=True)
    plain = "[Service]\nExecStart=/bin/true\n"
    write(root, f"{vendor}/x-alias.service", plain + "[Install]\nWantedBy=multi-user.target\nAlias=x-other.service\n")
    os.symlink(f"/{vendor}/x-alias.service", etc / "x-other.service")  # its own Alias=: enabled
    write(root, f"{vendor}/x-aliased.service", plain + WANTED)
    os.symlink(f"/{vendor}/x-aliased.service", etc / "x-elsewhere.service")  # not its Alias=: indirect
    write(root, f"{vendor}/x-renamed.service", plain + WANTED)
    os.symlink(f"/{vendor}/x-renamed.service", etc / "multi-user.target.wants/x-zzz.service")  # other name
    write(root, f"{vendor}/x-vendor-wants.service", plain + WANTED)
    (root / vendor / "multi-user.target.wants").mkdir(exist_ok=True)
    os.symlink("../x-vendor-wants.service", root / vendor / "multi-user.target.wants/x-vendor-wants.service")
    write(root, f"{vendor}/x-required.service", plain + "[Install]\nRequiredBy=basic.target\n")
    (etc / "basic.target.requires").mkdir()
    os.symlink(f"/{vendor}/x-required.service", etc / "basic.target.requires/x-required.service")
    write(root, f"{vendor}/x-empty.service", "")
    write(root, f"{vendor}/x-masked-empty.service", plain + WANTED)
    write(root, "etc/systemd/system/x-masked-empty.service", "")
    write(root, f"{vendor}/x-dangling.service", plain + WANTED)
    os.symlink("/nowhere/x-dangling.service", etc / "multi-user.target.wants/x-dangling.service")
    write(root, f"{vendor}/x-also.service", plain + "[Install]\nAlso=x-static.service\n")
    write(root, f"{vendor}/x-static.service", plain)
    write(root, f"{vendor}/x-override.service", plain)  # /etc's copy wins and has rules
    write(root, "etc/systemd/system/x-override.service", plain + WANTED)
    write(root, f"{vendor}/x-null-wants.service", plain + WANTED)  # enabled by name; enable replaces it
    os.symlink("/dev/null", etc / "multi-user.target.wants/x-null-wants.service")
    write(root, f"{vendor}/x-alias-taken.service", plain + "[Install]\nAlias=x-other.service\n")
    return {"x-alias.service": "enabled", "x-aliased.service": "indirect", "x-renamed.service": "disabled",
            "x-vendor-wants.service": "disabled", "x-required.service": "enabled", "x-empty.service": "masked",
            "x-masked-empty.service": "masked", "x-dangling.service": "enabled", "x-also.service": "indirect",
            "x-static.service": "static", "x-override.service": "disabled", "x-none.service": "not-installed",
            "x-null-wants.service": "enabled", "x-alias-taken.service": "disabled"}


LAYOUTS = {
    "ubuntu": (ubuntu_tree, {"kvp": ("enabled", "hv-kvp-daemon.service", "/usr/sbin/hv_kvp_daemon"),
                             "vss": ("masked", "hv-vss-daemon.service", "/usr/sbin/hv_vss_daemon"),
                             "fcopy": ("not-installed", None, None)}),
    "debian": (debian_tree, {"kvp": ("enabled", "hyperv-daemons.hv-kvp-daemon.service", "/usr/sbin/hv_kvp_daemon"),
                             "vss": ("disabled", "hyperv-daemons.hv-vss-daemon.service", "/usr/sbin/hv_vss_daemon"),
                             "fcopy": ("static", "hyperv-daemons.hv-fcopy-daemon.service",
                                       "/usr/sbin/hv_fcopy_daemon")}),
    "rhel": (rhel_tree, {"kvp": ("udev", "hypervkvpd.service", "/usr/sbin/hypervkvpd"),
                         "vss": ("static", "hypervvssd.service", "/usr/sbin/hypervvssd"),
                         "fcopy": ("enabled", "hypervfcopyd.service", "/usr/sbin/hv_fcopy_uio_daemon")}),
}


def make_tree(tmp: Path, layout: str) -> tuple[Path, dict[str, str]]:
    root = tmp / f"{layout}-tree"
    root.mkdir()
    LAYOUTS[layout][0](root)
    return root, extra_units(root)


def ext4_of(tree: Path, image: Path):
    """The tree as vhdtool sees it: an ext4 image made by mkfs.ext4 -d, read through dissect.extfs."""
    with open(image, "wb") as f:
        f.truncate(32 * MiB)
    run("mkfs.ext4", "-q", "-F", "-b", 4096, "-d", tree, image)
    return open_linux_filesystem(open(image, "rb"), "ext4", str(image), "test volume")


# -- the judge --------------------------------------------------------------------------------

def systemctl(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SYSTEMCTL, f"--root={root}", *args], capture_output=True, text=True, timeout=60)


def judged_state(root: Path, name: str) -> str:
    r = systemctl(root, "is-enabled", name)
    out = r.stdout.strip()
    return out or ("not-installed" if "No such file" in r.stderr else f"error: {r.stderr.strip()}")


def in_root(root: Path, path: str, depth: int = 0) -> str:
    """``path`` inside ``root`` with every symlink resolved inside ``root`` (the test's own resolver)."""
    assert depth < 40, path
    parts = [p for p in path.split("/") if p]
    done: list[str] = []
    while parts:
        name = parts.pop(0)
        if name == "..":
            done = done[:-1]
            continue
        if name == ".":
            continue
        here = root.joinpath(*done, name)
        if here.is_symlink():
            target = os.readlink(here)
            rest = "/".join([target] + parts) if target.startswith("/") else \
                "/" + "/".join(done + [target] + parts)
            return in_root(root, rest, depth + 1)
        done.append(name)
    return "/" + "/".join(done)


def etc_dirs(root: Path) -> set[str]:
    """Every real folder under /etc/systemd/system (guest paths)."""
    base = root / "etc/systemd/system"
    return {"/" + str(Path(d).relative_to(root)) for d, _, _ in os.walk(base) if not Path(d).is_symlink()}


def etc_links(root: Path) -> dict[str, str]:
    """{guest path: target resolved in the guest} of every symlink under /etc/systemd/system."""
    base = root / "etc/systemd/system"
    out = {}
    for dirpath, dirnames, filenames in os.walk(base):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            if p.is_symlink():
                guest = "/" + str(p.relative_to(root))
                target = os.readlink(p)
                absolute = target if target.startswith("/") else os.path.normpath(
                    os.path.join(os.path.dirname(guest), target))
                out[guest] = in_root(root, absolute)
    return out


# -- states -----------------------------------------------------------------------------------

@needs_mkfs
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_daemon_states_as_systemd_sees_them(tmp_path, layout):
    tree, extras = make_tree(tmp_path, layout)
    fs = ext4_of(tree, tmp_path / "root.ext4")
    release = {"ubuntu": ("ubuntu", "debian"), "debian": ("debian", None), "rhel": ("rhel", "fedora")}[layout]
    states = {s.name: s for s in hvdaemons.daemon_states(fs, *release)}
    for key, (start, unit_name, daemon) in LAYOUTS[layout][1].items():
        got = states[key]
        assert (got.start, got.unit, got.daemon) == (start, unit_name, daemon), got
        if SYSTEMCTL and unit_name:
            judged = judged_state(tree, unit_name)
            # systemd calls a unit without [Install] "static" even when a udev rule starts it.
            assert judged == ("static" if start == "udev" else start), (unit_name, judged)
    udev = systemd.udev_started_units(fs)
    for name, expected in extras.items():
        assert systemd.unit_state(fs, systemd.find_unit(fs, name), udev) == expected, name
        if SYSTEMCTL:
            assert judged_state(tree, name) == expected, name


# -- enable / disable plans -------------------------------------------------------------------

def planned(fs, plan, action: str) -> dict[str, str]:
    """{link path: target resolved in the guest} of a plan's changes of one action."""
    return {c.path: fs.resolve(c.target) for c in plan.changes if c.action == action}


@needs_systemctl
@needs_mkfs
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_enable_and_disable_plans_are_systemctls_links(tmp_path, layout):
    tree, _ = make_tree(tmp_path, layout)
    vendor = "/usr/lib/systemd/system" if (tree / "lib").is_symlink() else "/lib/systemd/system"
    # Units whose [Install] exercises the parser: several values, repeated keys, continuations,
    # a reset, quoting, comments, specifiers, an alias and an Also= chain.
    write(tree, vendor[1:] + "/y-many.service", "[Unit]\nDescription=many\n[Service]\nExecStart=/bin/true\n"
          "[Install]\nWantedBy=nothing.target\nWantedBy=\n# the reset above drops nothing.target\n"
          "WantedBy=multi-user.target  graphical.target\n; a comment\nWantedBy=\\\n  default.target\n"
          "RequiredBy=\"basic.target\"\nAlias=%N-alias.service\nAlso=y-also.service\n")
    write(tree, vendor[1:] + "/y-also.service", "[Service]\nExecStart=/bin/true\n[Install]\nWantedBy=timers.target\n")
    names = ["y-many.service", "x-renamed.service", "x-aliased.service", "x-alias.service", "x-null-wants.service",
             "x-alias-taken.service", "x-empty.service"]
    names += [u for u in (LAYOUTS[layout][1][k][1] for k in ("kvp", "vss", "fcopy")) if u]
    for name in names:
        fs = ext4_of(tree, tmp_path / f"{name}.ext4")
        plan = systemd.enable_plan(fs, name)
        copy = tmp_path / f"{name}-enabled"
        shutil.copytree(tree, copy, symlinks=True)
        before, dirs_before = etc_links(copy), etc_dirs(copy)
        r = systemctl(copy, "enable", name)
        if plan.refusal:
            assert r.returncode != 0, (name, r.stdout)
            continue
        after = etc_links(copy)
        made = {p: t for p, t in after.items() if before.get(p) != t}
        assert r.returncode == 0, r.stderr
        assert planned(fs, plan, "create") == made, name
        assert {c.path for c in plan.changes if c.action == "delete"} == set(made) & set(before), name
        assert {c.path for c in plan.changes if c.action == "mkdir"} == etc_dirs(copy) - dirs_before, name
        assert all(c.target.startswith("/") for c in plan.changes if c.action == "create")

        # Enabling again changes nothing; disabling removes exactly what systemctl disable removes.
        enabled = ext4_of(copy, tmp_path / f"{name}-enabled.ext4")
        assert systemd.enable_plan(enabled, name).changes == (), name
        if name in systemd.udev_started_units(enabled):
            continue
        off = systemd.disable_plan(enabled, name)
        dirs_before = etc_dirs(copy)
        r = systemctl(copy, "disable", name)
        assert r.returncode == 0, r.stderr
        assert {c.path for c in off.changes if c.action == "delete"} == set(after) - set(etc_links(copy)), name
        assert {c.path for c in off.changes if c.action == "rmdir"} == dirs_before - etc_dirs(copy), name
        assert {c.action for c in off.changes} <= {"delete", "rmdir"}
        disabled = ext4_of(copy, tmp_path / f"{name}-disabled.ext4")
        assert systemd.disable_plan(disabled, name).changes == ()


@needs_mkfs
def test_refusals_and_nothing_to_do(tmp_path):
    tree, _ = make_tree(tmp_path, "rhel")
    fs = ext4_of(tree, tmp_path / "rhel.ext4")
    udev = hvdaemons.link_plans(fs, "rhel", "fedora", [("vmickvpexchange", True)])[0]
    assert udev.refusal is None and udev.changes == () and "udev" in udev.notes[0]
    off = hvdaemons.link_plans(fs, "rhel", "fedora", [("hypervkvpd", False)])[0]
    assert off.refusal and "systemctl mask hypervkvpd.service" in off.hint
    static = systemd.enable_plan(fs, "hypervvssd.service")
    assert static.refusal is None and static.changes == () and "static" in static.notes[0]
    # A Windows service with no Linux daemon is passed by with the reason; a name known nowhere is refused.
    windows_only = hvdaemons.link_plans(fs, "rhel", None, [("vmicheartbeat", True)])[0]
    assert windows_only.refusal is None and windows_only.changes == () and "hv_utils" in windows_only.notes[0]
    unknown = hvdaemons.link_plans(fs, "rhel", None, [("vmicnothing", True)])[0]
    assert unknown.refusal and "kvp" in unknown.hint
    tree, _ = make_tree(tmp_path, "ubuntu")
    fs = ext4_of(tree, tmp_path / "ubuntu.ext4")
    masked = hvdaemons.link_plans(fs, "ubuntu", "debian", [("vss", True), ("fcopy", True)])
    assert "masked" in masked[0].refusal and "systemctl unmask hv-vss-daemon.service" in masked[0].hint
    assert masked[1].refusal and "no fcopy daemon unit" in masked[1].refusal


@needs_mkfs
def test_hostile_units_never_name_a_path(tmp_path):
    root = tmp_path / "tree"
    write(root, "etc/os-release", OS_RELEASE["debian"])
    write(root, "lib/systemd/system/hv-kvp-daemon.service",
          "[Install]\nWantedBy=../../../../etc/passwd /abs.target multi-user.target\nAlias=../evil.service "
          "other.socket\nRequiredBy=%i.target\n")
    loops = root / "etc/systemd/system"
    loops.mkdir(parents=True)
    os.symlink("a.wants", loops / "b.wants")
    os.symlink("b.wants", loops / "a.wants")
    os.symlink("x-loop.service", loops / "x-loop.service")
    fs = ext4_of(root, tmp_path / "hostile.ext4")
    plan = systemd.enable_plan(fs, "hv-kvp-daemon.service")
    assert [(c.action, c.path) for c in plan.changes] == [
        ("mkdir", "/etc/systemd/system/multi-user.target.wants"),
        ("create", "/etc/systemd/system/multi-user.target.wants/hv-kvp-daemon.service")]
    assert len(plan.notes) == 4  # the four values ignored, said so
    assert systemd.find_unit(fs, "x-loop.service") is None
    assert hvdaemons.daemon_states(fs, "debian", None)[0].start == "disabled"


# -- parsers ----------------------------------------------------------------------------------

def test_install_parser():
    text = ("[Unit]\nWantedBy=ignored.target\n[Install]\n# WantedBy=commented.target\n"
            "WantedBy=a.target b.target\nwantedby=lowercase.target\nWantedBy=a.target c.target\n"
            "RequiredBy=r.target \\\n  s.target\nAlias=%n.alias.service 'q uoted.service' %p-x.service\n"
            "UpheldBy=u.target\nAlso=also.service\nAlso=\nAlso=also2.service\nWantedBy = spaced.target\n"
            "Alias=%Z.service\n[Service]\nWantedBy=nope.target\n")
    install = parse_install(text, "foo.service")
    assert install.wanted_by == ("a.target", "b.target", "c.target", "spaced.target")
    assert install.required_by == ("r.target", "s.target")
    assert install.alias == ("foo.service.alias.service", "foo-x.service")
    assert install.upheld_by == ("u.target",) and install.also == ("also2.service",)
    assert install.ignored == ("Alias=q uoted.service", "Alias=%Z.service") and install.has_rules
    assert not parse_install("[Service]\nExecStart=/x\n", "x.service").has_rules


def test_exec_start_and_udev_rules():
    assert exec_start_binary("[Service]\nExecStartPre=/bin/a\nExecStart=-/usr/sbin/hypervkvpd -n\n") == \
        "/usr/sbin/hypervkvpd"
    assert exec_start_binary("[Service]\nExecStart=hv_fcopy_uio_daemon -n\n") == "hv_fcopy_uio_daemon"
    assert exec_start_binary("[Unit]\nExecStart=/x\n") is None
    rules = ('# ENV{SYSTEMD_WANTS}+="commented.service"\nSUBSYSTEM=="misc", KERNEL=="vmbus/hv_kvp", TAG+="systemd", '
             'ENV{SYSTEMD_WANTS}+="hypervkvpd.service"\nKERNEL=="x", \\\n ENV{SYSTEMD_WANTS}="a.service b.service"\n'
             'ENV{SYSTEMD_WANTS}+="../../etc/passwd"\n')
    assert udev_wanted_units(rules) == ("hypervkvpd.service", "a.service", "b.service")


def test_one_name_map():
    for key, names in {"kvp": ["kvp", "hv_kvp_daemon", "hypervkvpd", "vmickvpexchange", "VMICKVPEXCHANGE",
                                "hv-kvp-daemon.service", "hyperv-daemons.hv-kvp-daemon", "hypervkvpd.service"],
                       "vss": ["vss", "hv_vss_daemon", "hypervvssd", "vmicvss", "hv-vss-daemon"],
                       "fcopy": ["fcopy", "hv_fcopy_daemon", "hypervfcopyd", "hv_fcopy_uio_daemon",
                                 "vmicguestinterface"]}.items():
        assert {hvdaemons.daemon_key(n) for n in names} == {key}, key
    assert hvdaemons.daemon_key("vmicheartbeat") is None and hvdaemons.daemon_key("") is None
    assert hvdaemons.family("ubuntu", "debian") == "ubuntu" and hvdaemons.family("almalinux", "rhel centos fedora") \
        == "rhel" and hvdaemons.family("arch", None) is None


# -- the CLI on a whole image -----------------------------------------------------------------

@pytest.mark.fixtures
@needs_mkfs
def test_cli_lists_linux_daemons_and_enables_udev_ones_with_no_write(cli, tmp_path):
    layout = mbr_layout(40 * MiB, 0x1B2C3D4E, Part(start=1 * MiB, size=38 * MiB, filesystem="ext4", mbr_type="83",
                                                   fill=ext4_fill("root", "0b9c4e6a-7d1f-4c3b-8e5a-9f0d1c2b3a4e",
                                                                  rhel_tree)))
    work = tmp_path / "work"
    work.mkdir()
    raw = build_raw_disk(work, layout)
    image = tmp_path / "rhel-ext4.vhdx"
    run("qemu-img", "convert", "-q", "-f", "raw", "-O", "vhdx", "-o", "subformat=dynamic", raw, image)
    before = hashlib.sha256(image.read_bytes()).hexdigest()

    code, out, err = cli("services", "--json", image)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["schema"] == 1 and doc["image"] == str(image)
    expected = LAYOUTS["rhel"][1]
    assert doc["services"] == [{"name": k, "daemon": v[2], "unit": v[1], "start": v[0]} for k, v in expected.items()]
    code, out, err = cli("services", image)
    assert code == 0 and "udev (hypervkvpd.service, /usr/sbin/hypervkvpd)" in out
    code, out, err = cli("inspect", "--json", image)
    assert json.loads(out)["guest"]["linux"]["services"] == doc["services"]
    code, out, err = cli("inspect", image)
    assert "fcopy" in out and "enabled (hypervfcopyd.service" in out

    # udev starts kvp: enabling it needs no link (the writes are tested in tests/test_linux_services.py).
    code, out, err = cli("services", image, "--enable", "kvp")
    assert code == 0 and "udev starts hypervkvpd.service" in out and "nothing to change" in err
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before

    from vhdtool.editor.services import MANUAL, linux_link_plans
    plans = linux_link_plans(image, [("vmicguestinterface", MANUAL), ("vmickvpexchange", MANUAL)])
    assert plans[0].changes == () and plans[1].changes == () and "udev" in plans[1].notes[0]
