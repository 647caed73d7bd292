"""What a boot of a staged Windows guest leaves, written into a VHDX image by tools other than vhdtool.

Files (result.txt, attempts.txt, install.log) go in with ntfs-3g's ntfscp; registry keys and values
(the cleared Setup hook, Component Based Servicing's package keys, the KVP IC version) with
hivexsh, on the hive copied out with ntfscat and copied back with ntfscp. A hive marked dirty gets
its changes only in a new-format .LOG1, the primary left as it was with its sequence numbers apart
(fixtures/build/hives.py ``make_dirty_hive``: Windows stopped mid-flush). The image goes through
qemu-img: converted to raw, the partition changed, converted back to a dynamic VHDX.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from fixtures.build.hives import HiveEdit, make_dirty_hive
from judges.tools import sh
from judges.volumes import extract_partition, ntfscat, partition_table, raw_image

CONFIG = "/Windows/System32/config"
CBS = "Microsoft\\Windows\\CurrentVersion\\Component Based Servicing"
KVP_AUTO = "Microsoft\\Virtual Machine\\Auto"


@dataclass
class BootEffects:
    files: dict[str, bytes] = field(default_factory=dict)  # guest path -> content
    hives: dict[str, HiveEdit] = field(default_factory=dict)  # "SYSTEM", "SOFTWARE" -> keys and values
    dirty: set[str] = field(default_factory=set)  # hives whose changes stay in their .LOG1

    def hive(self, name: str) -> HiveEdit:
        return self.hives.setdefault(name, HiveEdit())


def install_cmd_finished(folder: str, exit_code: int, attempts: int = 1) -> BootEffects:
    """What install.cmd leaves when it finishes: result.txt, attempts.txt, install.log and the Setup hook cleared."""
    effects = BootEffects()
    effects.files[f"{folder}/result.txt"] = (f"exit_code={exit_code}\r\nattempts={attempts}\r\n"
                                             "finished=Mon 12/07/2026  6:01:02.03\r\n").encode()
    effects.files[f"{folder}/attempts.txt"] = f"{attempts}\r\n".encode()
    effects.files[f"{folder}/install.log"] = (f"[Mon 12/07/2026  6:00:00.00] attempt {attempts}\r\n"
                                              f"[Mon 12/07/2026  6:01:02.03] exit code {exit_code}\r\n").encode()
    effects.hive("SYSTEM").set("Setup", {"SetupType": 0, "CmdLine": ""})
    return effects


def _existing(hive: Path, edit: HiveEdit) -> tuple[str, ...]:
    """The keys (and their parents) of ``edit`` that the hive already has, as hivexget finds them."""
    found = []
    for path in edit.keys:
        parts = path.split("\\")
        for i in range(1, len(parts) + 1):
            key = "\\".join(parts[:i])
            if sh("hivexget", hive, key, check=False).returncode == 0:
                found.append(key)
    return tuple(found)


def write_boot(image: Path, partition: int, effects: BootEffects, work: Path) -> None:
    """``effects`` written into partition ``partition`` of ``image`` (a VHDX), replacing the image file."""
    work.mkdir(parents=True, exist_ok=True)
    raw = raw_image(image, work / "disk.raw")
    part = extract_partition(raw, partition, work / "part.img")
    for n, (path, data) in enumerate(effects.files.items()):
        src = work / f"file{n}"
        src.write_bytes(data)
        sh("ntfscp", "-f", part, src, path)
        assert ntfscat(part, path) == data
    for name, edit in effects.hives.items():
        before = work / f"{name}.before"
        before.write_bytes(ntfscat(part, f"{CONFIG}/{name}"))
        after = work / name
        after.write_bytes(before.read_bytes())
        edit.apply(after, _existing(after, edit))
        if name in effects.dirty:
            primary, log1 = work / f"{name}.primary", work / f"{name}.LOG1"
            make_dirty_hive(before, after, primary, log1)
            writes = {name: primary, f"{name}.LOG1": log1}
        else:
            writes = {name: after}
        for guest_name, host in writes.items():
            sh("ntfscp", "-f", part, host, f"{CONFIG}/{guest_name}")
            assert ntfscat(part, f"{CONFIG}/{guest_name}") == host.read_bytes()
    table = partition_table(raw)
    start = table["partitions"][partition - 1]["start"] * table.get("sectorsize", 512)
    with open(raw, "r+b") as disk:
        disk.seek(start)
        disk.write(part.read_bytes())
    out = work / "booted.vhdx"
    sh("qemu-img", "convert", "-f", "raw", "-O", "vhdx", "-o", "subformat=dynamic", raw, out)
    os.replace(out, image)
    raw.unlink()
    part.unlink()
