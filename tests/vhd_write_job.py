"""A writing process for the VHD crash tests: commit deterministic random writes to IMAGE, or list them.

    python3 tests/vhd_write_job.py IMAGE SEED [--no-reflink]   commit the writes of SEED to IMAGE
    python3 tests/vhd_write_job.py --list SEED SIZE            print them as JSON [[offset, hex], ...]

The test kills this process (SIGKILL, injected by strace at a chosen system call
of the commit, or at a random time after it prints "committing"; it prints
"committed" when done) and judges what is left of the image and its folder.
"""

import json
import random
import sys


def writes(seed: int, size: int) -> list[tuple[int, bytes]]:
    """Sector-aligned writes into holes, into allocated blocks and across block edges (2 MiB blocks)."""
    rnd = random.Random(seed)
    block = 2 * 1024 * 1024
    out = []
    for _ in range(6):
        n = rnd.choice([1, 3, 8, 64, 700])
        out.append((rnd.randrange(0, size // 512 - n) * 512, rnd.randbytes(n * 512)))
    # One write that straddles a block edge, wherever the random ones fell.
    edge = rnd.randrange(1, size // block) * block
    out.append((edge - 3 * 512, rnd.randbytes(9 * 512)))
    return out


def main(argv: list[str]) -> int:
    if argv[0] == "--list":
        print(json.dumps([[o, d.hex()] for o, d in writes(int(argv[1]), int(argv[2]))]))
        return 0
    from vhdtool import open_disk
    from vhdtool.container.overlay import Overlay
    from vhdtool.container.vhd.writer import commit
    from vhdtool.errors import VhdtoolError

    try:
        with open_disk(argv[0]) as disk:
            overlay = Overlay(disk)
            for offset, data in writes(int(argv[1]), disk.size):
                overlay.write_at(offset, data)
            changes = overlay.changes()
            # The test's kills aim at the commit, not at start-up: it counts system calls from here.
            print("committing", flush=True)
            commit(disk, changes, reflink="--no-reflink" not in argv)
            print("committed", flush=True)
    except VhdtoolError as e:
        print(f"vhdtool: {e.message}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
