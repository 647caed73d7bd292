"""Which package installs the Hyper-V daemons in a Linux guest, and with which package manager.

Pure: a function of the inspected ``LinuxFacts``. Every name it returns goes into a boot
script (``vhdtool.stage.linux_script``), so a name built from something read in the image
(the kernel release, for Ubuntu's flavour) must match a strict pattern here, and the script
generator checks every value again.

- Ubuntu: ``linux-cloud-tools-<flavour>``, the flavour of the newest installed kernel
  (``5.15.0-91-generic`` -> ``generic``). It depends on the cloud tools of the archive's
  newest kernel of that flavour and on ``linux-cloud-tools-common``, which holds the
  units ``hv-kvp-daemon.service`` and the like and the ``/usr/sbin/hv_kvp_daemon`` wrapper
  that runs the tools of the running kernel (``/usr/lib/linux-tools/$(uname -r)``).
- Debian: ``hyperv-daemons`` (units ``hyperv-daemons.hv-kvp-daemon.service`` and the like).
- RHEL family (rhel, centos, rocky, almalinux, fedora, ol, by ID or ID_LIKE): ``hyperv-daemons``,
  with dnf, or yum on release 7. Its units ``hypervkvpd.service`` and the like are started by
  udev when the host offers the device, so none is enabled.
A guest without systemd (Ubuntu before 15.04, Debian before 8, RHEL family before 7) is not
staged: the boot hook is a systemd unit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vhdtool.guest.linux import LinuxFacts, kernel_sort_key

# The daemons whose absence makes the plan stage: KVP (the host's view of the guest) and VSS
# (live backup). fcopy is installed with them but does not decide.
DECIDING_DAEMONS = ("hv_kvp_daemon", "hv_vss_daemon")
PACKAGE_PATTERN = re.compile(r"[a-z0-9][a-z0-9+.-]{0,99}")
# An Ubuntu kernel release: version, ABI number, flavour ("5.15.0-91-generic", "6.5.0-1015-azure").
UBUNTU_RELEASE = re.compile(r"[0-9]{1,4}\.[0-9]{1,4}(?:\.[0-9]{1,4})?-[0-9]{1,6}-([a-z][a-z0-9]{0,30}(?:-[a-z0-9]{1,30}){0,3})")
RHEL_FAMILY = ("rhel", "centos", "rocky", "almalinux", "fedora", "ol")
UBUNTU_UNITS = ("hv-kvp-daemon.service", "hv-vss-daemon.service", "hv-fcopy-daemon.service")
DEBIAN_UNITS = ("hyperv-daemons.hv-kvp-daemon.service", "hyperv-daemons.hv-vss-daemon.service",
                "hyperv-daemons.hv-fcopy-daemon.service")
# First release with systemd as init, per family.
FIRST_SYSTEMD = {"ubuntu": (15, 4), "debian": (8,), "rhel": (7,)}


@dataclass(frozen=True)
class PackageChoice:
    """What the boot script installs, and the units it enables afterwards."""

    family: str  # "ubuntu" | "debian" | "rhel"
    package_manager: str  # "apt" | "dnf" | "yum"
    packages: tuple[str, ...]
    units: tuple[str, ...]
    because: str
    note: str | None = None


@dataclass(frozen=True)
class NoPackage:
    """Why nothing is staged."""

    up_to_date: bool  # the daemons are there (as opposed to: we cannot say what to install)
    because: str


def missing_daemons(facts: LinuxFacts) -> list[str]:
    present = dict(facts.daemons)
    return [d for d in DECIDING_DAEMONS if not present.get(d, False)]


def family_of(facts: LinuxFacts) -> str | None:
    """ubuntu, debian or rhel, from ID first and then ID_LIKE (in os-release's order)."""
    for name in (facts.distribution or "", *facts.id_like):
        name = name.lower()
        if name in ("ubuntu", "debian"):
            return name
        if name in RHEL_FAMILY:
            return "rhel"
    return None


def _release(version: str | None) -> tuple[int, ...] | None:
    m = re.match(r"^([0-9]{1,4})(?:\.([0-9]{1,4}))?", version or "")
    if not m:
        return None
    return tuple(int(x) for x in m.groups() if x is not None)


def choose_packages(facts: LinuxFacts) -> PackageChoice | NoPackage:
    missing = missing_daemons(facts)
    if not missing:
        return NoPackage(True, "the KVP and VSS daemons are installed (" + ", ".join(DECIDING_DAEMONS) + ")")
    lacking = " and ".join(missing) + (" is" if len(missing) == 1 else " are") + " missing"
    family = family_of(facts)
    name = facts.distribution or "unknown"
    if family is None:
        like = f" (ID_LIKE {' '.join(facts.id_like)})" if facts.id_like else ""
        return NoPackage(False, f"{lacking}, and vhdtool knows no package for the distribution '{name}'{like}: "
                                "install the Hyper-V daemons with the guest's package manager")
    # VERSION_ID is the family's own numbering only for the family's members, not for a derivative
    # known by ID_LIKE (Linux Mint 21 is Ubuntu 22.04): those are taken as they come.
    own = name in ("ubuntu", "debian", *RHEL_FAMILY)
    release = _release(facts.version) if own else None
    first = FIRST_SYSTEMD[family] if name != "fedora" else (15,)
    if release is not None and release < first:
        return NoPackage(False, f"{lacking}; {name} {facts.version} does not boot with systemd, which the staged "
                                "install needs: install the Hyper-V daemons in the guest")
    if family == "ubuntu":
        return _ubuntu(facts, lacking)
    if family == "debian":
        return PackageChoice("debian", "apt", ("hyperv-daemons",), DEBIAN_UNITS,
                             f"{lacking}; Debian's hyperv-daemons package installs the daemons")
    manager = "yum" if name != "fedora" and release is not None and release[0] == 7 else "dnf"
    return PackageChoice("rhel", manager, ("hyperv-daemons",), (),
                         f"{lacking}; the hyperv-daemons package installs the daemons ({manager}), and udev starts them")


def _ubuntu(facts: LinuxFacts, lacking: str) -> PackageChoice | NoPackage:
    if not facts.kernels:
        return NoPackage(False, f"{lacking}, and no kernel was found under /boot or /lib/modules to choose "
                                "Ubuntu's linux-cloud-tools flavour by")
    newest = max(facts.kernels, key=kernel_sort_key)
    m = UBUNTU_RELEASE.fullmatch(newest)
    package = f"linux-cloud-tools-{m.group(1)}" if m else None
    if package is None or not PACKAGE_PATTERN.fullmatch(package):
        return NoPackage(False, f"{lacking}, and the newest kernel's release {newest!r} names no Ubuntu flavour "
                                "(like 5.15.0-91-generic): install linux-cloud-tools for it in the guest")
    flavour = m.group(1)
    return PackageChoice("ubuntu", "apt", (package,), UBUNTU_UNITS,
                         f"{lacking}; {package} (with linux-cloud-tools-common) installs the daemons for the "
                         f"{flavour} kernel flavour of {newest}",
                         f"{package} brings the tools of the archive's newest {flavour} kernel; the daemons "
                         f"run on a kernel whose tools are installed, so a guest that keeps booting {newest} "
                         f"needs linux-cloud-tools-{newest} too (or its kernel upgraded)")
