"""Adversarial probes of `vhdtool stage` / `status` on Windows guests over earlier stagings and boot hooks.

Inputs are fixture images whose earlier boot is written by tools other than vhdtool (ntfs-3g's ntfscp,
hivexsh: ``tests/offline_boot.py``); the results are judged by ntfsls/ntfscat, hivexget, qemu-img check,
and the staged install.cmd is run under Wine (``tests/wine_boot.py``).
"""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import digest, work_copy
from fixtures.cabs import CabSpec, build_iso
from judges.hives import hive_typed_values
from judges.volumes import ntfs_names as ntfsls
from judges.volumes import ntfscat
from judges.volumes import partition_volume as volume
from offline_boot import install_cmd_finished, write_boot
from wine_boot import SYSTEM32, Guest
from vhdtool.stage.script import StagedScript

pytestmark = pytest.mark.fixtures
IC = "6.2.9200.16384"
STAGED = "/Windows/vhdtool"
CAB = "Windows6.1-HyperVIntegrationServices-x64.cab"
REG_SZ, REG_DWORD = 1, 4


@pytest.fixture(scope="module")
def iso(tmp_path_factory):
    root = tmp_path_factory.mktemp("isos")
    return build_iso([CabSpec(nt, "x64", IC) for nt in ("6.1", "6.2")], root / "vmguest.iso")


def setupcomplete_boot(wine, doc: dict, part, staged: bytes):
    """The staged files and ``staged`` SetupComplete.cmd put into the Wine guest, and its end-of-setup boot run
    (the installer stub exits 0): the guest, the file the user's SITE line writes, and the boot."""
    script = StagedScript(id=doc["id"], cab_name=doc["cab"]["name"], installer="dism", system_root="C:\\Windows",
                          hook="setupcomplete")
    g = Guest(wine, script)
    g.folder.mkdir(parents=True)
    for f in doc["files"]:
        (g.folder / f["path"].rsplit("/", 1)[1]).write_bytes(ntfscat(part, f["path"]))
    wine.reg_add("SetupType", "REG_DWORD", 0)
    wine.reg_add("CmdLine", "REG_SZ", "")
    g.setupcomplete_path.parent.mkdir(parents=True, exist_ok=True)
    g.setupcomplete_path.write_bytes(staged)
    site = wine.host(SITE.decode())
    site.unlink(missing_ok=True)
    g.set_installer_exit(0)
    boot = g.setupcomplete_boot()
    return g, site, boot


def stage(cli, image, iso, *extra) -> dict:
    code, out, err = cli("stage", "--json", image, "--host", "win8", "--cabs", iso, *extra)
    assert code == 0, err
    return json.loads(out)


def setup_values(part, tmp) -> dict:
    hive = tmp / "SYSTEM.judged"
    hive.write_bytes(ntfscat(part, "/Windows/System32/config/SYSTEM"))
    values = hive_typed_values(hive, "Setup")
    hive.unlink()
    return values


def qemu_clean(image) -> None:
    res = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
    assert res.returncode == 0 and "No errors were found" in res.stdout, res.stdout + res.stderr


@pytest.mark.parametrize("exit_code", [1603, -1])
def test_staging_again_after_a_failed_run_of_the_same_cab_runs_it_again(cli, iso, wine, tmp_path, exit_code):
    """The same cab staged again after its staging failed for good (result.txt written by install.cmd's last
    attempt, or by its give-up): `stage` says staged and arms the hook, so the next boot must install it.
    install.cmd skips to clearing the hook while result.txt exists, so the finished run's result.txt and
    attempts.txt must go (as on Linux guests); install.log is kept."""
    image = work_copy("ws2008r2-x64", tmp_path)
    first = stage(cli, image, iso)
    script = StagedScript(id=first["id"], cab_name=first["cab"]["name"], installer="dism",
                          system_root="C:\\Windows", hook="setup-cmdline")
    folder = script.guest_folder
    # What the last failed boot left, written by ntfscp and hivexsh.
    write_boot(image, 2, install_cmd_finished(folder, exit_code, attempts=3), tmp_path / "boot")
    st = json.loads(cli("status", "--json", image)[1])
    assert st["state"] == "failed", st
    before = digest(image)
    dry = stage(cli, image, iso, "--dry-run")
    assert sorted(f["path"] for f in dry["changes"]["files"] if f["action"] == "delete") == \
        [f"{folder}/attempts.txt", f"{folder}/result.txt"] and digest(image) == before, dry
    again = stage(cli, image, iso)
    assert again["staged"] and again["committed"], again
    qemu_clean(image)
    part = volume(image, tmp_path, 2)
    names = ntfsls(part, folder)
    assert "result.txt" not in names and "attempts.txt" not in names, names
    assert "install.log" in names and CAB in names, names
    values = setup_values(part, tmp_path)
    assert values["SetupType"] == (REG_DWORD, 2) and values["CmdLine"] == (REG_SZ, script.cmdline), values
    st = json.loads(cli("status", "--json", image)[1])
    assert st["state"] == "pending" and st["staged"][0]["state"] == "pending", st
    # The next boot, under Wine, with the folder as the image holds it: the installer runs, attempt 1.
    g = Guest(wine, script)
    g.folder.mkdir(parents=True)
    for name in names:
        (g.folder / name).write_bytes(ntfscat(part, f"{folder}/{name}"))
    wine.reg_add("SetupType", "REG_DWORD", 2)
    wine.reg_add("CmdLine", "REG_SZ", script.cmdline)
    g.set_installer_exit(0)
    assert g.boot(kb939857=False).ran
    calls = g.installer_calls()
    assert len(calls) == 1 and calls[0][0].lower() == f"{SYSTEM32}\\dism.exe".lower(), calls
    assert g.result()["exit_code"] == "0" and g.result()["attempts"] == "1", g.result()
    # A third identical stage writes nothing.
    before = digest(image)
    assert stage(cli, image, iso)["bytes_written"] == 0 and digest(image) == before


# -- the Setup hook of someone else ----------------------------------------------------------------

def _set_setup(image, tmp, values: dict) -> None:
    """SYSTEM\\Setup values written by hivexsh (tests/offline_boot.py), as another tool would leave them."""
    from offline_boot import BootEffects

    effects = BootEffects()
    effects.hive("SYSTEM").set("Setup", values)
    write_boot(image, 2, effects, tmp / "setup")


@pytest.mark.parametrize("values", [
    # Another tool's script in a folder that happens to be called vhdtool.
    {"SetupType": 2, "CmdLine": 'cmd.exe /c "C:\\Tools\\vhdtool\\deploy.cmd"'},
    # Ours with another command after it: replacing it would drop that command.
    {"SetupType": 2, "CmdLine": 'cmd.exe /c "C:\\Windows\\vhdtool\\6.1.7601.17514-x64\\install.cmd" & C:\\site\\x.exe'},
], ids=["other-vhdtool-folder", "ours-and-more"])
def test_a_setup_cmdline_that_only_looks_like_ours_is_refused(cli, iso, tmp_path, values):
    image = work_copy("ws2008r2-x64", tmp_path)
    _set_setup(image, tmp_path, values)
    before = digest(image)
    for extra in (("--dry-run",), ()):
        code, out, err = cli("stage", image, "--host", "win8", "--cabs", iso, *extra)
        assert code == 20 and "another setup command is pending" in err and err.count("\n") == 1, (code, err)
        assert digest(image) == before
    out = tmp_path / "out.vhdx"
    code, _, err = cli("stage", image, "--host", "win8", "--cabs", iso, "--output", out)
    assert code == 20 and not out.exists() and digest(image) == before, err
    part = volume(image, tmp_path, 2)
    assert setup_values(part, tmp_path)["CmdLine"] == (REG_SZ, values["CmdLine"])


def test_a_setup_cmdline_of_another_registry_type_is_refused_not_a_crash(cli, iso, tmp_path):
    """CmdLine as REG_MULTI_SZ or REG_BINARY (hivexsh writes them): a refusal (exit 20), not an internal error."""
    import vhdtool

    for name, kind, value in (("multi", "REG_MULTI_SZ", ["C:\\site\\a.exe", "b"]), ("binary", "REG_BINARY", b"\x01\x02")):
        (tmp_path / name).mkdir()
        image = work_copy("ws2008r2-x64", tmp_path / name)
        with vhdtool.edit(image) as ed:  # hivexsh cannot write REG_MULTI_SZ from a script; the judge reads it back
            ed.set_value("SYSTEM", "Setup", "CmdLine", value, kind)
        part = volume(image, tmp_path / name, 2)
        assert setup_values(part, tmp_path / name)["CmdLine"][0] == {"REG_MULTI_SZ": 7, "REG_BINARY": 3}[kind]
        before = digest(image)
        for extra in (("--dry-run",), ()):
            code, out, err = cli("stage", image, "--host", "win8", "--cabs", iso, *extra)
            assert code == 20 and "another setup command is pending" in err and "internal error" not in err, (code, err)
            assert digest(image) == before


# -- a generalized image's SetupComplete.cmd as the user left it ----------------------------------

SC = "/Windows/Setup/Scripts/SetupComplete.cmd"
SITE = b"C:\\vhdtool-test\\site.txt"
NEW_IC = "6.3.9600.16384"  # newer than the Server 2012 fixture's 6.2.9200.16384


@pytest.fixture(scope="module")
def iso81(tmp_path_factory):
    root = tmp_path_factory.mktemp("iso81")
    return build_iso([CabSpec(nt, "x64", NEW_IC) for nt in ("6.1", "6.2")], root / "vmguest81.iso")


def sysprepped_with(tmp_path, content: bytes):
    """The generalized fixture with ``content`` as its SetupComplete.cmd, written by ntfscp."""
    from offline_boot import BootEffects

    image = work_copy("ws2012-sysprep", tmp_path)
    effects = BootEffects()
    effects.files[SC] = content
    write_boot(image, 1, effects, tmp_path / "sc")
    return image


ONE, TWO = b"echo one>> " + SITE, b"echo two>> " + SITE


@pytest.mark.parametrize("content,appended", [
    (b"@echo off\n" + ONE + b"\n" + TWO + b"\n", b""),  # LF only
    (b"@echo off\r\n" + ONE + b"\r\n" + TWO, b"\r\n"),  # no newline at the end
    (b"@echo off\r\n" + ONE + b"\r\n" + TWO + b"\r\n\x1a", b"\r\n"),  # an old editor's Ctrl-Z
    # An exit that a label follows: the appended line is the end of the subroutine called.
    (b"@echo off\r\ncall :sub\r\n" + TWO + b"\r\nexit /b 0\r\n:sub\r\n" + ONE + b"\r\n", b""),
    # A conditional exit, in a block.
    (b"@echo off\r\n" + ONE + b"\r\nif not exist C:\\Windows (\r\n  exit /b 1\r\n)\r\n" + TWO + b"\r\n", b""),
], ids=["lf", "no-final-newline", "ctrl-z", "exit-then-label", "exit-in-a-block"])
def test_user_setupcomplete_runs_first_and_is_left_as_it_was(cli, iso81, wine, tmp_path, content, appended):
    """The user's lines are kept byte for byte (a line end added only where the last one had none), run
    before install.cmd under Wine, and are what is left once install.cmd has dropped its own line."""
    image = sysprepped_with(tmp_path, content)
    doc = stage(cli, image, iso81, "--host", "win8.1")
    assert doc["boot_hook"]["kind"] == "setupcomplete"
    part = volume(image, tmp_path, 1)
    line = doc["boot_hook"]["command"].encode() + b"\r\n"
    staged = ntfscat(part, SC)
    assert staged == content + appended + line
    g, site, boot = setupcomplete_boot(wine, doc, part, staged)
    expected_site = b"one\r\ntwo\r\n" if b"two" in content else b"one\r\n"
    assert site.read_bytes() == expected_site, boot.output
    assert len(g.installer_calls()) == 1 and g.result()["exit_code"] == "0", boot.output
    assert g.setupcomplete_path.read_bytes() == content + appended


@pytest.mark.parametrize("content,why", [
    (b"@echo off\r\necho one>> " + SITE + b"\r\nexit /b 0\r\n", "line 3 ('exit /b 0')"),
    (b"@echo off\r\ncall :sub\r\nexit\r\n:sub\r\necho one\r\ngoto :eof\r\n", "line 6 ('goto :eof')"),
    (b"@echo off\r\necho one\r\n@GOTO:EOF\r\n", "line 3 ('@GOTO:EOF')"),
    ("@echo off\r\necho one\r\n".encode("utf-16"), "UTF-16"),
], ids=["exit-b", "exit", "goto-eof", "utf-16"])
def test_a_setupcomplete_whose_end_is_never_reached_is_refused(cli, iso81, tmp_path, content, why):
    """A line appended after ``exit``/``goto :eof`` never runs (seen under Wine: no installer call, status
    pending for ever), nor one in a UTF-16 file (cmd.exe does not run those): refused, image unchanged."""
    image = sysprepped_with(tmp_path, content)
    before = digest(image)
    for extra in (("--dry-run",), ()):
        code, out, err = cli("stage", image, "--host", "win8.1", "--cabs", iso81, *extra)
        assert code == 5 and why in err and "SetupComplete.cmd" in err and err.count("\n") == 1, (code, err)
        assert digest(image) == before
    out = tmp_path / "out.vhdx"
    code, _, err = cli("stage", image, "--host", "win8.1", "--cabs", iso81, "--output", out)
    assert code == 5 and not out.exists() and digest(image) == before, err
    assert ntfscat(volume(image, tmp_path, 1), SC) == content


def test_our_line_is_moved_last_when_lines_were_appended_after_it(cli, iso81, wine, tmp_path):
    """Staged, then another tool appended its own line: staging again puts ours last (Windows' cmd.exe reads on
    at the byte offset it had reached when install.cmd drops our line, so a line after ours would be cut). A
    commented-out copy of our line is not ours."""
    image = work_copy("ws2012-sysprep", tmp_path)
    original = ntfscat(volume(image, tmp_path, 1), SC)
    doc = stage(cli, image, iso81, "--host", "win8.1")
    line = doc["boot_hook"]["command"].encode() + b"\r\n"
    other = b"echo other>> " + SITE + b"\r\n"
    from offline_boot import BootEffects

    effects = BootEffects()
    effects.files[SC] = b"rem " + line + original + line + other
    write_boot(image, 1, effects, tmp_path / "other")
    again = stage(cli, image, iso81, "--host", "win8.1")
    assert again["committed"] and [f["path"] for f in again["changes"]["files"]] == [SC], again
    part = volume(image, tmp_path, 1)
    staged = ntfscat(part, SC)
    assert staged == b"rem " + line + original + other + line
    qemu_clean(image)
    # Under Wine: the other tool's line runs, then ours; install.cmd leaves the rest as it was.
    g, site, boot = setupcomplete_boot(wine, doc, part, staged)
    assert site.read_bytes() == b"other\r\n" and len(g.installer_calls()) == 1, boot.output
    assert g.setupcomplete_path.read_bytes() == original + other


# -- status over odd staging folders --------------------------------------------------------------

@pytest.mark.parametrize("folder_kind,expected", [
    ("file", ("none", [])),  # a file named like an id is nobody's staging (as on Linux)
    ("result.txt", ("failed", [("failed", None)])),  # install.cmd's `if exist` takes it for a finished run
    ("attempts.txt", ("pending", [("pending", None)])),
    ("install.log", ("pending", [("pending", None)])),
])
def test_status_over_a_folder_where_a_staging_file_should_be(cli, tmp_path, folder_kind, expected):
    """Folders (made with vhdtool's writer, checked with ntfsls) where status reads files: a reading, not
    exit 4 with libntfs's "No such stream" (the volume is not corrupt), and the image unchanged."""
    import vhdtool

    image = work_copy("ws2008r2-x64", tmp_path)
    staging = f"{STAGED}/6.3.9600.16384-x64"
    with vhdtool.edit(image) as ed:
        if folder_kind == "file":
            ed.write_file(staging, b"not a folder\r\n")
        else:
            ed.write_file(f"{staging}/install.cmd", b"rem\r\n")
            ed.mkdir(f"{staging}/{folder_kind}/sub")
    part = volume(image, tmp_path, 2)
    if folder_kind == "file":
        assert ntfscat(part, staging) == b"not a folder\r\n"
    else:
        assert ntfsls(part, f"{staging}/{folder_kind}") == ["sub"]
    before = digest(image)
    code, out, err = cli("status", "--json", image)
    assert code == 0, err
    st = json.loads(out)
    assert (st["state"], [(s["state"], s["exit_code"]) for s in st["staged"]]) == expected, st
    assert digest(image) == before


def test_staging_again_after_power_was_lost_in_the_last_attempt_runs_it_again(cli, iso, wine, tmp_path):
    """attempts.txt at 3 and no result.txt (`status`: running, 3 attempts): install.cmd would give up at the next
    boot without running the installer, so staging the same cab again must reset the count."""
    from offline_boot import BootEffects

    image = work_copy("ws2008r2-x64", tmp_path)
    first = stage(cli, image, iso)
    script = StagedScript(id=first["id"], cab_name=first["cab"]["name"], installer="dism",
                          system_root="C:\\Windows", hook="setup-cmdline")
    folder = script.guest_folder
    effects = BootEffects()  # what a power loss during attempt 3 leaves (the hook stays armed)
    effects.files[f"{folder}/attempts.txt"] = b"3\r\n"
    effects.files[f"{folder}/install.log"] = b"[Mon 12/07/2026  6:00:00.00] attempt 3 \r\n"
    write_boot(image, 2, effects, tmp_path / "boot")
    st = json.loads(cli("status", "--json", image)[1])
    assert (st["staged"][0]["state"], st["staged"][0]["attempts"]) == ("running", 3), st
    again = stage(cli, image, iso)
    assert again["committed"], again
    part = volume(image, tmp_path, 2)
    names = ntfsls(part, folder)
    assert "attempts.txt" not in names and "install.log" in names, names
    g = Guest(wine, script)
    g.folder.mkdir(parents=True)
    for name in names:
        (g.folder / name).write_bytes(ntfscat(part, f"{folder}/{name}"))
    values = setup_values(part, tmp_path)
    wine.reg_add("SetupType", "REG_DWORD", values["SetupType"][1])
    wine.reg_add("CmdLine", "REG_SZ", values["CmdLine"][1])
    g.set_installer_exit(0)
    assert g.boot(kb939857=False).ran
    assert len(g.installer_calls()) == 1 and g.result()["attempts"] == "1", (g.installer_calls(), g.result())


@pytest.mark.parametrize("text,code", [
    (b"99999999999999999999999", None),  # no 32-bit exit code: the guest's file is foreign
    (b"4294967296", None),
    (b"-2147483649", None),
    (b"-2147483648", -2147483648),  # cmd prints 0x80000000 signed
    (b"4294967295", 4294967295),
    (b"1603", 1603),
])
def test_a_result_exit_code_no_windows_exit_code_can_be_is_unknown(text, code):
    """result.txt is the guest's file: a number outside a 32-bit exit code's range is read as no number (a finished
    run whose outcome is unknown), not passed on into status JSON and reports as it stands."""
    from vhdtool.stage.status import parse_state

    state = parse_state("6.3.9600.18692-x64", b"exit_code=" + text + b"\r\nattempts=1\r\n", None, None)
    assert state.exit_code == code and state.state == "failed"
