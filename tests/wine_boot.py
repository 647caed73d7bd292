"""Simulated boots of a staged install.cmd under Wine, for tests/test_stage_script.py.

No Windows boots here, so Wine's own cmd.exe and reg.exe run the script, in a 64-bit Wine prefix
made once per test session. What Windows would provide and Wine cannot is replaced by small
programs built from tests/stubs/ with mingw-w64:

- stub_installer.c, copied to %SystemRoot%\\System32 as dism.exe and pkgmgr.exe: records its
  command line and exits with the code a test gives it (or "loses power");
- run_setup.c: starts the Setup CmdLine exactly as Windows setup does (the registry value
  verbatim to CreateProcessW, no shell in between), or runs a batch file as setup runs
  SetupComplete.cmd (``cmd.exe /c "PATH"``);
- findstr.c: used only where Wine's findstr.exe does not filter (Wine 8.0's is a stub that
  prints nothing); the probe in WinePrefix decides.

Wine loads its builtin programs in place of files of the same name in system32 unless told
otherwise, so the prefix's DllOverrides mark these as native.

Every Wine process runs with address space randomisation off (``setarch -R``, inherited by the
processes Wine starts from it). Debian's wine64 8.0 ships no wine64-preloader, the program that
reserves the fixed ranges Windows programs expect before anything else is mapped; the loader
wine64 is a non-PIE executable at 0x7d000000 and, with randomisation on, its brk heap starts up to
32 MiB above it and can reach the shared user data page at 0x7ffe0000. Then the process dies
starting ("err:virtual:virtual_alloc_first_teb wine: failed to map the shared user data:
c0000018"): a reg.exe exits 1 having printed nothing (its message was hidden by WINEDEBUG=-all),
a stub installer started by install.cmd is "not recognized" (9009). It happened about once in a
few thousand process starts, so about once per full run of the boot tests. Without randomisation
the heap starts right after the loader and never gets there.

One wineserver serves the prefix for the whole session, and the registry the boots read and write
lives in its memory (it writes system.reg back only now and then). Were that server to go away, the
next ``wine`` would silently start a new one (Debian's wrapper gives it -p0: it exits with its last
client, so every later call would start yet another), which reloads system.reg as last saved and
runs wineboot again: values set seconds before are gone, keys come back, and a call racing the
change fails without a word (``reg query`` exits 1 having printed one empty line). So
``WinePrefix.wine`` checks before and after every call that the server it started is still the
one running, and says so when it is not, instead of letting a boot read a reverted registry.
Wine's own error channel stays on (``WINEDEBUG=-all,err+all``) so that what Wine had to say
about a failure is in the message.

A boot is modelled as Windows runs the hooks: ``Guest.boot`` starts CmdLine only when
SetupType is 1 or 2 at boot start and CmdLine is not empty (both read with reg.exe), and with
``kb939857=True`` sets SetupType to 0 before starting it, as KB939857 says setup does;
otherwise it leaves SetupType as it is. ``Guest.setupcomplete_boot`` is the first boot of a
generalized image, the only one on which Windows runs SetupComplete.cmd.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath

from vhdtool.stage.script import StagedScript, render

STUBS = Path(__file__).resolve().parent / "stubs"
SETUP_KEY = "HKLM\\SYSTEM\\Setup"
TOOLS = "C:\\vhdtool-test"  # run_setup.exe, probes, the running copy of SetupComplete.cmd
SYSTEM32 = "C:\\Windows\\System32"
# By full path: given a bare "reg", wine goes through start.exe and ShellExecuteEx, one more process
# start that could fail ("ShellExecuteEx failed: Internal error.").
CMD = SYSTEM32 + "\\cmd.exe"
REG = SYSTEM32 + "\\reg.exe"
STUB_CALLS = SYSTEM32 + "\\vhdtool-stub-calls.txt"
STUB_EXIT = SYSTEM32 + "\\vhdtool-stub-exitcode.txt"
SETUP_COMPLETE = "C:\\Windows\\Setup\\Scripts\\SetupComplete.cmd"
CAB_BYTES = b"MSCF\0\0\0\0" + bytes(range(256)) * 4  # a dummy cab: the stubs never open it
NATIVE = ("dism.exe", "pkgmgr.exe")
TOOLCHAIN = ("wine", "wineboot", "wineserver", "x86_64-w64-mingw32-gcc", "setarch")
# Prefix of every Wine command: no address space randomisation (see the module docstring).
NO_ASLR = ("setarch", "-R")


class WineUnusable(RuntimeError):
    """Wine is installed but cannot run a program in a new prefix here."""


def missing_tools() -> str | None:
    """Why the Wine tests cannot run at all (tools not installed), or None."""
    missing = [tool for tool in TOOLCHAIN if not shutil.which(tool)]
    if missing:
        return (f"not installed: {', '.join(missing)} (install.sh --test installs the Debian packages "
                "wine, wine64 and gcc-mingw-w64-x86-64)")
    return None


def build_stubs(out: Path) -> dict[str, Path]:
    """tests/stubs/*.c compiled for x86-64 Windows, in parallel: {"stub_installer": exe, ...}."""
    out.mkdir(parents=True, exist_ok=True)
    jobs = {}
    for source in sorted(STUBS.glob("*.c")):
        exe = out / (source.stem + ".exe")
        cmd = ["x86_64-w64-mingw32-gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-municode", "-s",
               "-o", str(exe), str(source)]
        jobs[source.stem] = (exe, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                    text=True))
    for name, (exe, proc) in jobs.items():
        output, _ = proc.communicate(timeout=300)
        if proc.returncode:
            raise RuntimeError(f"building tests/stubs/{name}.c failed:\n{output}")
    return {name: exe for name, (exe, _) in jobs.items()}


def signed32(code: int) -> int:
    """An exit code as cmd.exe's %ERRORLEVEL% shows it (0x800F081F is -2146498529)."""
    code &= 0xFFFFFFFF
    return code - (1 << 32) if code >= 1 << 31 else code


class WinePrefix:
    """A 64-bit Wine prefix with its own persistent wineserver, the stubs installed."""

    def __init__(self, root: Path):
        self.root = root
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("WINE", "WAYLAND"))}
        # err+all: Wine's own error lines (a server it had to start, a boot that timed out) reach
        # stderr and so the failure message; fixme and warn lines stay off.
        self.env.update(WINEPREFIX=str(root), WINEARCH="win64", WINEDEBUG="-all,err+all", DISPLAY="",
                        # no Mono or Gecko prompts, no menu entries: none of them is needed here
                        WINEDLLOVERRIDES="mscoree,mshtml=;winemenubuilder.exe=d")
        self.version = ""
        self.server_pid: int | None = None  # the persistent wineserver this session started
        self.findstr = ""
        self.created_seconds = 0.0

    @classmethod
    def create(cls, root: Path, build: Path) -> WinePrefix:
        prefix = cls(root)
        start = time.monotonic()
        try:
            prefix._boot()
            prefix._install_tools(build_stubs(build))
        except BaseException:
            prefix.close()
            raise
        prefix.created_seconds = time.monotonic() - start
        return prefix

    def _boot(self) -> None:
        self.root.mkdir(parents=True)
        self.version = subprocess.run([*NO_ASLR, "wine", "--version"], env=self.env, capture_output=True, text=True,
                                      timeout=60).stdout.strip()
        # One wineserver for the whole session, kept running between calls (-p): each wine call
        # then takes about 0.1 s instead of starting a server and Wine's services anew. It goes
        # into the background holding whatever it was given as stdout, hence no pipes.
        server = subprocess.run([*NO_ASLR, "wineserver", "-p"], env=self.env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        if server.returncode:
            raise WineUnusable(f"{self.version}: wineserver -p exited {server.returncode}")
        self.server_pid = self._running_server()
        if self.server_pid is None:
            raise WineUnusable(f"{self.version}: wineserver -p exited 0 but no server runs for {self.root}")
        log = self.root / "wineboot.log"
        with open(log, "wb") as out:
            boot = subprocess.run([*NO_ASLR, "wineboot", "-i"], env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                                  stderr=subprocess.STDOUT, timeout=600)
        probe = self.wine(CMD, "/c", "exit", "7", check=False)
        if boot.returncode or probe.returncode != 7:
            raise WineUnusable(f"{self.version}: wineboot -i exited {boot.returncode}, `wine cmd /c exit 7` "
                               f"exited {probe.returncode}; wineboot said: "
                               f"{log.read_text(errors='replace').strip()[-2000:]}")

    def _install_tools(self, exes: dict[str, Path]) -> None:
        tools = self.host(TOOLS)
        tools.mkdir(parents=True, exist_ok=True)
        shutil.copy(exes["run_setup"], tools / "run_setup.exe")
        for name in NATIVE:
            shutil.copy(exes["stub_installer"], self.host(f"{SYSTEM32}\\{name}"))
        natives = list(NATIVE)
        # Wine 8.0's findstr.exe is a stub ("fixme:findstr:wmain stub") that prints nothing, which
        # would leave install.cmd an empty SetupComplete.cmd. Where it filters, it is used as is.
        (tools / "probe.txt").write_bytes(b"keep one\r\ndrop vhdtool-staged 1.2-x64\r\nkeep two\r\n")
        (tools / "probe.cmd").write_bytes(
            f'@"{SYSTEM32}\\findstr.exe" /v /c:"vhdtool-staged 1.2-x64" "{TOOLS}\\probe.txt" > "{TOOLS}\\probe.out"\r\n'
            .encode("ascii"))
        self.wine(CMD, "/c", f"{TOOLS}\\probe.cmd", check=False)
        probed = (tools / "probe.out").read_bytes() if (tools / "probe.out").exists() else b""
        if probed == b"keep one\r\nkeep two\r\n":
            self.findstr = "Wine's findstr.exe"
        else:
            shutil.copy(exes["findstr"], self.host(f"{SYSTEM32}\\findstr.exe"))
            natives.append("findstr.exe")
            self.findstr = f"tests/stubs/findstr.c (Wine's findstr.exe printed {probed!r} for the probe)"
        for name in natives:
            self.wine(REG, "add", "HKCU\\Software\\Wine\\DllOverrides", "/v", name, "/t", "REG_SZ",
                      "/d", "native", "/f")

    def close(self) -> None:
        """Stop this prefix's wineserver and with it the prefix's Wine processes."""
        subprocess.run(["wineserver", "-k"], env=self.env, capture_output=True, timeout=60)
        subprocess.run(["wineserver", "-w"], env=self.env, capture_output=True, timeout=60)

    def _running_server(self) -> int | None:
        """The pid of the wineserver serving this prefix, found by its environment, or None."""
        marker = f"WINEPREFIX={self.root}".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if (b"wineserver" in (entry / "cmdline").read_bytes().split(b"\0")[0]
                        and marker in (entry / "environ").read_bytes().split(b"\0")):
                    return int(entry.name)
            except OSError:
                continue  # gone meanwhile, or not ours to read
        return None

    def check_server(self, when: str) -> None:
        """Fail, saying why, when the session's wineserver is no longer the one serving the prefix."""
        if self.server_pid is None:
            return  # still booting: _boot records it
        running = self._running_server()
        if running != self.server_pid:
            now = f"wineserver {running} runs instead" if running else "no wineserver runs for it"
            raise AssertionError(f"{when}: the prefix's persistent wineserver (pid {self.server_pid}) is gone and {now}; "
                                 "something outside this test killed it. Wine starts a new server that reloads the "
                                 "registry as last saved, so what the boots wrote since is lost: the results would "
                                 "be meaningless.")

    def wine(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        """`wine ARGS...`. Wine joins the arguments into one command line, quoting those with spaces
        and escaping their quotes with backslashes, as the C runtime expects: right for reg.exe and
        the stubs, not for cmd.exe, which is why every batch line goes in a file first."""
        self.check_server(f"before wine {' '.join(args)}")
        proc = subprocess.run([*NO_ASLR, "wine", *args], env=self.env, capture_output=True, text=True, errors="replace",
                              timeout=timeout, cwd=self.root)
        self.check_server(f"wine {' '.join(args)} exited {proc.returncode} ({proc.stdout!r}, {proc.stderr!r})")
        if check and proc.returncode:
            raise AssertionError(f"wine {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def host(self, win_path: str) -> Path:
        """The Linux path of a C:\\ path in the prefix, found as Windows finds it (any letter case)."""
        parts = PureWindowsPath(win_path).parts
        assert parts and parts[0].upper() == "C:\\", win_path
        path = self.root / "drive_c"
        for part in parts[1:]:
            if path.is_dir():
                match = next((p for p in path.iterdir() if p.name.lower() == part.lower()), None)
                path = match if match is not None else path / part
            else:
                path = path / part
        return path

    def reg_values(self, key: str = SETUP_KEY) -> dict[str, int | str]:
        """The values of a key by `reg query` (REG_DWORD as int, strings as str); {} if it is absent."""
        proc = self.wine(REG, "query", key, check=False)
        values: dict[str, int | str] = {}
        if proc.returncode:
            if proc.returncode == 1 and "unable to find" in (proc.stdout + proc.stderr).lower():
                return values
            raise AssertionError(f"wine reg query {key} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        for line in proc.stdout.splitlines():
            m = re.match(r"^ {4}(.+?) {4}(REG_[A-Z_]+)(?: {4}(.*))?$", line.rstrip("\r"))
            if m:
                name, kind, data = m.group(1), m.group(2), m.group(3) or ""
                values[name] = int(data, 16) if kind == "REG_DWORD" else data
        return values

    def reg_delete_key(self, key: str) -> None:
        proc = self.wine(REG, "delete", key, "/f", check=False)
        if proc.returncode and not (proc.returncode == 1 and "unable to find" in (proc.stdout + proc.stderr).lower()):
            raise AssertionError(f"wine reg delete {key} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")

    def reg_add(self, name: str, kind: str, data: str | int, key: str = SETUP_KEY) -> None:
        self.wine(REG, "add", key, "/v", name, "/t", kind, "/d", str(data), "/f")


@dataclass
class Boot:
    ran: bool  # whether this boot started a hook at all
    before: dict  # the Setup values at boot start
    output: str = ""  # what run_setup.exe and the script printed


class Guest:
    """One staged install.cmd in the prefix, as `vhdtool stage` leaves it in an image.

    Creating it clears what an earlier test left in the prefix: the vhdtool folder, the Setup
    key, SetupComplete.cmd and the stubs' records."""

    def __init__(self, prefix: WinePrefix, script: StagedScript, setupcomplete_before: bytes = b""):
        self.prefix = prefix
        self.script = script
        self.setupcomplete_before = setupcomplete_before
        self.folder = prefix.host(script.folder)
        for path in (prefix.host("C:\\Windows\\vhdtool"), prefix.host("C:\\Windows\\Setup\\Scripts")):
            shutil.rmtree(path, ignore_errors=True)
        for path in (prefix.host(STUB_CALLS), prefix.host(STUB_EXIT), prefix.host(TOOLS + "\\SetupComplete.cmd")):
            path.unlink(missing_ok=True)
        prefix.reg_delete_key(SETUP_KEY)
        assert prefix.reg_values(SETUP_KEY) == {}

    # -- staging, as vhdtool stage writes it into the image --------------------------------------

    def stage(self) -> None:
        s = self.script
        self.folder.mkdir(parents=True)
        (self.folder / "install.cmd").write_bytes(render(s))
        (self.folder / s.cab_name).write_bytes(CAB_BYTES)
        if s.hook == "setup-cmdline":
            self.prefix.reg_add("SetupType", "REG_DWORD", 2)
            self.prefix.reg_add("CmdLine", "REG_SZ", s.cmdline)
        else:
            # A generalized image: nothing pending in the Setup key (staging does not touch it);
            # the call goes at the end of SetupComplete.cmd, after what was there.
            self.prefix.reg_add("SetupType", "REG_DWORD", 0)
            self.prefix.reg_add("CmdLine", "REG_SZ", "")
            scripts = self.prefix.host(SETUP_COMPLETE).parent
            scripts.mkdir(parents=True, exist_ok=True)
            self.setupcomplete_path.write_bytes(self.setupcomplete_before + s.setupcomplete_line.encode("ascii")
                                                + b"\r\n")

    def set_installer_exit(self, code: int | str) -> None:
        """What the next dism.exe or pkgmgr.exe call returns (an int, or "poweroff")."""
        self.prefix.host(STUB_EXIT).write_text(str(code))

    # -- boots ---------------------------------------------------------------------------------

    def boot(self, kb939857: bool) -> Boot:
        """One boot: Windows starts CmdLine when SetupType is 1 or 2 at boot start (1 restarts after
        it; install.cmd writes only 0 and 2) and CmdLine is not empty; with kb939857 setup sets
        SetupType to 0 before starting it."""
        before = self.prefix.reg_values()
        if before.get("SetupType") not in (1, 2) or not before.get("CmdLine"):
            return Boot(False, before)
        if kb939857:
            self.prefix.reg_add("SetupType", "REG_DWORD", 0)
        run = self.prefix.wine(f"{TOOLS}\\run_setup.exe", "cmdline", check=False)
        return Boot(True, before, run.stdout + run.stderr)

    def setupcomplete_boot(self) -> Boot:
        """The first boot of a generalized image: Windows runs SetupComplete.cmd, once.

        Windows' cmd.exe reopens a batch file for each line it reads, so install.cmd can replace
        SetupComplete.cmd (dropping its own line) while SetupComplete.cmd runs. Wine's cmd.exe
        keeps the file open, sharing it for reading only, for the whole run, and the replace fails
        there ("Access denied"). So this runs a byte-identical copy, which ends where Windows
        would end the rewritten file: our line is the last one (staging appends it), and after
        the call Windows finds the shorter file already at its end."""
        before = self.prefix.reg_values()
        running = f"{TOOLS}\\SetupComplete.cmd"
        shutil.copyfile(self.setupcomplete_path, self.prefix.host(running))
        run = self.prefix.wine(f"{TOOLS}\\run_setup.exe", "batch", running, check=False)
        return Boot(True, before, run.stdout + run.stderr)

    # -- what a test looks at ------------------------------------------------------------------

    @property
    def setupcomplete_path(self) -> Path:
        return self.prefix.host(SETUP_COMPLETE)

    @property
    def cab(self) -> Path:
        return self.folder / self.script.cab_name

    def setup_values(self) -> dict[str, int | str]:
        return self.prefix.reg_values()

    def installer_calls(self) -> list[tuple[str, str]]:
        """(program path, full command line) of every dism.exe/pkgmgr.exe call so far."""
        path = self.prefix.host(STUB_CALLS)
        if not path.exists():
            return []
        lines = path.read_bytes().decode("utf-8").split("\r\n")
        assert lines[-1] == "", lines
        return [tuple(line.split("\t", 1)) for line in lines[:-1]]

    def file(self, name: str) -> Path:
        return self.folder / name

    def result(self) -> dict[str, str] | None:
        """result.txt as {key: value}, or None while there is none."""
        path = self.file("result.txt")
        if not path.exists():
            return None
        text = path.read_bytes().decode("ascii")
        assert text.endswith("\r\n") and "\n" not in text.replace("\r\n", ""), repr(text)
        return dict(line.split("=", 1) for line in text.split("\r\n")[:-1])

    def log(self) -> str:
        path = self.file("install.log")
        return path.read_bytes().decode("ascii", "replace") if path.exists() else ""
