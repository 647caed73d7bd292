"""Linux volumes read without mounting: ext4 with debugfs, XFS with xfs_db, LVM with its tools read-only."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from .disks import copy_range
from .tools import sh


class Ext4Volume:
    """An ext4 image read with debugfs. Paths are taken as they are: no symlink in them
    is followed by the test's own resolve() (debugfs stat does not follow the last one)."""

    def __init__(self, image: Path):
        self.image = image

    def _debugfs(self, request: str) -> bytes:
        return sh("debugfs", "-R", request, self.image).stdout

    def kind(self, path: str) -> str | None:
        m = re.search(r"Type: (\w+)", self._debugfs(f"stat {path}").decode())
        return m.group(1) if m else None

    def names(self, path: str) -> list[str]:
        out = self._debugfs(f"ls -p {path}").decode()
        return [n for n in (line.split("/")[5] for line in out.splitlines() if line.count("/") >= 6)
                if n not in (".", "..")]

    def read(self, path: str) -> bytes:
        return self._debugfs(f"cat {path}")

    def readlink(self, path: str) -> str:
        m = re.search(r'Fast link dest: "(.*)"', self._debugfs(f"stat {path}").decode())
        assert m, f"{path} is not a fast symlink"
        return m.group(1)


XFS_MODES = {0o040000: "directory", 0o100000: "regular", 0o120000: "symlink"}


class XfsVolume:
    """An XFS image read with xfs_db -r: directory listings (ls), inode modes, symlink
    targets (u3.symlink) and file extents (bmap), whose blocks are then read from the image."""

    def __init__(self, image: Path):
        self.image = image
        sb = dict(re.findall(r"^(\w+) = (\d+)$", self._db("sb 0", "print blocksize agblocks"), re.M))
        self.blocksize, self.agblocks = int(sb["blocksize"]), int(sb["agblocks"])

    def _db(self, *commands: str, check: bool = True) -> str:
        args = [a for c in commands for a in ("-c", c)]
        return sh("xfs_db", "-r", *args, self.image, check=check).stdout.decode()

    def _inode(self, path: str, *fields: str) -> dict[str, str] | None:
        out = self._db(f"path {path}", f"print {' '.join(fields)}", check=False)
        values = dict(re.findall(r"^([\w.]+) = (.*)$", out, re.M))
        return values or None

    def kind(self, path: str) -> str | None:
        inode = self._inode(path, "core.mode")
        return None if inode is None else XFS_MODES.get(int(inode["core.mode"], 8) & 0o170000, "other")

    def names(self, path: str) -> list[str]:
        out = self._db(f"ls {path}")
        entries = [line.split() for line in out.splitlines()[1:]]
        assert all(e[-1] == "(good)" for e in entries), out
        return [e[5] for e in entries if e[5] not in (".", "..")]

    def read(self, path: str) -> bytes:
        inode = self._inode(path, "core.size", "core.format")
        assert inode and inode["core.format"] == "2 (extents)", inode
        size = int(inode["core.size"])
        data = bytearray(-(-size // self.blocksize) * self.blocksize)
        with open(self.image, "rb") as f:
            for m in re.finditer(r"data offset (\d+) startblock \d+ \((\d+)/(\d+)\) count (\d+) flag (\d)",
                                 self._db(f"path {path}", "bmap")):
                offset, ag, agbno, count, unwritten = map(int, m.groups())
                if unwritten:
                    continue
                f.seek((ag * self.agblocks + agbno) * self.blocksize)
                chunk = f.read(count * self.blocksize)
                data[offset * self.blocksize:offset * self.blocksize + len(chunk)] = chunk
        return bytes(data[:size])

    def readlink(self, path: str) -> str:
        inode = self._inode(path, "core.format", "u3.symlink")
        assert inode and inode["core.format"] == "1 (local)", inode
        return inode["u3.symlink"][1:-1]


def resolve(volume, path: str) -> str | None:
    """`path` with every symlink in it (the last one too) resolved inside the volume."""
    parts, done, hops = [p for p in path.split("/") if p], [], 0
    while parts:
        name = parts.pop(0)
        if name == ".":
            continue
        if name == "..":
            done = done[:-1]
            continue
        here = "/" + "/".join(done + [name])
        kind = volume.kind(here)
        if kind is None:
            return None
        if kind == "symlink":
            hops += 1
            assert hops <= 40, f"symlink loop at {path}"
            target = volume.readlink(here)
            if target.startswith("/"):
                done = []
            parts = [p for p in target.split("/") if p] + parts
            continue
        done.append(name)
    return "/" + "/".join(done)


@contextlib.contextmanager
def lvm_readonly(image: Path, work: Path):
    """Yields (device, report), report(command, *args) -> rows: pvs/vgs/lvs --readonly on `image`, attached to
    a read-only loop device, with an lvm.conf that sees that device only."""
    dev = sh("losetup", "--find", "--show", "--read-only", image).stdout.decode().strip()
    try:
        system = work / "lvm-system"
        (system / "lock").mkdir(parents=True, exist_ok=True)
        accept = f'[ "a|^{dev}$|", "r|.*|" ]'
        (system / "lvm.conf").write_text(
            f"devices {{ filter = {accept} global_filter = {accept} use_devicesfile = 0 hints = \"none\" "
            f"obtain_device_list_from_udev = 0 }}\n"
            f"global {{ locking_dir = \"{system / 'lock'}\" use_lvmpolld = 0 notify_dbus = 0 }}\n"
            "activation { udev_sync = 0 udev_rules = 0 monitoring = 0 }\nbackup { backup = 0 archive = 0 }\n")
        env = {**os.environ, "LVM_SYSTEM_DIR": str(system), "LVM_SUPPRESS_FD_WARNINGS": "1"}

        def report(command: str, *args: str) -> list[dict[str, str]]:
            proc = subprocess.run(["lvm", command, "--readonly", "--devices", dev, "--reportformat", "json",
                                   "--units", "b", "--nosuffix", *args],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, check=False)
            assert proc.returncode == 0, proc.stderr.decode()
            doc = json.loads(proc.stdout)
            return [row for r in doc["report"] for rows in r.values() for row in rows]

        yield dev, report
    finally:
        sh("losetup", "--detach", dev)


def logical_volumes(pv_image: Path, work: Path) -> tuple[int, dict[str, tuple[int, Path]]]:
    """The size of the PV in `pv_image` and {vg/lv: (offset in the PV, extracted image)} of its
    logical volumes, as pvs/vgs/lvs report them; each LV must be one segment."""
    with lvm_readonly(pv_image, work) as (dev, report):
        (pv,) = report("pvs", "-o", "pv_name,pe_start,vg_name,pv_size")
        (vg,) = report("vgs", "-o", "vg_name,vg_extent_size")
        segments = report("lvs", "--segments", "-o", "lv_name,vg_name,seg_pe_ranges,lv_size")
    volumes: dict[str, tuple[int, Path]] = {}
    for seg in segments:  # one segment each (in the order lvs lists them)
        m = re.fullmatch(re.escape(dev) + r":(\d+)-(\d+)", seg["seg_pe_ranges"])
        assert m, seg
        first, last = int(m.group(1)), int(m.group(2))
        offset = int(pv["pe_start"]) + first * int(vg["vg_extent_size"])
        size = (last - first + 1) * int(vg["vg_extent_size"])
        assert size == int(seg["lv_size"])
        key = f"{seg['vg_name']}/{seg['lv_name']}"
        assert key not in volumes, f"{key} has more than one segment"
        volumes[key] = (offset, copy_range(pv_image, work / f"{seg['lv_name']}.img", offset, size))
    return int(pv["pv_size"]), volumes


VOLUME_READERS = {"ext4": Ext4Volume, "xfs": XfsVolume}
# The Hyper-V daemons under the names distributions install them (Debian/Ubuntu's
# hyperv-daemons and linux-tools: hv_*_daemon; RHEL's hyperv-daemons: hyperv*d).
DAEMON_FILES = {
    "hv_kvp_daemon": ("hv_kvp_daemon", "hypervkvpd"),
    "hv_vss_daemon": ("hv_vss_daemon", "hypervvssd"),
    "hv_fcopy_daemon": ("hv_fcopy_daemon", "hypervfcopyd"),
}


def derive_linux_facts(volumes: list[tuple[int, str, object]], tmp_path: Path,
                       hv_modules: dict[str, tuple[str, str]]) -> dict:
    """The facts of the Linux guest on one of `volumes` ((partition index, blkid TYPE, reader)):
    its os-release, kernels, which of `hv_modules` ({module: (directory under the kernel's
    modules, description)}) each kernel has, built in or as a file, and the Hyper-V daemons."""
    roots = [(i, kind, vol) for i, kind, vol in volumes if resolve(vol, "/etc/os-release")]
    assert len(roots) == 1, roots
    index, kind, vol = roots[0]
    os_release = dict(re.findall(r'^(\w+)="?([^"\n]*)"?$', vol.read(resolve(vol, "/etc/os-release")).decode(), re.M))

    def is_file(path: str) -> bool:
        real = resolve(vol, path)
        return real is not None and vol.kind(real) == "regular"

    boot = resolve(vol, "/boot")
    kernels = sorted(n[len("vmlinuz-"):] for n in vol.names(boot)
                     if n.startswith("vmlinuz-") and vol.kind(f"{boot}/{n}") == "regular")
    modules: dict[str, bool] = {}
    for kernel in kernels:
        base = resolve(vol, f"/lib/modules/{kernel}")
        builtin = vol.read(f"{base}/modules.builtin").decode().split()
        for module, (directory, _) in hv_modules.items():
            files = [f"{base}/{directory}/{module}{ext}" for ext in (".ko", ".ko.zst", ".ko.xz")]
            present = [f for f in files if is_file(f)]
            modules[module] = modules.get(module, False) or f"{directory}/{module}.ko" in builtin or bool(present)
            for path in present:  # compressed modules must decompress to the module
                data = vol.read(resolve(vol, path))
                out = tmp_path / f"{kernel}-{Path(path).name}"
                out.write_bytes(data)
                if path.endswith(".ko.xz"):
                    data = sh("xz", "-dc", out).stdout
                elif path.endswith(".ko.zst"):
                    if not shutil.which("zstd"):
                        continue
                    data = sh("zstd", "-dc", out).stdout
                assert data[:4] == b"\x7fELF" and f"name={module}\0".encode() in data, path
    daemons = {key: any(is_file(f"/usr/sbin/{n}") for n in names) for key, names in DAEMON_FILES.items()}
    return {"os": "linux", "linux": {
        "distribution": os_release["ID"],
        "version": os_release["VERSION_ID"],
        "kernels": kernels,
        "hv_modules": modules,
        "daemons": daemons,
        "root_partition": index,
        "filesystem": kind,
    }}


def ext_tree(volume: Path) -> dict[str, tuple]:
    """Every path of an ext2/3/4 volume file as dissect.extfs reads it: (kind, mode, uid, gid, what) where
    what is a file's sha256, a link's target, or None for a folder (whose times and size may change)."""
    import hashlib
    import stat as st

    from dissect.extfs import ExtFS

    with open(volume, "rb") as f:
        fs = ExtFS(f)
        out: dict[str, tuple] = {}
        todo = [("", fs.get("/"))]
        while todo:
            prefix, folder = todo.pop()
            for name, node in folder.listdir().items():
                if name in (".", ".."):
                    continue
                path = f"{prefix}/{name}"
                raw = node.inode
                mode, uid, gid = st.S_IMODE(raw.i_mode), raw.i_uid | raw.i_uid_high << 16, raw.i_gid | raw.i_gid_high << 16
                if node.filetype == st.S_IFDIR:
                    out[path] = ("dir", mode, uid, gid, None)
                    todo.append((path, node))
                elif node.filetype == st.S_IFLNK:
                    out[path] = ("link", mode, uid, gid, node.link)
                else:
                    out[path] = ("file", mode, uid, gid, hashlib.sha256(node.open().read()).hexdigest())
        return out
