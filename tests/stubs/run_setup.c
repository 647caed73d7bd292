/* Starts a boot hook the way Windows does, for the Wine tests of install.cmd
 * (tests/test_stage_script.py, driven by tests/wine_boot.py):
 *
 *   run_setup.exe cmdline      reads HKLM\SYSTEM\Setup CmdLine and starts it as Windows setup does:
 *                              CreateProcessW with the value verbatim (no quoting added or removed
 *                              on the way, which `wine cmd /c ...` from a Unix shell would do),
 *                              current folder System32; waits for it.
 *   run_setup.exe batch PATH   runs a batch file as Windows setup runs SetupComplete.cmd:
 *                              %SystemRoot%\System32\cmd.exe /c "PATH"; waits for it.
 *
 * Whether a boot starts CmdLine at all (SetupType at boot start) and whether setup clears SetupType
 * before starting it (KB939857) is decided on the Python side with reg.exe. Prints the command line
 * it started and its exit code; exits with that code, or 200 to 204 on errors of its own.
 */
#include <windows.h>
#include <stdio.h>
#include <string.h>
#include <wchar.h>

#define COMMAND_CHARS 8192

int wmain(int argc, wchar_t **argv)
{
    static wchar_t command[COMMAND_CHARS];
    wchar_t sysdir[MAX_PATH];
    STARTUPINFOW si;
    PROCESS_INFORMATION pi;
    DWORD code = 0;

    ZeroMemory(&si, sizeof si);
    si.cb = sizeof si;
    GetSystemDirectoryW(sysdir, MAX_PATH);
    if (argc == 2 && !wcscmp(argv[1], L"cmdline")) {
        HKEY key;
        DWORD type, size = sizeof command - sizeof(wchar_t);
        if (RegOpenKeyExW(HKEY_LOCAL_MACHINE, L"SYSTEM\\Setup", 0, KEY_QUERY_VALUE, &key))
            return 200;
        if (RegQueryValueExW(key, L"CmdLine", NULL, &type, (BYTE *)command, &size) ||
            (type != REG_SZ && type != REG_EXPAND_SZ))
            return 201;
        RegCloseKey(key);
    } else if (argc == 3 && !wcscmp(argv[1], L"batch")) {
        swprintf(command, COMMAND_CHARS, L"%ls\\cmd.exe /c \"%ls\"", sysdir, argv[2]);
    } else {
        fwprintf(stderr, L"usage: run_setup.exe cmdline | batch PATH\n");
        return 202;
    }
    if (!command[0])
        return 203;
    wprintf(L"run_setup: starting [%ls]\n", command);
    fflush(stdout);
    if (!CreateProcessW(NULL, command, NULL, NULL, FALSE, 0, NULL, sysdir, &si, &pi))
        return 204;
    WaitForSingleObject(pi.hProcess, INFINITE);
    GetExitCodeProcess(pi.hProcess, &code);
    CloseHandle(pi.hThread);
    CloseHandle(pi.hProcess);
    wprintf(L"run_setup: exit code %lu\n", (unsigned long)code);
    return (int)code;
}
