/* Stand-in for dism.exe and pkgmgr.exe in the Wine tests of install.cmd (tests/test_stage_script.py,
 * driven by tests/wine_boot.py, which copies it to %SystemRoot%\System32 under both names).
 *
 * Appends one line to vhdtool-stub-calls.txt beside the executable: its own full path, a tab, and
 * its command line exactly as the caller passed it (GetCommandLineW), UTF-8, CRLF. Prints one line
 * to stdout (install.cmd logs it), then exits with the code written in vhdtool-stub-exitcode.txt
 * beside it: decimal, negative or 0x hex (0x800F081F, as DISM returns); 0 when the file is absent.
 * The word "poweroff" instead of a code ends the calling cmd.exe (and so install.cmd) before the
 * installer returns, as a power loss or a hard reset during the installation would.
 */
#include <windows.h>
#include <tlhelp32.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <wchar.h>

static void beside(wchar_t *out, const wchar_t *name)
{
    DWORD n = GetModuleFileNameW(NULL, out, MAX_PATH);
    wchar_t *slash;
    out[n < MAX_PATH ? n : MAX_PATH - 1] = 0;
    slash = wcsrchr(out, L'\\');
    wcscpy(slash ? slash + 1 : out, name);
}

static void append_utf8(const wchar_t *path, const wchar_t *text)
{
    HANDLE h = CreateFileW(path, FILE_APPEND_DATA, FILE_SHARE_READ | FILE_SHARE_WRITE, NULL,
                           OPEN_ALWAYS, FILE_ATTRIBUTE_NORMAL, NULL);
    int len = WideCharToMultiByte(CP_UTF8, 0, text, -1, NULL, 0, NULL, NULL);
    char *buf = malloc(len > 0 ? len : 1);
    DWORD written;
    if (h == INVALID_HANDLE_VALUE || !buf)
        ExitProcess(1001);
    WideCharToMultiByte(CP_UTF8, 0, text, -1, buf, len, NULL, NULL);
    WriteFile(h, buf, (DWORD)strlen(buf), &written, NULL);
    CloseHandle(h);
    free(buf);
}

/* The process that started this one (the cmd.exe running install.cmd). */
static HANDLE open_parent(void)
{
    DWORD self = GetCurrentProcessId(), parent = 0;
    PROCESSENTRY32W entry;
    HANDLE snap = CreateToolhelp32Snapshot(TH32CS_SNAPPROCESS, 0);
    if (snap == INVALID_HANDLE_VALUE)
        return NULL;
    ZeroMemory(&entry, sizeof entry);
    entry.dwSize = sizeof entry;
    for (BOOL ok = Process32FirstW(snap, &entry); ok; ok = Process32NextW(snap, &entry))
        if (entry.th32ProcessID == self)
            parent = entry.th32ParentProcessID;
    CloseHandle(snap);
    return parent ? OpenProcess(PROCESS_TERMINATE, FALSE, parent) : NULL;
}

int wmain(void)
{
    wchar_t module[MAX_PATH], calls[MAX_PATH], codefile[MAX_PATH];
    const wchar_t *cmdline = GetCommandLineW();
    size_t count = wcslen(cmdline) + MAX_PATH + 8;
    wchar_t *line = malloc(count * sizeof(wchar_t));
    char text[64] = {0};
    long long code = 0;
    FILE *f;

    GetModuleFileNameW(NULL, module, MAX_PATH);
    beside(calls, L"vhdtool-stub-calls.txt");
    beside(codefile, L"vhdtool-stub-exitcode.txt");
    swprintf(line, count, L"%ls\t%ls\r\n", module, cmdline);
    append_utf8(calls, line);

    f = _wfopen(codefile, L"r");
    if (f) {
        if (!fgets(text, sizeof text, f))
            text[0] = 0;
        fclose(f);
    }
    if (!strncmp(text, "poweroff", 8)) {
        HANDLE parent = open_parent();
        printf("vhdtool stub installer: power lost\n");
        fflush(stdout);
        if (!parent || !TerminateProcess(parent, 0xDEAD))
            ExitProcess(1002);
        ExitProcess(0xDEAD);
    }
    code = strtoll(text, NULL, 0);
    printf("vhdtool stub installer: exit code %d\n", (int)(unsigned int)code);
    fflush(stdout);
    ExitProcess((UINT)code);
    return 0;
}
