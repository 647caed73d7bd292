/* What Windows does with the boot hooks, for the Wine tests of install.cmd (tests/test_stage_script.py).
 *
 *   run_setup.exe cmdline        reads HKLM\SYSTEM\Setup CmdLine and starts it as Windows setup does:
 *                                CreateProcessW with the value verbatim (no re-quoting on the way),
 *                                current folder System32, and waits for it.
 *   run_setup.exe setupcomplete  runs %SystemRoot%\Setup\Scripts\SetupComplete.cmd the way Windows
 *                                setup does: cmd.exe /c "<path>", and waits for it.
 *
 * Whether to start CmdLine at all (SetupType 2 at boot start) and whether to clear SetupType first
 * (KB939857) is decided by the Python side (tests/wine_boot.py) with reg.exe. Prints the command line
 * it started and the exit code, and exits with that exit code (or 2000+ on its own errors).
 */
#include <windows.h>
#include <stdio.h>
#include <wchar.h>

int wmain(int argc, wchar_t **argv)
{
    wchar_t command[8192], sysdir[MAX_PATH], windir[MAX_PATH];
    STARTUPINFOW si = {sizeof si};
    PROCESS_INFORMATION pi;
    DWORD code = 0;

    GetSystemDirectoryW(sysdir, MAX_PATH);
    GetWindowsDirectoryW(windir, MAX_PATH);
    if (argc == 2 && !wcscmp(argv[1], L"cmdline")) {
        HKEY key;
        DWORD type, size = sizeof command - sizeof(wchar_t);
        if (RegOpenKeyExW(HKEY_LOCAL_MACHINE, L"SYSTEM\\Setup", 0, KEY_QUERY_VALUE, &key))
            return 2001;
        memset(command, 0, sizeof command);
        if (RegQueryValueExW(key, L"CmdLine", NULL, &type, (BYTE *)command, &size) ||
            (type != REG_SZ && type != REG_EXPAND_SZ))
            return 2002;
        RegCloseKey(key);
    } else if (argc == 2 && !wcscmp(argv[1], L"setupcomplete")) {
        swprintf(command, 8192, L"%ls\\cmd.exe /c \"%ls\\Setup\\Scripts\\SetupComplete.cmd\"", sysdir, windir);
    } else {
        fwprintf(stderr, L"usage: run_setup.exe cmdline|setupcomplete\n");
        return 2003;
    }
    if (!command[0])
        return 2004;
    wprintf(L"run_setup: starting [%ls]\n", command);
    fflush(stdout);
    if (!CreateProcessW(NULL, command, NULL, NULL, FALSE, 0, NULL, sysdir, &si, &pi))
        return 2005;
    WaitForSingleObject(pi.hProcess, INFINITE);
    GetExitCodeProcess(pi.hProcess, &code);
    CloseHandle(pi.hThread);
    CloseHandle(pi.hProcess);
    wprintf(L"run_setup: exit code %ld\n", (long)code);
    return (int)code;
}
