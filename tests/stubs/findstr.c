/* Stand-in for Windows' findstr.exe, for the Wine tests of install.cmd (tests/test_stage_script.py),
 * used only where Wine's own findstr does not filter (Wine 8.0's is a stub that prints nothing).
 *
 * Does what install.cmd asks of it and nothing else: `findstr /v /c:"TEXT" FILE` writes to stdout
 * every line of FILE that does not contain TEXT (case-sensitive literal, as /c: without /i),
 * byte for byte with its own line ending; exit code 0 when it printed a line, 1 when none, 2 on
 * an error (as findstr.exe). Lines end at LF; a CR before it belongs to the line ending.
 */
#include <windows.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <wchar.h>

static int contains(const char *line, size_t len, const char *text, size_t tlen)
{
    if (tlen == 0)
        return 1;
    for (size_t i = 0; i + tlen <= len; i++)
        if (!memcmp(line + i, text, tlen))
            return 1;
    return 0;
}

int wmain(int argc, wchar_t **argv)
{
    HANDLE out = GetStdHandle(STD_OUTPUT_HANDLE), in;
    char text[4096], *data;
    size_t tlen;
    DWORD size, got, written;
    int printed = 0;

    if (argc != 4 || _wcsicmp(argv[1], L"/v") || _wcsnicmp(argv[2], L"/c:", 3)) {
        fwprintf(stderr, L"findstr stand-in: only /v /c:TEXT FILE\n");
        return 2;
    }
    if (!WideCharToMultiByte(CP_ACP, 0, argv[2] + 3, -1, text, sizeof text, NULL, NULL))
        return 2;
    tlen = strlen(text);
    in = CreateFileW(argv[3], GENERIC_READ, FILE_SHARE_READ | FILE_SHARE_WRITE | FILE_SHARE_DELETE,
                     NULL, OPEN_EXISTING, FILE_ATTRIBUTE_NORMAL, NULL);
    if (in == INVALID_HANDLE_VALUE)
        return 2;
    size = GetFileSize(in, NULL);
    data = malloc(size + 1);
    if (!data || !ReadFile(in, data, size, &got, NULL) || got != size)
        return 2;
    CloseHandle(in);
    for (size_t start = 0; start < size;) {
        size_t end = start, content;
        while (end < size && data[end] != '\n')
            end++;
        if (end < size)
            end++; /* the LF */
        content = end - start;
        while (content && (data[start + content - 1] == '\n' || data[start + content - 1] == '\r'))
            content--;
        if (!contains(data + start, content, text, tlen)) {
            WriteFile(out, data + start, (DWORD)(end - start), &written, NULL);
            printed = 1;
        }
        start = end;
    }
    return printed ? 0 : 1;
}
