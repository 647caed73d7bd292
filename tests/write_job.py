"""A writing process for the crash tests: commit deterministic random writes to IMAGE, or list them.

    python3 tests/write_job.py IMAGE SEED      commit the writes of SEED to IMAGE
    python3 tests/write_job.py --list SEED     print them as JSON [[offset, hex], ...]

The test kills this process (SIGKILL, injected by strace at a chosen write or
flush system call) and judges what is left of the image.
"""

import json
import random
import sys

MiB = 1024 * 1024
SIZE = 40 * MiB


def writes(seed: int) -> list[tuple[int, bytes]]:
    rnd = random.Random(seed)
    out = []
    for _ in range(12):
        n = rnd.choice([1, 8, 64, 2048, 4096])
        out.append((rnd.randrange(0, SIZE // 512 - n) * 512, rnd.randbytes(n * 512)))
    return out


def main(argv: list[str]) -> int:
    if argv[0] == "--list":
        print(json.dumps([[o, d.hex()] for o, d in writes(int(argv[1]))]))
        return 0
    from vhdtool import open_disk
    from vhdtool.container.overlay import Overlay
    from vhdtool.container.vhdx.writer import commit
    from vhdtool.errors import VhdtoolError

    try:
        with open_disk(argv[0]) as disk:
            overlay = Overlay(disk)
            for offset, data in writes(int(argv[1])):
                overlay.write_at(offset, data)
            changes = overlay.changes()
            # The test's random-time kills aim at the commit, not at start-up.
            print("committing", flush=True)
            commit(disk, changes)
    except VhdtoolError as e:
        print(f"vhdtool: {e.message}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
