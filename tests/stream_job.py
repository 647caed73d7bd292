"""The vhdtool command line with the streaming writers' copy piece made small, for the crash tests.

    python3 tests/stream_job.py PIECE_BYTES vhdtool-arguments...

The writers copy a local file into the image COPY_PIECE bytes at a time (16 MiB);
with small pieces a payload of a few tens of MiB makes many copy_file_range calls,
each a point where the crash tests kill the process (strace's fault injection).
It prints nothing of its own and exits with vhdtool's exit code.
"""

import sys


def main(argv: list[str]) -> int:
    from vhdtool.cli.main import main as vhdtool_main
    from vhdtool.container import source

    source.COPY_PIECE = int(argv[0])
    sys.argv = ["vhdtool", *argv[1:]]
    try:
        vhdtool_main()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
