"""Linux guest facts: distribution, kernels, Hyper-V drivers and daemons.

Linux guests get their integration services from the kernel (hv_vmbus, hv_utils,
hv_storvsc, hv_netvsc, hv_balloon) and the Hyper-V daemons (``guest.hvdaemons``, whose
units ``guest.systemd`` reads as systemd would); vhdtool reports them and never writes to a
Linux volume.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass

from vhdtool.filesystem.base import Filesystem
from vhdtool.guest.hvdaemons import DAEMON_DIRS, HV_DAEMONS, DaemonState, daemon_states
from vhdtool.units import MiB

HV_MODULES = ("hv_vmbus", "hv_utils", "hv_storvsc", "hv_netvsc", "hv_balloon")
# Where each module lives in a kernel's modules tree, when modules.dep is absent.
HV_MODULE_DIRS = {
    "hv_vmbus": "kernel/drivers/hv",
    "hv_utils": "kernel/drivers/hv",
    "hv_balloon": "kernel/drivers/hv",
    "hv_storvsc": "kernel/drivers/scsi",
    "hv_netvsc": "kernel/drivers/net/hyperv",
}
MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")
DAEMONS = {d.daemon: d.binaries for d in HV_DAEMONS}
OS_RELEASE = ("/etc/os-release", "/usr/lib/os-release")
FSTAB = "/etc/fstab"
MAX_FSTAB = 1 * MiB


@dataclass(frozen=True)
class LinuxFacts:
    distribution: str | None
    version: str | None
    pretty_name: str | None
    kernels: tuple[str, ...]
    hv_modules: tuple[tuple[str, bool], ...]
    daemons: tuple[tuple[str, bool], ...]
    root_partition: int | None
    filesystem: str
    id_like: tuple[str, ...] = ()  # os-release ID_LIKE: the distributions this one derives from
    services: tuple[DaemonState, ...] = ()  # each daemon's binary, unit and start, as systemd sees them

    def to_dict(self) -> dict:
        return {
            "distribution": self.distribution,
            "version": self.version,
            "pretty_name": self.pretty_name,
            "kernels": list(self.kernels),
            "hv_modules": dict(self.hv_modules),
            "daemons": dict(self.daemons),
            "root_partition": self.root_partition,
            "filesystem": self.filesystem,
            "services": [s.to_dict() for s in self.services],
            "id_like": list(self.id_like),
        }


def parse_os_release(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        m = re.match(r"^\s*([A-Z0-9_]+)=(.*)$", line)
        if not m:
            continue
        value = m.group(2).strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        out[m.group(1)] = value
    return out


def is_linux_root(fs: Filesystem) -> bool:
    return any(fs.exists(p) for p in OS_RELEASE)


def _module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    for suffix in MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return base.replace("-", "_")


def fstab_mount_over(fs: Filesystem, path: str) -> tuple[str, str] | None:
    """(mount point, device) of the first /etc/fstab entry (fstab(5)) that mounts a filesystem at ``path`` or at a
    folder above it other than /, as given or with its links resolved: what the booted guest finds at ``path`` is
    on that filesystem, not the root's."""
    if not fs.exists(FSTAB) or fs.is_dir(FSTAB):
        return None
    paths = {path, _resolved(fs, path)}  # /var a link to /data/var, /data mounted: the boot sees /data's
    for line in fs.read(FSTAB, MAX_FSTAB).decode("utf-8", "replace").splitlines():
        fields = line.split()
        if len(fields) < 2 or fields[0].startswith("#") or not fields[1].startswith("/"):
            continue  # swap ("none", "swap") has no mount point
        point = posixpath.normpath(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1]))
        if point not in ("/", "//") and any(p == point or p.startswith(point + "/") for p in paths):
            return point, fields[0]
    return None


def _resolved(fs: Filesystem, path: str) -> str:
    """``path`` with the links of its longest existing part resolved inside the guest."""
    head, rest = path, ""
    while head not in ("", "/"):
        found = fs.resolve(head)
        if found is not None:
            return posixpath.join(found, rest) if rest else found
        head, name = posixpath.split(head)
        rest = posixpath.join(name, rest) if rest else name
    return path


def os_release(fs: Filesystem) -> dict[str, str]:
    """The guest's os-release(5) fields ({} when it has none)."""
    for p in OS_RELEASE:
        if fs.exists(p):
            return parse_os_release(fs.read(p, 64 * 1024).decode("utf-8", "replace"))
    return {}


def linux_facts(fs: Filesystem, root_partition: int | None) -> LinuxFacts:
    release = os_release(fs)
    kernels = set()
    if fs.is_dir("/boot"):
        for name in fs.listdir("/boot"):
            if name.startswith("vmlinuz-"):
                kernels.add(name[len("vmlinuz-") :])
    modules_root = next((d for d in ("/lib/modules", "/usr/lib/modules") if fs.is_dir(d)), None)
    module_dirs = fs.listdir(modules_root) if modules_root else []
    kernels.update(d for d in module_dirs if fs.is_dir(f"{modules_root}/{d}"))

    present = {name: False for name in HV_MODULES}
    for version in module_dirs:
        base = f"{modules_root}/{version}"
        found: set[str] = set()
        for listing in ("modules.builtin", "modules.dep"):
            if fs.exists(f"{base}/{listing}"):
                text = fs.read(f"{base}/{listing}", 8 * MiB).decode("utf-8", "replace")
                for line in text.splitlines():
                    path = line.split(":", 1)[0].strip()
                    if path:
                        found.add(_module_name(path))
        for name, subdir in HV_MODULE_DIRS.items():
            if name in found or not fs.is_dir(f"{base}/{subdir}"):
                continue
            if any(_module_name(f) == name for f in fs.listdir(f"{base}/{subdir}")):
                found.add(name)
        for name in HV_MODULES:
            present[name] = present[name] or name in found

    daemons = {}
    for key, names in DAEMONS.items():
        daemons[key] = any(fs.exists(f"{d}/{n}") for d in DAEMON_DIRS for n in names)

    return LinuxFacts(
        distribution=release.get("ID"),
        version=release.get("VERSION_ID"),
        pretty_name=release.get("PRETTY_NAME"),
        kernels=tuple(sorted(kernels, key=kernel_sort_key)),
        hv_modules=tuple(present.items()),
        daemons=tuple(daemons.items()),
        root_partition=root_partition,
        filesystem=fs.kind,
        services=daemon_states(fs, release.get("ID"), release.get("ID_LIKE")),
        id_like=tuple(release.get("ID_LIKE", "").split()),
    )


def kernel_sort_key(version: str) -> tuple:
    """Kernel releases in version order: numbers as numbers, other parts after them."""
    return tuple((0, int(x), "") if x.isdigit() else (1, 0, x) for x in re.split(r"[.-]", version))
