/* Stand-in for dism.exe and pkgmgr.exe in the Wine tests of install.cmd (tests/test_stage_script.py).
 *
 * Appends one line to vhdtool-stub-calls.txt beside the executable: its own full path, a tab,
 * and its full command line exactly as the caller passed it (GetCommandLineW), in UTF-8, CRLF.
 * Prints one line to stdout (install.cmd logs it), then exits with the code written in
 * vhdtool-stub-exitcode.txt beside it (decimal, negative or 0x hex; 0 when the file is absent),
 * so a test can make any attempt return 0, 3010 or a failure.
 */
#include <windows.h>
#include <stdio.h>
#include <stdlib.h>
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

int main(void)
{
    wchar_t module[MAX_PATH], calls[MAX_PATH], codefile[MAX_PATH];
    const wchar_t *cmdline = GetCommandLineW();
    size_t size = (wcslen(cmdline) + MAX_PATH + 8) * sizeof(wchar_t);
    wchar_t *line = malloc(size);
    long long code = 0;
    FILE *f;

    GetModuleFileNameW(NULL, module, MAX_PATH);
    beside(calls, L"vhdtool-stub-calls.txt");
    beside(codefile, L"vhdtool-stub-exitcode.txt");
    swprintf(line, size / sizeof(wchar_t), L"%ls\t%ls\r\n", module, cmdline);
    append_utf8(calls, line);

    f = _wfopen(codefile, L"r");
    if (f) {
        char text[64] = {0};
        if (fgets(text, sizeof text, f))
            code = strtoll(text, NULL, 0);
        fclose(f);
    }
    printf("vhdtool stub installer: exit code %ld\r\n", (long)(int)(unsigned int)code);
    fflush(stdout);
    ExitProcess((UINT)code);
    return 0;
}
