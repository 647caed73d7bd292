"""A writing process for the Linux services crash test: ``services IMAGE --disable kvp --disable vss``.

    python3 tests/linux_services_job.py IMAGE

The test kills this process (SIGKILL, injected by strace at a chosen write or flush system call),
judges what is left of the image, then runs it again to completion.
"""

import sys


def main(argv: list[str]) -> int:
    from vhdtool.editor.services import set_services, wanted_starts
    from vhdtool.errors import VhdtoolError

    try:
        set_services(argv[0], wanted_starts([], ["kvp", "vss"]))
    except VhdtoolError as e:
        print(f"vhdtool: {e.message}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
