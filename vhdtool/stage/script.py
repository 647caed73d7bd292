"""The boot-time installer: install.cmd, the Setup CmdLine that runs it, and the SetupComplete.cmd line.

Pure text: what is written into the guest, nothing read from it. Every value that
reaches the script (the id, the cab's file name, the system root) must match a
strict pattern first, so nothing from an image or a command line can become
cmd.exe syntax. Lines end in CRLF; every path is quoted.

At boot, as SYSTEM, install.cmd:
 - counts its attempts in attempts.txt and gives up after MAX_ATTEMPTS;
 - runs dism.exe /online /add-package (NT 6.1 and later) or pkgmgr.exe /ip (NT 6.0),
   by full path under System32, logging to install.log beside itself;
 - treats 0 and 3010 as success: writes result.txt (exit_code, attempts, finished),
   removes the cab, clears the boot hook, and asks for a restart only on 3010;
 - arms the Setup CmdLine hook itself before each attempt, because Windows may clear
   SetupType before it starts CmdLine (KB939857): a failed attempt, or one cut short by
   a power loss, runs again at the next boot either way;
 - does nothing but clear the hook once result.txt exists (a run after a finished one);
 - after the last failed attempt writes result.txt and clears the hook, so the guest
   never loops at boot.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vhdtool.cabinet.format import CBS_IDENTITY

MAX_ATTEMPTS = 3
SUCCESS_CODES = (0, 3010)
ID_PATTERN = re.compile(r"^[0-9]{1,5}(\.[0-9]{1,5}){1,3}-(x86|x64|arm64)$")
CAB_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,120}\.cab$", re.IGNORECASE)
SYSTEM_ROOT_PATTERN = re.compile(r"^[A-Z]:\\[A-Za-z0-9_]{1,32}$")
MARKER = "rem vhdtool-staged"
# Beside install.cmd: the package's CBS identity (``identity=name~token~arch~language~version``), which
# `status` looks up in the guest's Component Based Servicing record; install.cmd never touches it, so it
# outlives the cab (deleted on success).
PACKAGE_FILE = "package.txt"


class UnsafeScriptValue(ValueError):
    """A value that would reach the script does not match its pattern."""


@dataclass(frozen=True)
class StagedScript:
    id: str  # "6.2.9200.16384-x64"
    cab_name: str  # "Windows6.1-HyperVIntegrationServices-x64.cab"
    installer: str  # "dism" | "pkgmgr"
    system_root: str  # "C:\\Windows"
    hook: str  # "setup-cmdline" | "setupcomplete"

    def __post_init__(self) -> None:
        for value, pattern, what in ((self.id, ID_PATTERN, "id"), (self.cab_name, CAB_PATTERN, "cab name"),
                                     (self.system_root, SYSTEM_ROOT_PATTERN, "system root")):
            if not pattern.fullmatch(value):  # fullmatch: "$" alone would let a trailing newline through
                raise UnsafeScriptValue(f"{what} {value!r} does not match {pattern.pattern}")
        if self.installer not in ("dism", "pkgmgr") or self.hook not in ("setup-cmdline", "setupcomplete"):
            raise UnsafeScriptValue("unknown installer or hook")

    @property
    def folder(self) -> str:
        return f"{self.system_root}\\vhdtool\\{self.id}"

    @property
    def guest_folder(self) -> str:
        """The folder as a path on the system volume: /Windows/vhdtool/<id>."""
        return "/" + self.system_root[3:] + f"/vhdtool/{self.id}"

    @property
    def cmdline(self) -> str:
        """The SYSTEM\\Setup CmdLine value that runs the script."""
        return f'cmd.exe /c "{self.folder}\\install.cmd"'

    @property
    def setupcomplete_line(self) -> str:
        """The line appended to SetupComplete.cmd (its marker lets the script remove it again)."""
        return f'call "{self.folder}\\install.cmd" & {MARKER} {self.id}'


# Exactly what ``StagedScript.cmdline`` writes, and nothing more: a CmdLine that only resembles it (another
# tool's folder named vhdtool, or ours with a second command after it) is someone else's and must not be replaced.
CMDLINE_ID = re.compile(r'cmd\.exe /c "[A-Z]:\\[A-Za-z0-9_]{1,32}\\vhdtool\\([^\\"]+)\\install\.cmd"')


def is_ours(cmdline) -> bool:
    """Whether a SYSTEM\\Setup CmdLine is one vhdtool wrote (``StagedScript.cmdline``)."""
    return cmdline_id(cmdline) is not None


def cmdline_id(cmdline) -> str | None:
    """The staging id that a CmdLine written by ``StagedScript.cmdline`` runs, if it is one (None for any
    other value, of any registry type)."""
    m = CMDLINE_ID.fullmatch(cmdline) if isinstance(cmdline, str) else None
    return m.group(1) if m and ID_PATTERN.fullmatch(m.group(1)) else None


def install_id(version: str, arch: str) -> str:
    value = f"{version}-{arch}"
    if not ID_PATTERN.fullmatch(value):
        raise UnsafeScriptValue(f"id {value!r} does not match {ID_PATTERN.pattern}")
    return value


def installer_for(nt_version: str) -> str:
    """dism.exe from NT 6.1 (Windows 7, Server 2008 R2) on; pkgmgr.exe on NT 6.0 (Vista, Server 2008)."""
    major, minor = (int(x) for x in nt_version.split(".")[:2])
    return "pkgmgr" if (major, minor) < (6, 1) else "dism"


def render_package(identity: str) -> bytes:
    """package.txt: one ``identity=`` line, CRLF."""
    if not CBS_IDENTITY.fullmatch(identity):
        raise UnsafeScriptValue(f"package identity {identity!r} does not match {CBS_IDENTITY.pattern}")
    return f"identity={identity}\r\n".encode("ascii")


def render(s: StagedScript) -> bytes:
    """install.cmd, CRLF line endings."""
    here = s.folder
    cab = f"{here}\\{s.cab_name}"
    system32 = f"{s.system_root}\\System32"
    if s.installer == "dism":
        install = f'"{system32}\\dism.exe" /online /add-package /packagepath:"{cab}" /quiet /norestart'
    else:
        install = f'"{system32}\\pkgmgr.exe" /ip /m:"{cab}" /quiet /norestart'
    reg = f'"{system32}\\reg.exe"'
    setup_key = '"HKLM\\SYSTEM\\Setup"'
    cmdline = s.cmdline.replace('"', '\\"')
    lines = [
        "@echo off",
        f"rem vhdtool: installs {s.cab_name} once, at boot, as SYSTEM. Generated; do not edit.",
        "setlocal EnableExtensions",
        f'set "HERE={here}"',
        'set "LOG=%HERE%\\install.log"',
        'set "RESULT=%HERE%\\result.txt"',
        'set "COUNT=%HERE%\\attempts.txt"',
        "rem A result means an earlier run finished: only the hook is left to clear (power lost before it was).",
        'if exist "%RESULT%" goto clear',
        "set ATTEMPTS=0",
        'if exist "%COUNT%" set /p ATTEMPTS=<"%COUNT%"',
        "set /a ATTEMPTS=ATTEMPTS+1",
        '> "%COUNT%" echo %ATTEMPTS%',
        f"if %ATTEMPTS% GTR {MAX_ATTEMPTS} goto giveup",
        "rem Armed for the next boot before the attempt, whether or not Windows cleared SetupType",
        "rem already (KB939857): a power loss during the installer is retried too.",
        f"{reg} add {setup_key} /v CmdLine /t REG_SZ /d \"{cmdline}\" /f >nul",
        f"{reg} add {setup_key} /v SetupType /t REG_DWORD /d 2 /f >nul",
        'echo [%DATE% %TIME%] attempt %ATTEMPTS% >> "%LOG%"',
        f'{install} >> "%LOG%" 2>&1',
        "set RC=%ERRORLEVEL%",
        'echo [%DATE% %TIME%] exit code %RC% >> "%LOG%"',
        'if "%RC%"=="0" goto success',
        'if "%RC%"=="3010" goto success',
        f"if %ATTEMPTS% GEQ {MAX_ATTEMPTS} goto finished",
        "rem Failed: the hook armed above runs the script again at the next boot.",
        "goto end",
        ":giveup",
        f"set /a ATTEMPTS={MAX_ATTEMPTS}",
        "set RC=-1",
        'if exist "%RESULT%" goto clear',
        "goto finished",
        ":success",
        'del /f /q "%HERE%\\' + s.cab_name + '" >nul 2>&1',
        ":finished",
        '> "%RESULT%" echo exit_code=%RC%',
        '>> "%RESULT%" echo attempts=%ATTEMPTS%',
        '>> "%RESULT%" echo finished=%DATE% %TIME%',
        ":clear",
        f"{reg} add {setup_key} /v SetupType /t REG_DWORD /d 0 /f >nul",
        f"{reg} add {setup_key} /v CmdLine /t REG_SZ /d \"\" /f >nul",
    ]
    if s.hook == "setupcomplete":
        complete = f"{s.system_root}\\Setup\\Scripts\\SetupComplete.cmd"
        lines += [
            f'if exist "{complete}" (',
            f'  "{system32}\\findstr.exe" /v /c:"{MARKER} {s.id}" "{complete}" > "%HERE%\\SetupComplete.new"',
            f'  move /y "%HERE%\\SetupComplete.new" "{complete}" >nul',
            ")",
        ]
    lines += [
        'if "%RC%"=="3010" ' + f"{reg} add {setup_key} /v SetupShutdownRequired /t REG_DWORD /d 1 /f >nul",
        ":end",
        "endlocal",
        "exit /b 0",
    ]
    return ("\r\n".join(lines) + "\r\n").encode("ascii")
