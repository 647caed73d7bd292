#!/usr/bin/env python3
"""The least a dissect user would write to learn a Windows guest's product name, build and architecture.

A yardstick for ``bench/inspect_time.py``: dissect.hypervisor opens the VHDX,
dissect.volume the partition table, dissect.ntfs the first partition,
dissect.regf the SOFTWARE and SYSTEM hives. No checks, no other facts. Prints
the three facts and the bytes it read from the image file.

    python3 bench/three_facts.py IMAGE.vhdx
"""

import sys

from dissect.hypervisor.disk.vhdx import VHDX
from dissect.ntfs import NTFS
from dissect.regf import RegistryHive
from dissect.volume.disk import Disk


class Counting:
    def __init__(self, f):
        self.f, self.n = f, 0

    def read(self, n=-1):
        b = self.f.read(n)
        self.n += len(b)
        return b

    def seek(self, *a):
        return self.f.seek(*a)

    def tell(self):
        return self.f.tell()


def main(path: str) -> None:
    fh = Counting(open(path, "rb"))
    disk = VHDX(fh)
    part = Disk(disk).partitions[0]
    fs = NTFS(part.open())
    software = RegistryHive(fs.mft.get("Windows/System32/config/SOFTWARE").open())
    cv = software.open("Microsoft\\Windows NT\\CurrentVersion")
    system = RegistryHive(fs.mft.get("Windows/System32/config/SYSTEM").open())
    cs = system.open("Select").value("Current").value
    env = system.open(f"ControlSet{cs:03d}\\Control\\Session Manager\\Environment")
    arch = env.value("PROCESSOR_ARCHITECTURE").value
    print(cv.value("ProductName").value, cv.value("CurrentBuildNumber").value, arch, fh.n)


if __name__ == "__main__":
    main(sys.argv[1])
