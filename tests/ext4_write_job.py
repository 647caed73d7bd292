"""A writing process for the ext4 crash test: one edit of a Linux guest (links made and removed, a file written).

    python3 tests/ext4_write_job.py IMAGE

The test kills this process (SIGKILL, injected by strace at a chosen write or flush system call)
and judges what is left of the image.
"""

import sys

WANTS = "/etc/systemd/system/multi-user.target.wants"


def main(argv: list[str]) -> int:
    import vhdtool
    from vhdtool.errors import VhdtoolError

    try:
        with vhdtool.edit(argv[0]) as ed:
            ed.symlink(f"{WANTS}/hv-kvp-daemon.service", "/lib/systemd/system/hv-kvp-daemon.service")
            ed.unlink(f"{WANTS}/ssh.service")
            ed.write_file("/var/lib/vhdtool/job/install.sh", b"#!/bin/sh\nexit 0\n" * 300, mode=0o755)
    except VhdtoolError as e:
        print(f"vhdtool: {e.message}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
