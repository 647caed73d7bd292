"""The boot-time install.cmd (vhdtool/stage/script.py): its text, and what it does when it runs.

The text tests need nothing. The boot tests run the generated script under Wine's cmd.exe and
reg.exe, with stub dism.exe/pkgmgr.exe built from tests/stubs/ by mingw-w64, in one Wine prefix
per session (tests/wine_boot.py says how boots are modelled). They skip, saying why, only when
Wine or mingw-w64 is not installed (install.sh --test installs both).
"""

from __future__ import annotations

import re

import pytest
from wine_boot import CAB_BYTES, SYSTEM32, Guest, signed32

from vhdtool.stage.script import (
    MARKER,
    MAX_ATTEMPTS,
    StagedScript,
    UnsafeScriptValue,
    install_id,
    installer_for,
    render,
)

ID = "6.3.9600.18692-x64"
CAB = "Windows6.2-HyperVIntegrationServices-x64.cab"
# What a generalized image's SetupComplete.cmd held before staging; it must run as before and
# stay byte for byte what it was once the script has removed its own line.
SITE_LOG = "C:\\vhdtool-test\\site-setup.txt"
PRE_EXISTING = (b"@echo off\r\n"
                b"rem site setup: kept as it was\r\n"
                b'echo site setup ran>> "' + SITE_LOG.encode() + b'"\r\n')

# The installer's exit code on each boot: success, success asking for a restart, and a failure
# every time (three failures: an MSI error, a bad parameter, and DISM's 0x800F081F).
OUTCOMES = {
    "exit-0": (0,),
    "exit-3010": (3010,),
    "fails-3-times": (1603, 87, 0x800F081F),
}
BOOT_MODELS = {"setup-leaves-SetupType": False, "setup-clears-SetupType": True}


def staged(installer: str = "dism", hook: str = "setup-cmdline", **kw) -> StagedScript:
    fields = dict(id=ID, cab_name=CAB, installer=installer, system_root="C:\\Windows", hook=hook)
    fields.update(kw)
    return StagedScript(**fields)


def expected_call(s: StagedScript) -> str:
    cab = f"{s.folder}\\{s.cab_name}"
    if s.installer == "dism":
        return f'"{SYSTEM32}\\dism.exe" /online /add-package /packagepath:"{cab}" /quiet /norestart'
    return f'"{SYSTEM32}\\pkgmgr.exe" /ip /m:"{cab}" /quiet /norestart'


# -- the text, without Wine --------------------------------------------------------------------

ALL_KINDS = [(i, h) for i in ("dism", "pkgmgr") for h in ("setup-cmdline", "setupcomplete")]
PATH = re.compile(r'[A-Za-z]:\\[^"\s]*|%(?:HERE|LOG|RESULT|COUNT)%[^"\s]*')


@pytest.mark.parametrize("installer,hook", ALL_KINDS)
def test_text_is_ascii_with_crlf_line_endings_only(installer, hook):
    text = render(staged(installer, hook))
    text.decode("ascii")
    assert text.endswith(b"\r\n")
    assert text.count(b"\n") == text.count(b"\r\n") == text.count(b"\r")
    assert all(0x20 <= b < 0x7F for b in text.replace(b"\r\n", b"")), "control characters"


@pytest.mark.parametrize("installer,hook", ALL_KINDS)
def test_every_path_is_quoted(installer, hook):
    s = staged(installer, hook)
    lines = render(s).decode("ascii").split("\r\n")
    seen = 0
    for line in lines:
        for m in PATH.finditer(line):
            seen += 1
            if line.count('"', 0, m.start()) % 2:
                continue  # inside cmd.exe's double quotes
            # The one exception: the CmdLine value that a failed attempt writes back, in which
            # \"...\" are quotes for reg.exe's argument parser; to cmd.exe the path between them
            # is bare, so it must hold nothing cmd.exe acts on (the patterns make sure of it).
            path = m.group()[:-1] if m.group().endswith("\\") else m.group()
            end = m.start() + len(path)
            assert "/v CmdLine" in line, f"unquoted path {m.group()!r} in {line!r}"
            assert line[m.start() - 2:m.start()] == line[end:end + 2] == '\\"', line
            assert path == f"{s.folder}\\install.cmd" and re.fullmatch(r"[A-Za-z0-9_.:\\-]+", path), line
    assert seen >= 12
    assert s.cmdline == f'cmd.exe /c "{s.folder}\\install.cmd"'
    assert s.setupcomplete_line == f'call "{s.folder}\\install.cmd" & {MARKER} {s.id}'


@pytest.mark.parametrize("installer", ["dism", "pkgmgr"])
def test_installer_line_calls_system32_by_full_path_and_logs(installer):
    s = staged(installer)
    lines = render(s).decode("ascii").split("\r\n")
    assert f'{expected_call(s)} >> "%LOG%" 2>&1' in lines
    assert 'set "LOG=%HERE%\\install.log"' in lines and f'set "HERE={s.folder}"' in lines


def test_installer_for_nt_version():
    assert installer_for("6.0") == "pkgmgr"
    assert installer_for("6.0.6002") == "pkgmgr"
    assert [installer_for(v) for v in ("6.1", "6.2", "6.3", "10.0")] == ["dism"] * 4


UNSAFE = ["&", "|", "%", '"', "^", " ", "\n", "\r", "<", ">", "(", ")", "!", "\t", ";", ",", "=", "'", "`",
          "\\", "/", ":", "*", "?", "\x00", "\u00e9"]
SAFE = dict(id=ID, cab_name=CAB, system_root="C:\\Windows")


def unsafe_values():
    for ch in UNSAFE:
        yield "id", f"6.3.9600.18692{ch}-x64"
        yield "id", f"6.3.9600.18692-x64{ch}echo"
        yield "cab_name", f"Windows6.2{ch}x64.cab"
        yield "cab_name", f"{ch}Windows6.2-x64.cab"
        yield "system_root", f"C:\\Win{ch}dows"
        yield "system_root", f"C:\\Windows{ch}x"
    yield "id", ""
    yield "id", "6.3-x64 & calc"
    yield "id", "6.3.9600.18692-x86_64"
    yield "id", "..\\..\\x-x64"
    yield "cab_name", "a.cab & del /q C:\\*"
    yield "cab_name", "..\\a.cab"
    yield "cab_name", "a.cab.exe"
    yield "cab_name", "a" * 200 + ".cab"
    yield "system_root", "C:\\"
    yield "system_root", "C:"
    yield "system_root", "\\\\server\\share"
    yield "system_root", "C:\\Windows\\System32"
    yield "system_root", "C:\\Program Files"
    yield "system_root", "C:\\%SystemRoot%"


@pytest.mark.parametrize("field,value", list(unsafe_values()), ids=repr)
def test_refuses_values_that_could_reach_cmd_syntax(field, value):
    with pytest.raises(UnsafeScriptValue):
        StagedScript(**{**SAFE, field: value}, installer="dism", hook="setup-cmdline")


@pytest.mark.parametrize("field", ["id", "cab_name", "system_root"])
def test_refuses_a_trailing_newline(field):
    with pytest.raises(UnsafeScriptValue):
        StagedScript(**{**SAFE, field: SAFE[field] + "\n"}, installer="dism", hook="setup-cmdline")


def test_refuses_unknown_installer_or_hook():
    for kw in (dict(installer="dism.exe"), dict(installer="DISM"), dict(hook="runonce"), dict(hook="")):
        with pytest.raises(UnsafeScriptValue):
            staged(**kw)


def test_install_id():
    assert install_id("6.3.9600.18692", "x64") == "6.3.9600.18692-x64"
    assert install_id("10.0.14393.0", "arm64") == "10.0.14393.0-arm64"
    for version, arch in (("6.3.9600.18692", "x64 & calc"), ("6.3;x", "x86"), ("6.3", "amd64")):
        with pytest.raises(UnsafeScriptValue):
            install_id(version, arch)


# -- boots under Wine --------------------------------------------------------------------------

def detail(g: Guest, boot=None) -> str:
    return (f"\n--- boot output:\n{boot.output if boot else ''}\n--- install.log:\n{g.log()}\n"
            f"--- Setup: {g.setup_values()}\n--- calls: {g.installer_calls()}")


def assert_called(g: Guest, times: int) -> None:
    calls = g.installer_calls()
    assert len(calls) == times, calls
    for program, cmdline in calls:
        assert program.lower() == f"{SYSTEM32}\\{g.script.installer}.exe".lower()
        assert cmdline.rstrip(" ") == expected_call(g.script)  # cmd.exe leaves the blanks before >>


def assert_armed(g: Guest) -> None:
    values = g.setup_values()
    assert values.get("SetupType") == 2 and values.get("CmdLine") == g.script.cmdline, values
    assert "SetupShutdownRequired" not in values, values


def assert_final(g: Guest, codes: tuple[int, ...]) -> None:
    """What every final outcome leaves: result.txt, the log, the cab, the hook cleared."""
    last = codes[-1]
    success = last in (0, 3010)
    result = g.result()
    assert result is not None, detail(g)
    assert list(result) == ["exit_code", "attempts", "finished"], result
    assert result["exit_code"] == str(signed32(last)) and result["attempts"] == str(len(codes)), result
    assert re.search(r"\d", result["finished"]), result  # %DATE% %TIME%
    log = g.log()
    for attempt, code in enumerate(codes, 1):
        assert f"attempt {attempt} " in log and f"exit code {signed32(code)} " in log, log
    assert log.count("vhdtool stub installer: exit code") == len(codes), log  # the installer's output
    assert g.file("attempts.txt").read_bytes() == f"{len(codes)}\r\n".encode()
    if success:
        assert not g.cab.exists()
    else:
        assert g.cab.read_bytes() == CAB_BYTES
    values = g.setup_values()
    assert values.get("SetupType") == 0 and values.get("CmdLine") == "", values
    assert values.get("SetupShutdownRequired") == (1 if last == 3010 else None), values
    if g.script.hook == "setupcomplete":
        assert g.setupcomplete_path.read_bytes() == PRE_EXISTING
        assert not g.file("SetupComplete.new").exists()
    assert sorted(p.name for p in g.folder.iterdir()) == sorted(
        ["install.cmd", "install.log", "result.txt", "attempts.txt"] + ([] if success else [g.script.cab_name]))


def assert_further_boot_does_nothing(g: Guest, kb939857: bool) -> None:
    before = {p.name: p.read_bytes() for p in g.folder.iterdir()}
    calls = g.installer_calls()
    g.set_installer_exit(0)
    boot = g.boot(kb939857)
    assert not boot.ran, detail(g, boot)
    assert g.installer_calls() == calls
    assert {p.name: p.read_bytes() for p in g.folder.iterdir()} == before


@pytest.mark.parametrize("kb939857", BOOT_MODELS.values(), ids=BOOT_MODELS.keys())
@pytest.mark.parametrize("outcome", OUTCOMES)
@pytest.mark.parametrize("installer", ["dism", "pkgmgr"])
def test_setup_cmdline_boots(wine, installer, outcome, kb939857):
    """Setup CmdLine hook: install at the next boot; on failure re-arm and retry at each boot up
    to the cap; clear the hook in every final outcome; nothing on the boot after."""
    codes = OUTCOMES[outcome]
    g = Guest(wine, staged(installer))
    g.stage()
    assert_armed(g)
    for attempt, code in enumerate(codes, 1):
        g.set_installer_exit(code)
        boot = g.boot(kb939857)
        assert boot.ran, detail(g, boot)
        assert_called(g, attempt)
        if attempt < len(codes):  # failed, not the last attempt: the next boot retries
            assert_armed(g)
            assert g.result() is None and g.cab.read_bytes() == CAB_BYTES, detail(g, boot)
    assert_final(g, codes)
    assert_further_boot_does_nothing(g, kb939857)


@pytest.mark.parametrize("kb939857", BOOT_MODELS.values(), ids=BOOT_MODELS.keys())
@pytest.mark.parametrize("outcome", OUTCOMES)
def test_setupcomplete_boots(wine, outcome, kb939857):
    """Generalized image: SetupComplete.cmd calls install.cmd once, after the lines it already had;
    a failure re-arms the Setup CmdLine hook for the boots after; every final outcome removes our
    line from SetupComplete.cmd (the rest byte-identical) and leaves the Setup key cleared."""
    codes = OUTCOMES[outcome]
    g = Guest(wine, staged(hook="setupcomplete"), setupcomplete_before=PRE_EXISTING)
    g.stage()
    site = wine.host(SITE_LOG)
    site.unlink(missing_ok=True)
    g.set_installer_exit(codes[0])
    boot = g.setupcomplete_boot()
    assert site.read_bytes() == b"site setup ran\r\n", detail(g, boot)  # what was there ran as before
    assert_called(g, 1)
    for attempt, code in enumerate(codes[1:], 2):
        assert_armed(g)
        assert g.result() is None and g.cab.read_bytes() == CAB_BYTES, detail(g, boot)
        g.set_installer_exit(code)
        boot = g.boot(kb939857)
        assert boot.ran, detail(g, boot)
        assert_called(g, attempt)
    assert_final(g, codes)
    assert_further_boot_does_nothing(g, kb939857)
    assert site.read_bytes() == b"site setup ran\r\n"


@pytest.mark.parametrize("kb939857", BOOT_MODELS.values(), ids=BOOT_MODELS.keys())
def test_failure_then_success_on_the_next_boot(wine, kb939857):
    g = Guest(wine, staged())
    g.stage()
    for code in (1603, 0):
        g.set_installer_exit(code)
        assert g.boot(kb939857).ran
    assert_called(g, 2)
    assert_final(g, (1603, 0))
    assert_further_boot_does_nothing(g, kb939857)


def test_run_again_after_giving_up_calls_nothing_and_clears(wine):
    """Were the hook armed again after the last failure, the script gives up at once."""
    g = Guest(wine, staged())
    g.stage()
    codes = OUTCOMES["fails-3-times"]
    for code in codes:
        g.set_installer_exit(code)
        assert g.boot(False).ran
    result = g.file("result.txt").read_bytes()
    wine.reg_add("SetupType", "REG_DWORD", 2)
    wine.reg_add("CmdLine", "REG_SZ", g.script.cmdline)
    boot = g.boot(False)
    assert boot.ran
    assert_called(g, MAX_ATTEMPTS)
    assert g.file("result.txt").read_bytes() == result
    values = g.setup_values()
    assert values.get("SetupType") == 0 and values.get("CmdLine") == "", detail(g, boot)


def test_power_lost_in_every_attempt_gives_up_after_three(wine):
    """An attempt cut short (power loss, hard reset) counts; after the cap the script writes
    exit_code=-1 without calling the installer again, and clears the hook."""
    g = Guest(wine, staged())
    g.stage()
    for attempt in range(1, MAX_ATTEMPTS + 1):
        g.set_installer_exit("poweroff")
        boot = g.boot(False)
        assert boot.ran and "power lost" in g.log(), detail(g, boot)
        assert_called(g, attempt)
        assert g.result() is None
        assert_armed(g)  # setup left SetupType as it was, and install.cmd never got to clear it
    g.set_installer_exit(0)
    boot = g.boot(False)
    assert boot.ran
    assert_called(g, MAX_ATTEMPTS)
    result = g.result()
    assert result and result["exit_code"] == "-1" and result["attempts"] == str(MAX_ATTEMPTS), detail(g, boot)
    assert g.cab.read_bytes() == CAB_BYTES
    values = g.setup_values()
    assert values.get("SetupType") == 0 and values.get("CmdLine") == "", values
    assert_further_boot_does_nothing(g, False)


@pytest.mark.parametrize("kb939857", [
    False,
    True],
    ids=BOOT_MODELS.keys())
def test_power_lost_during_an_attempt_is_retried_at_the_next_boot(wine, kb939857):
    g = Guest(wine, staged())
    g.stage()
    g.set_installer_exit("poweroff")
    boot = g.boot(kb939857)
    assert boot.ran and "power lost" in g.log(), detail(g, boot)
    g.set_installer_exit(0)
    boot = g.boot(kb939857)
    assert boot.ran, detail(g, boot)
    assert_called(g, 2)
    result = g.result()
    assert result and result["exit_code"] == "0" and result["attempts"] == "2", detail(g, boot)


def test_run_again_after_success_calls_nothing(wine):
    g = Guest(wine, staged())
    g.stage()
    g.set_installer_exit(0)
    assert g.boot(False).ran
    result = g.file("result.txt").read_bytes()
    wine.reg_add("SetupType", "REG_DWORD", 2)
    wine.reg_add("CmdLine", "REG_SZ", g.script.cmdline)
    g.set_installer_exit(0x80070002)  # dism on a cab that is not there: file not found
    boot = g.boot(False)
    assert boot.ran
    assert_called(g, 1)
    assert g.file("result.txt").read_bytes() == result
    values = g.setup_values()
    assert values.get("SetupType") == 0 and values.get("CmdLine") == "", detail(g, boot)


def test_wine_session(wine):
    """The prefix the boot tests ran in: 64-bit, Wine's own cmd.exe and reg.exe, the stubs native."""
    assert wine.version.startswith("wine-"), wine.version
    env = wine.reg_values("HKLM\\SYSTEM\\CurrentControlSet\\Control\\Session Manager\\Environment")
    assert env.get("PROCESSOR_ARCHITECTURE") == "AMD64", env  # the stubs are x86-64 programs
    overrides = wine.reg_values("HKCU\\Software\\Wine\\DllOverrides")
    assert overrides.get("dism.exe") == overrides.get("pkgmgr.exe") == "native", overrides


@pytest.mark.fixtures
@pytest.mark.parametrize("exit_code,cbs,reboot,final", [(0, 0x70, False, "installed"),
                                                        (3010, 0x60, True, "reboot-pending")])
def test_staged_image_boots_under_wine_and_status_reads_the_result(wine, tmp_path, exit_code, cbs, reboot, final):
    """The round trip: `vhdtool stage` writes a fixture image; its install.cmd (read back with ntfscat)
    runs at a simulated boot; what the boot left (result.txt, install.log, attempts.txt, the Setup
    values) is written back into the image, then what dism would have left in Component Based
    Servicing; `vhdtool status` reads `installed`, or `reboot-pending` after exit code 3010."""
    import json
    import shutil as sh

    import vhdtool
    from conftest import run_cli
    from fixtures import build as fb
    from fixtures.cabs import CabSpec, build_cab
    from judges.volumes import extract_partition, ntfscat, raw_image
    from offline_boot import CBS, BootEffects, write_boot

    image = tmp_path / "guest.vhdx"
    sh.copyfile(fb.build("ws2008r2-x64"), image)
    cabs = tmp_path / "cabs"
    build_cab(CabSpec("6.1", "x64", "6.2.9200.16384"), cabs)
    code, out, err = run_cli("stage", "--json", image, "--host", "win8", "--cabs", cabs)
    assert code == 0, err
    doc = json.loads(out)
    script = StagedScript(id=doc["id"], cab_name=doc["cab"]["name"], installer="dism", system_root="C:\\Windows",
                          hook="setup-cmdline")
    part = extract_partition(raw_image(image, tmp_path / "disk.raw"), 2, tmp_path / "p2.img")
    assert ntfscat(part, f"{script.guest_folder}/install.cmd") == render(script)
    g = Guest(wine, script)
    g.stage()
    g.set_installer_exit(exit_code)
    assert g.boot(kb939857=False).ran
    assert g.result()["exit_code"] == str(exit_code)
    assert not g.file(script.cab_name).exists()  # install.cmd deleted the cab: package.txt names the package
    with vhdtool.edit(image) as ed:
        for name in ("result.txt", "install.log", "attempts.txt"):
            ed.write_file(f"{script.guest_folder}/{name}", g.file(name).read_bytes())
        ed.delete(f"{script.guest_folder}/{script.cab_name}")
        values = g.setup_values()
        ed.set_value("SYSTEM", "Setup", "SetupType", values["SetupType"], "REG_DWORD")
        ed.set_value("SYSTEM", "Setup", "CmdLine", values["CmdLine"], "REG_SZ")
    code, out, err = run_cli("status", "--json", image)
    st = json.loads(out)
    # The stub dism records nothing in Component Based Servicing: a success Windows does not bear out.
    assert code == 0 and st["state"] == "inconsistent", st
    assert (st["staged"][0]["exit_code"], st["staged"][0]["attempts"]) == (exit_code, 1)
    assert st["staged"][0]["finished"]
    identity = doc["cab"]["cbs_identity"]
    assert st["staged"][0]["cbs"] == {"identity": identity, "current_state": None, "state": "absent"}
    # What the real dism would have left: the package Installed in CBS (written by hivexsh, copied in by ntfscp).
    effects = BootEffects()
    effects.hive("SOFTWARE").set(f"{CBS}\\Packages\\{identity}", {"CurrentState": cbs})
    if reboot:
        effects.hive("SOFTWARE").set(f"{CBS}\\RebootPending")
    write_boot(image, 2, effects, tmp_path / "cbs")
    st = json.loads(run_cli("status", "--json", image)[1])
    assert st["state"] == final and st["staged"][0]["cbs"]["current_state"] == cbs, st
    assert st["cbs"] == {"reboot_pending": reboot, "packages_pending": False}
