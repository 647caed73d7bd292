"""The Hyper-V daemons of a Linux guest: every name they go by, and how each distribution ships them.

The one place that maps ``kvp``, ``vss`` and ``fcopy`` to the daemons' binaries, their systemd
units per distribution, and the Windows service names of the same integration services
(``vmickvpexchange``, ``vmicvss``, ``vmicguestinterface``), so that one ``services`` command
serves a mixed fleet. Where the packaging facts come from:

- **Ubuntu**, package linux-cloud-tools-common (Ubuntu kernel source, debian/cloud-tools/):
  /lib/systemd/system/hv-kvp-daemon.service, hv-vss-daemon.service, hv-fcopy-daemon.service,
  each ``[Install] WantedBy=multi-user.target``; ExecStart=/usr/sbin/hv_kvp_daemon (and
  hv_vss_daemon, hv_fcopy_daemon), a wrapper that runs /usr/lib/linux-tools/<kernel>/<daemon>.
- **Debian**, package hyperv-daemons: dh_installsystemd installs debian/hyperv-daemons.<unit>
  as /lib/systemd/system/hyperv-daemons.hv-kvp-daemon.service (and .hv-vss-daemon,
  .hv-fcopy-daemon), enabled by the package's postinst; binaries /usr/sbin/hv_kvp_daemon etc.
  (``systemctl status`` output quoted in public bug reports and scripts: "Loaded: loaded
  (/lib/systemd/system/hyperv-daemons.hv-kvp-daemon.service; enabled; vendor preset: enabled)").
- **RHEL family** (RHEL, CentOS, Fedora, Azure Linux), spec hyperv-daemons.spec (e.g.
  microsoft/azurelinux SPECS/hyperv-daemons): subpackages hypervkvpd, hypervvssd, hypervfcopyd;
  binaries /usr/sbin/hypervkvpd, hypervvssd, hypervfcopyd; units %{_unitdir}/hypervkvpd.service
  etc. with no [Install] section; udev rules %{_udevrulesdir}/70-hypervkvp.rules,
  70-hypervvss.rules, 70-hypervfcopy.rules, each ``SUBSYSTEM=="misc",
  KERNEL=="vmbus/hv_kvp", TAG+="systemd", ENV{SYSTEMD_WANTS}+="hypervkvpd.service"``, so udev
  starts the daemon when the host offers the device. Newer kernels' fcopy is
  hv_fcopy_uio_daemon, whose hypervfcopyd.service has ``[Install] WantedBy=multi-user.target``
  instead of a rule. The state is therefore always read from the guest's files, never assumed.
"""

from __future__ import annotations

from dataclasses import dataclass

from vhdtool.filesystem.base import Filesystem
from vhdtool.guest.systemd import LinkPlan, UnitFile, disable_plan, enable_plan, find_unit, udev_started_units, \
    unit_state
from vhdtool.guest.unitfile import exec_start_binary

UBUNTU, DEBIAN, RHEL = "ubuntu", "debian", "rhel"
RHEL_LIKE = ("rhel", "fedora", "centos", "rocky", "almalinux", "ol", "mariner", "azurelinux")
DAEMON_DIRS = ("/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/libexec/hypervkvpd", "/usr/lib/linux-tools")


@dataclass(frozen=True)
class HvDaemon:
    key: str  # kvp, vss, fcopy
    daemon: str  # the upstream binary name (Linux tools/hv)
    windows: str  # the Windows service of the same integration service
    binaries: tuple[str, ...]  # names the binary has in the distributions
    units: tuple[tuple[str, str], ...]  # (family, unit name)

    def unit_names(self) -> tuple[str, ...]:
        return tuple(u for _, u in self.units)


HV_DAEMONS = (
    HvDaemon("kvp", "hv_kvp_daemon", "vmickvpexchange", ("hv_kvp_daemon", "hypervkvpd"),
             ((UBUNTU, "hv-kvp-daemon.service"), (DEBIAN, "hyperv-daemons.hv-kvp-daemon.service"),
              (RHEL, "hypervkvpd.service"))),
    HvDaemon("vss", "hv_vss_daemon", "vmicvss", ("hv_vss_daemon", "hypervvssd"),
             ((UBUNTU, "hv-vss-daemon.service"), (DEBIAN, "hyperv-daemons.hv-vss-daemon.service"),
              (RHEL, "hypervvssd.service"))),
    HvDaemon("fcopy", "hv_fcopy_daemon", "vmicguestinterface", ("hv_fcopy_daemon", "hypervfcopyd", "hv_fcopy_uio_daemon"),
             ((UBUNTU, "hv-fcopy-daemon.service"), (DEBIAN, "hyperv-daemons.hv-fcopy-daemon.service"),
              (RHEL, "hypervfcopyd.service"))),
)
BY_KEY = {d.key: d for d in HV_DAEMONS}
# The Windows integration services with no daemon in a Linux guest, and why: a mixed fleet's one
# command names them, and a Linux guest passes them by with this note rather than failing.
WINDOWS_ONLY = {
    "vmicheartbeat": "the kernel's hv_utils driver answers the heartbeat itself",
    "vmicshutdown": "the kernel's hv_utils driver handles the host's shutdown request itself",
    "vmictimesync": "the kernel's hv_utils driver (and the PTP clock it offers) keeps the time itself",
    "vmicrdv": "Remote Desktop Virtualization has no Linux counterpart",
    "vmicvmsession": "PowerShell Direct has no Linux counterpart",
}


def daemon_key(name: str) -> str | None:
    """``kvp``, ``vss`` or ``fcopy`` for any name of a daemon (its key, binary, unit or Windows service)."""
    n = name.strip().lower()
    for d in HV_DAEMONS:
        names = {d.key, d.daemon, d.windows, *d.binaries, *d.unit_names()}
        names |= {u.removesuffix(".service") for u in d.unit_names()}
        if n in names:
            return d.key
    return None


def all_names() -> list[str]:
    return [n for d in HV_DAEMONS for n in (d.key, d.daemon, d.windows)]


def windows_name(name: str) -> str | None:
    """The Windows service of the same integration service as a Linux daemon's name (kvp -> vmickvpexchange)."""
    key = daemon_key(name)
    return BY_KEY[key].windows if key else None


def family(os_id: str | None, id_like: str | None) -> str | None:
    """Which distribution's packaging a guest follows, from os-release ID and ID_LIKE."""
    ids = [(os_id or "").lower(), *(id_like or "").lower().split()]
    for candidate in ids:  # ID first: Ubuntu is ID_LIKE=debian, and must stay Ubuntu
        if candidate == UBUNTU:
            return UBUNTU
        if candidate == DEBIAN:
            return DEBIAN
        if candidate in RHEL_LIKE:
            return RHEL
    return None


def _candidates(d: HvDaemon, fam: str | None) -> list[str]:
    return [u for f, u in d.units if f == fam] + [u for f, u in d.units if f != fam]


def find_daemon_unit(fs: Filesystem, d: HvDaemon, fam: str | None) -> UnitFile | None:
    """The daemon's unit: the distribution's own name first, then the other distributions' names."""
    for name in _candidates(d, fam):
        unit = find_unit(fs, name)
        if unit is not None:
            return unit
    return None


def _binary(fs: Filesystem, d: HvDaemon, unit: UnitFile | None) -> str | None:
    program = exec_start_binary(unit.text) if unit is not None and not unit.masked else None
    if program and program.startswith("/") and fs.exists(program):
        return program
    names = ((program,) if program and "/" not in program else ()) + d.binaries
    return next((f"{folder}/{n}" for n in names for folder in DAEMON_DIRS if fs.exists(f"{folder}/{n}")), None)


@dataclass(frozen=True)
class DaemonState:
    name: str  # kvp, vss, fcopy
    daemon: str | None  # the binary's path in the guest
    unit: str | None  # the unit's name
    start: str  # enabled, disabled, masked, static, udev, indirect, not-installed
    unit_path: str | None = None
    udev_rule: str | None = None

    def to_dict(self) -> dict:
        return {"name": self.name, "daemon": self.daemon, "unit": self.unit, "start": self.start}


def daemon_states(fs: Filesystem, os_id: str | None, id_like: str | None) -> tuple[DaemonState, ...]:
    """The state of each Hyper-V daemon, found as systemd finds it."""
    fam = family(os_id, id_like)
    udev: dict[str, str] | None = None
    out = []
    for d in HV_DAEMONS:
        unit = find_daemon_unit(fs, d, fam)
        if unit is not None and udev is None:
            udev = udev_started_units(fs)
        state = unit_state(fs, unit, udev or {})
        out.append(DaemonState(d.key, _binary(fs, d, unit), unit.name if unit else None, state,
                               unit.path if unit else None, (udev or {}).get(unit.name) if unit else None))
    return tuple(out)


def link_plans(fs: Filesystem, os_id: str | None, id_like: str | None,
               wanted: list[tuple[str, bool]]) -> list[LinkPlan]:
    """For each (name, enable?) the links to create or remove, or the refusal; names as ``daemon_key`` takes."""
    fam = family(os_id, id_like)
    udev = udev_started_units(fs)
    plans = []
    for name, enable in wanted:
        key = daemon_key(name)
        action = "enable" if enable else "disable"
        if key is None and name.strip().lower() in WINDOWS_ONLY:
            plans.append(LinkPlan(name, action, notes=(f"{name} has no Linux daemon ("
                                                       f"{WINDOWS_ONLY[name.strip().lower()]}): nothing to {action}",)))
            continue
        if key is None:
            plans.append(LinkPlan(name, action, refusal=f"no Hyper-V daemon is named {name}",
                                  hint=f"use one of: {', '.join(all_names())}"))
            continue
        unit = find_daemon_unit(fs, BY_KEY[key], fam)
        if unit is None:
            plans.append(LinkPlan(name, action, refusal=f"the guest has no {key} daemon unit "
                                  f"({', '.join(_candidates(BY_KEY[key], fam))})",
                                  hint="install the distribution's Hyper-V daemons package (vhdtool plan)"))
            continue
        plans.append((enable_plan if enable else disable_plan)(fs, unit.name, udev))
    return plans
