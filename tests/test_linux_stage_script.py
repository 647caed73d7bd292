"""install.sh and its unit (vhdtool/stage/linux_script.py), run in simulated boots of a guest tree.

Judges we did not write: busybox's ash runs the script (tests/linux_boot.py), chroot confines it to
the guest tree, dash and bash check its syntax, systemd-analyze reads the unit. What the script
leaves is read back with ``status.parse_linux_state``, the reader ``vhdtool status`` uses.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from linux_boot import Unavailable, make_guest
from vhdtool.stage.linux_script import (
    LinuxStagedScript,
    UnsafeScriptValue,
    install_id,
    render_script,
    render_unit,
)
from vhdtool.stage.script import MAX_ATTEMPTS
from vhdtool.stage.status import parse_linux_state

UBUNTU_UNITS = ("hv-kvp-daemon.service", "hv-vss-daemon.service", "hv-fcopy-daemon.service")
APT = LinuxStagedScript("linux-cloud-tools-generic", "apt", ("linux-cloud-tools-generic",), UBUNTU_UNITS)
DNF = LinuxStagedScript("hyperv-daemons", "dnf", ("hyperv-daemons",), ())
YUM = LinuxStagedScript("hyperv-daemons", "yum", ("hyperv-daemons",), ())
FAIL = {"apt-get-install": 100}
FINISHED = re.compile(r"finished=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


@pytest.fixture
def guest(tmp_path):
    def make(script=APT):
        try:
            return make_guest(tmp_path / "root", script)
        except Unavailable as e:
            pytest.skip(str(e))
    return make


def state(g):
    return parse_linux_state(g.script.id, g.file("result.txt"), g.file("attempts.txt"), g.file("install.log"))


def enabled_units(g) -> list[str]:
    return [c.args[-1] for c in g.calls() if c.program == "systemctl" and "enable" in c.args]


def assert_apt_was_noninteractive(g, installs: int) -> None:
    calls = [c for c in g.calls() if c.program == "apt-get"]
    install = [c for c in calls if "install" in c.args]
    assert len(install) == installs
    for c in calls:
        assert c.debian_frontend == "noninteractive"
    for c in install:
        assert {"-y", "--no-install-recommends", "Dpkg::Options::=--force-confold"} <= set(c.args)
        assert c.args[-1] == "linux-cloud-tools-generic"
    # update comes before each install
    programs = [c.args[0] for c in calls]
    assert programs == ["update", "install"] * installs


def assert_finished(g, exit_code: int, attempts: int) -> None:
    result = g.file("result.txt").decode()
    lines = result.splitlines()
    assert lines[:2] == [f"exit_code={exit_code}", f"attempts={attempts}"]
    assert FINISHED.fullmatch(lines[2]), lines
    assert not (g.folder / "result.txt.tmp").exists()
    assert not g.wants_link.exists() and not g.wants_link.is_symlink()


def test_success_on_first_boot(guest):
    g = guest()
    run = g.boot()
    assert run.returncode == 0, run.stderr
    assert_finished(g, 0, 1)
    assert g.file("attempts.txt") == b"1\n"
    assert_apt_was_noninteractive(g, 1)
    assert enabled_units(g) == list(UBUNTU_UNITS)
    log = g.file("install.log").decode()
    assert "attempt 1 of 3" in log and "stub apt-get install: exit 0" in log and "exit code 0" in log
    s = state(g)
    assert (s.state, s.exit_code, s.attempts) == ("installed", 0, 1)
    # The next boot starts nothing: the unit is no longer enabled.
    assert g.boot() is None
    assert len(g.calls()) == 2 + len(UBUNTU_UNITS)


def test_failure_then_success(guest):
    g = guest()
    assert g.boot(FAIL).returncode == 0
    assert g.file("result.txt") is None
    assert g.wants_link.is_symlink()  # still enabled for the next boot
    assert enabled_units(g) == []
    s = state(g)
    assert (s.state, s.attempts, s.exit_code) == ("running", 1, None)
    assert "exit code 100" in g.file("install.log").decode()

    assert g.boot().returncode == 0
    assert_finished(g, 0, 2)
    assert_apt_was_noninteractive(g, 2)
    assert enabled_units(g) == list(UBUNTU_UNITS)
    s = state(g)
    assert (s.state, s.attempts, s.exit_code) == ("installed", 2, 0)
    assert g.file("install.log").decode().count("attempt ") == 2


def test_three_failures_then_nothing(guest):
    g = guest()
    for boot in range(1, MAX_ATTEMPTS + 1):
        assert g.boot(FAIL).returncode == 0
        assert g.file("attempts.txt") == f"{boot}\n".encode()
        assert g.wants_link.is_symlink() == (boot < MAX_ATTEMPTS)
    assert_finished(g, 100, MAX_ATTEMPTS)
    assert_apt_was_noninteractive(g, MAX_ATTEMPTS)
    assert enabled_units(g) == []
    s = state(g)
    assert (s.state, s.exit_code, s.attempts) == ("failed", 100, MAX_ATTEMPTS)
    assert any("exit code 100" in line for line in s.log_tail)
    before = (g.calls(), g.file("result.txt"), g.file("install.log"))
    assert g.boot() is None  # 4th boot: the unit is disabled, nothing runs
    assert (g.calls(), g.file("result.txt"), g.file("install.log")) == before


def test_a_failed_update_is_a_failed_attempt_without_install(guest):
    g = guest()
    g.boot({"apt-get-update": 100})
    assert [c.args[0] for c in g.calls()] == ["update"]
    assert state(g).state == "running"


def test_a_run_after_a_finished_one_only_removes_the_link(guest):
    """Power lost between result.txt and the link's removal: the next run removes the link, nothing else."""
    g = guest()
    g.boot()
    g.wants_link.symlink_to(g.script.unit_path)
    calls, result = g.calls(), g.file("result.txt")
    assert g.boot().returncode == 0
    assert (g.calls(), g.file("result.txt")) == (calls, result)
    assert not g.wants_link.is_symlink()


@pytest.mark.parametrize("count, attempts_left", [(b"3\n", 0), (b"garbage\n", 0), (b"99999999999999999999\n", 0),
                                                  (b"", 3), (b"2", 1)])
def test_the_attempt_count_as_found(guest, count, attempts_left):
    """attempts.txt at 3 without a result (power lost in the last attempt), or not a count: give up, no loop."""
    g = guest()
    g.folder.joinpath("attempts.txt").write_bytes(count)
    g.boot(FAIL)
    installs = [c for c in g.calls() if c.program == "apt-get" and "install" in c.args]
    assert len(installs) == (1 if attempts_left else 0)
    if attempts_left:
        assert g.wants_link.is_symlink() == (attempts_left > 1)
    else:
        assert_finished(g, -1, MAX_ATTEMPTS)
        assert state(g).state == "failed"


def test_without_systemctl_the_unit_still_disables_itself(guest):
    g = guest()
    g.remove_stub("systemctl")
    assert g.boot().returncode == 0
    assert_finished(g, 0, 1)
    assert "no systemctl" in g.file("install.log").decode()


def test_a_unit_that_cannot_be_enabled_is_logged(guest):
    g = guest()
    g.boot({"systemctl-enable": 1})
    assert_finished(g, 0, 1)
    assert enabled_units(g) == list(UBUNTU_UNITS)  # each one tried
    assert g.file("install.log").decode().count("could not enable") == len(UBUNTU_UNITS)
    assert state(g).state == "installed"


@pytest.mark.parametrize("script", [DNF, YUM], ids=["dnf", "yum"])
def test_rhel_family(guest, script):
    g = guest(script)
    g.boot({f"{script.package_manager}-install": 1})
    g.boot()
    assert_finished(g, 0, 2)
    calls = g.calls()
    assert [(c.program, c.args) for c in calls] == [(script.package_manager, ("-y", "install", "hyperv-daemons"))] * 2
    assert enabled_units(g) == []  # udev starts RHEL's daemons


def test_the_unit(tmp_path):
    text = render_unit(APT).decode()
    assert "\n[Service]\nType=oneshot\n" in text
    assert "After=network-online.target\n" in text and "Wants=network-online.target\n" in text
    assert f"ExecStart=/bin/sh /var/lib/vhdtool/{APT.id}/install.sh\n" in text
    assert text.endswith("[Install]\nWantedBy=multi-user.target\n")
    assert APT.wants_link == f"/etc/systemd/system/multi-user.target.wants/vhdtool-{APT.id}.service"
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # The host's systemd judges the unit file (its ExecStart's /bin/sh is the host's).
    unit = tmp_path / APT.unit_name
    unit.write_text(text)
    run = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    problems = [line for line in (run.stdout + run.stderr).splitlines() if APT.unit_name in line]
    assert run.returncode == 0 and not problems, run.stdout + run.stderr


@pytest.mark.parametrize("shell", ["dash", "bash"])
@pytest.mark.parametrize("script", [APT, DNF], ids=["apt", "dnf"])
def test_other_shells_parse_the_script(tmp_path, shell, script):
    exe = shutil.which(shell)
    if exe is None:
        pytest.skip(f"{shell} is not installed")
    path = tmp_path / "install.sh"
    path.write_bytes(render_script(script))
    args = [exe, "--posix", "-n", str(path)] if shell == "bash" else [exe, "-n", str(path)]
    run = subprocess.run(args, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


HOSTILE = ["a;reboot", "a$(reboot)", "a`reboot`", "a'b", 'a"b', "a\nreboot", "a\n", "a b", "-y", "a|b", "a&b",
           "a>b", "../a", "a/b", "a%n", "a\\b", "", "a\x00", "A" * 300]


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_values_are_refused(value):
    with pytest.raises(UnsafeScriptValue):
        LinuxStagedScript(value, "apt", ("hyperv-daemons",), ())
    with pytest.raises(UnsafeScriptValue):
        LinuxStagedScript("hyperv-daemons", "apt", (value,), ())
    with pytest.raises(UnsafeScriptValue):
        LinuxStagedScript("hyperv-daemons", "apt", ("hyperv-daemons",), (value + ".service",))
    with pytest.raises(UnsafeScriptValue):
        install_id((value,))


@pytest.mark.parametrize("manager", ["apt; reboot", "zypper", "APT", ""])
def test_unknown_package_managers_are_refused(manager):
    with pytest.raises(UnsafeScriptValue):
        LinuxStagedScript("hyperv-daemons", manager, ("hyperv-daemons",), ())


def test_refused_shapes():
    with pytest.raises(UnsafeScriptValue):
        LinuxStagedScript("hyperv-daemons", "apt", (), ())  # nothing to install
    with pytest.raises(UnsafeScriptValue):
        LinuxStagedScript("hyperv-daemons", "apt", "hyperv-daemons", ())  # a string is not a tuple of names
    with pytest.raises(UnsafeScriptValue):
        LinuxStagedScript("a+b", "apt", ("a+b",), ())  # "+" is a package name's, never a unit name's


def test_every_value_in_the_script_is_quoted():
    text = render_script(APT).decode()
    for value in (APT.id, *APT.packages, *APT.units):
        for line in text.splitlines():
            if line.lstrip().startswith("#") or "echo" in line:
                continue
            for m in re.finditer(re.escape(value), line):
                before, after = line[:m.start()], line[m.end():]
                # Inside a single-quoted word: an odd number of quotes before it on the line.
                assert before.count("'") % 2 == 1 and after.count("'") % 2 == 1, line


@pytest.mark.parametrize("result, attempts, expected", [
    (None, None, ("pending", None, None)),
    (None, b"2\n", ("running", None, 2)),
    (b"exit_code=0\nattempts=1\nfinished=2026-12-07T02:00:00Z\n", b"1\n", ("installed", 0, 1)),
    (b"exit_code=100\nattempts=3\nfinished=x\n", b"3\n", ("failed", 100, 3)),
    (b"exit_code=-1\nattempts=3\nfinished=x\n", b"4\n", ("failed", -1, 3)),
    (b"exit_code=3010\nattempts=1\n", None, ("failed", 3010, 1)),  # a reboot request is Windows' success only
    (b"exit_code=0\r\nattempts=1\r\n", None, ("installed", 0, 1)),
    (b"exit_code=zero\nattempts=\xff\xfe\n", b"junk", ("failed", None, None)),
    (b"exit_code=" + b"9" * 5000 + b"\n", None, ("failed", None, None)),  # longer than a value can be
    (b"\x00" * 4096, b"1", ("failed", None, 1)),  # finished, outcome unreadable: never "pending"
])
def test_status_reads_what_install_sh_leaves(result, attempts, expected):
    s = parse_linux_state("hyperv-daemons", result, attempts, b"line 1\n\nline 2\n")
    assert (s.state, s.exit_code, s.attempts) == expected
    assert s.log_tail == ("line 1", "line 2")
