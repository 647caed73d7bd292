"""Windows guest facts from the system volume and its SOFTWARE and SYSTEM hives.

Sources, per docs/ARCHITECTURE.md "Guest facts": SOFTWARE ``Microsoft\\Windows NT\\CurrentVersion``
(CurrentMajor/MinorVersionNumber on NT 10, where CurrentVersion stays "6.3");
SYSTEM ``Select\\Current`` for the control set (never assumed to be 001);
``MountedDevices`` for the drive letter; ``Setup`` and SysprepStatus for
generalization; the integration services version from the KVP key, then CBS
packages, then vmbus.sys's file version.
"""

from __future__ import annotations

import io
import re
import struct
from dataclasses import dataclass
from uuid import UUID

from vhdtool.errors import CorruptHive, UnreplayableHive
from vhdtool.filesystem.ntfs import NtfsFilesystem
from vhdtool.guest.cbs import CBS_PACKAGES
from vhdtool.guest.hivefiles import log_files, read_hive_files
from vhdtool.guest.versioninfo import file_version, version_tuple
from vhdtool.registry.hive import Hive
from vhdtool.registry.logreplay import replay
from vhdtool.units import MiB
from vhdtool.volume import Partition

CONFIG_DIR = "/Windows/System32/config"
CURRENT_VERSION = "Microsoft\\Windows NT\\CurrentVersion"
KVP_AUTO = "Microsoft\\Virtual Machine\\Auto"
# Written by the guest's data-exchange (KVP) service from what the host told it.
KVP_GUEST_PARAMETERS = "Microsoft\\Virtual Machine\\Guest\\Parameters"
# The host's NT version -> the OS matrix's host key (cabs/matrix.json); older hosts have no table.
HOST_KEYS = {"6.2": "win8", "6.3": "win8.1", "10.0": "win10"}
SETUP_STATE = "Microsoft\\Windows\\CurrentVersion\\Setup\\State"
VMBUS_SYS = "/Windows/System32/drivers/vmbus.sys"
IC_SERVICES = (
    "vmicheartbeat",
    "vmickvpexchange",
    "vmicshutdown",
    "vmictimesync",
    "vmicvss",
    "vmicguestinterface",
    "vmicrdv",
    "vmicvmsession",
)
START_NAMES = {0: "boot", 1: "system", 2: "automatic", 3: "manual", 4: "disabled"}
ARCHITECTURES = {"amd64": "x64", "x86": "x86", "arm64": "arm64", "ia64": "ia64", "arm": "arm"}
# CBS package names of the integration components (guest drivers and services).
IC_PACKAGE = re.compile(
    r"^Microsoft-Hyper-V-(Guest-Integration-Drivers|Integration-Services|Integration-Components)"
    r"[^~]*~[0-9a-f]{16}~([a-z0-9]+)~[^~]*~(\d+(?:\.\d+){1,3})$",
    re.IGNORECASE,
)
CBS_INSTALLED = 0x70
GENERALIZED_STATE = 7


@dataclass(frozen=True)
class HiveState:
    """A hive's state on disk, and whether its facts were read after replaying its logs (as Windows will at boot)."""

    dirty: bool
    logs: tuple[str, ...]
    replayed: bool = False
    entries_applied: int = 0
    replay_problem: str | None = None  # why a dirty hive was read from its primary file instead

    def to_dict(self) -> dict:
        return {"dirty": self.dirty, "logs": list(self.logs), "replayed": self.replayed,
                "entries_applied": self.entries_applied, "replay_problem": self.replay_problem}


@dataclass(frozen=True)
class WindowsFacts:
    product_name: str | None
    version: str | None
    build: int | None
    ubr: int | None
    service_pack: str | None
    edition: str | None
    installation_type: str | None
    arch: str | None
    system_partition: int
    drive_letter: str | None
    control_set: int | None
    generalized: bool
    hibernated: bool
    ntfs_clean: bool
    ntfs_dirty_bit: bool
    ntfs_logfile_clean: bool
    bitlocker: bool
    hives: tuple[tuple[str, HiveState], ...]

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "hives"}
        d["hives"] = {name: state.to_dict() for name, state in self.hives}
        return d


@dataclass(frozen=True)
class IcService:
    name: str
    start: str | None
    start_value: int | None

    def to_dict(self) -> dict:
        return {"name": self.name, "start": self.start, "start_value": self.start_value}


@dataclass(frozen=True)
class LastHost:
    """The Hyper-V host the guest last ran on, as its data-exchange service recorded it."""

    name: str | None  # PhysicalHostNameFullyQualified, else PhysicalHostName
    os_version: str | None  # "6.2"
    service_pack: int | None
    host_key: str | None  # the matrix's host key for os_version, None for hosts it has no table for
    virtual_machine_name: str | None

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "os_version": self.os_version,
            "service_pack": self.service_pack,
            "host_key": self.host_key,
            "virtual_machine_name": self.virtual_machine_name,
        }


@dataclass(frozen=True)
class IntegrationServices:
    version: str | None
    source: str | None
    services: tuple[IcService, ...]
    last_host: LastHost | None = None

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "source": self.source,
            "services": [s.to_dict() for s in self.services],
            "last_host": self.last_host.to_dict() if self.last_host else None,
        }


def find_config_dir(fs: NtfsFilesystem) -> bool:
    return fs.exists(CONFIG_DIR + "/SOFTWARE") and fs.exists(CONFIG_DIR + "/SYSTEM")


def _int(value) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def _str(value) -> str | None:
    if isinstance(value, str):
        return value.strip("\0").strip() or None
    return None


def open_guest_hive(fs: NtfsFilesystem, name: str, image_path: str,
                    warnings: list[str]) -> tuple[Hive, HiveState]:
    """Hive ``name`` of config/ as Windows will read it at boot: a dirty one replayed from its logs in memory.

    When the logs cannot be replayed, the primary file is read, with a warning (stage refuses such a hive).
    """
    path = f"{CONFIG_DIR}/{name}"
    hive = Hive(fs.open(path), name, image_path)
    logs = tuple(f"{name}.{ext}" for ext in log_files(fs, path))
    if not hive.checksum_ok:
        warnings.append(f"{name} hive base block checksum does not match")
    if not hive.dirty and hive.checksum_ok:
        return hive, HiveState(False, logs)
    # Dirty as the registry layer counts it (a wrong checksum too), and only a dirty hive pays
    # for reading its primary and logs whole.
    state = (f"sequence {hive.sequence[0]} != {hive.sequence[1]}" if hive.dirty
             else "its base block checksum does not match")
    try:
        files = read_hive_files(fs, path, name, image_path)
        current = replay(files.primary, files.log1, files.log2, name, image_path)
        replayed = Hive(io.BytesIO(current.data), name, image_path)
    except CorruptHive as e:
        why = e.why if isinstance(e, UnreplayableHive) else e.problem
        warnings.append(
            f"{name} hive is dirty ({state}); its logs cannot be replayed ({why}): "
            "values are read from the primary file, and stage will refuse to write it"
        )
        return hive, HiveState(True, logs, replay_problem=why)
    used = list(dict.fromkeys(files.log_name(a.log) for a in current.applied))
    warnings.append(
        f"{name} hive is dirty ({state}); read as Windows will see it after replaying "
        f"{len(current.applied)} log {'entry' if len(current.applied) == 1 else 'entries'} from {', '.join(used)}"
    )
    return replayed, HiveState(True, logs, True, len(current.applied))


class WindowsGuest:
    """Reads the facts of one Windows installation; each fact read once."""

    def __init__(
        self,
        fs: NtfsFilesystem,
        partition: Partition,
        disk_signature: int | None,
        image_path: str,
        encrypted_volumes: bool,
    ):
        self.fs = fs
        self.partition = partition
        self.disk_signature = disk_signature
        self.image_path = image_path
        self.encrypted_volumes = encrypted_volumes
        self.warnings: list[str] = []
        self.software, software_state = open_guest_hive(fs, "SOFTWARE", image_path, self.warnings)
        self.system, system_state = open_guest_hive(fs, "SYSTEM", image_path, self.warnings)
        self.hive_states = (("SYSTEM", system_state), ("SOFTWARE", software_state))

    # -- facts --------------------------------------------------------------------
    def control_set(self) -> int | None:
        current = _int(self.system.value("Select", "Current"))
        if current is not None and self.system.key(f"ControlSet{current:03d}") is not None:
            return current
        existing = sorted(
            int(m.group(1))
            for n in self.system.subkey_names("")
            if (m := re.fullmatch(r"ControlSet(\d{3})", n, re.IGNORECASE))
        )
        if not existing:
            raise CorruptHive(self.image_path, "SYSTEM hive has no control set")
        self.warnings.append(
            f"SYSTEM\\Select\\Current is missing or names no control set; using ControlSet{existing[0]:03d}"
        )
        return existing[0]

    def facts(self) -> tuple[WindowsFacts, IntegrationServices]:
        if self.software.key(CURRENT_VERSION) is None:
            self.warnings.append(
                f"the SOFTWARE hive has no {CURRENT_VERSION} key, so the product and version are unknown; "
                "it may be damaged or another hive put in its place"
            )
        cv = self.software.values(CURRENT_VERSION)
        major = _int(cv.get("CurrentMajorVersionNumber"))
        minor = _int(cv.get("CurrentMinorVersionNumber"))
        version = f"{major}.{minor if minor is not None else 0}" if major is not None else _str(cv.get("CurrentVersion"))
        cs = self.control_set()
        ccs = f"ControlSet{cs:03d}"
        arch_raw = _str(
            self.system.value(f"{ccs}\\Control\\Session Manager\\Environment", "PROCESSOR_ARCHITECTURE")
        )
        arch = ARCHITECTURES.get(arch_raw.lower(), arch_raw) if arch_raw else None
        installation_type = _str(cv.get("InstallationType"))
        if installation_type is None:
            product_type = _str(self.system.value(f"{ccs}\\Control\\ProductOptions", "ProductType"))
            installation_type = {"winnt": "Client", "servernt": "Server", "lanmannt": "Server"}.get(
                (product_type or "").lower()
            )
        dirty_bit = self.fs.volume_dirty()
        logfile_clean = self.fs.logfile_clean()
        windows = WindowsFacts(
            product_name=_str(cv.get("ProductName")),
            version=version,
            build=_int(cv.get("CurrentBuildNumber")),
            ubr=_int(cv.get("UBR")),
            service_pack=_str(cv.get("CSDVersion")),
            edition=_str(cv.get("EditionID")),
            installation_type=installation_type,
            arch=arch,
            system_partition=self.partition.index,
            drive_letter=self.drive_letter(),
            control_set=cs,
            generalized=self.generalized(),
            hibernated=self.fs.hibernated(),
            ntfs_clean=not dirty_bit and logfile_clean,
            ntfs_dirty_bit=dirty_bit,
            ntfs_logfile_clean=logfile_clean,
            bitlocker=self.encrypted_volumes,
            hives=self.hive_states,
        )
        if windows.hibernated:
            self.warnings.append("the guest is hibernated (hiberfil.sys holds a hibernation image)")
        if not windows.ntfs_clean:
            self.warnings.append("the system volume was not shut down cleanly (NTFS dirty bit or $LogFile)")
        return windows, self.integration_services(ccs)

    def drive_letter(self) -> str | None:
        values = self.system.values("MountedDevices")
        p = self.partition
        if p.table == "gpt":
            if not p.guid:
                return None
            want = b"DMIO:ID:" + UUID(p.guid).bytes_le
        else:
            if self.disk_signature is None:
                return None
            want = struct.pack("<IQ", self.disk_signature, p.offset)
        for name, data in values.items():
            m = re.fullmatch(r"\\DosDevices\\([A-Za-z]):", name)
            if m and isinstance(data, bytes) and data == want:
                return m.group(1).upper()
        return None

    def generalized(self) -> bool:
        """Sysprepped with /generalize and not yet specialized.

        ImageState is what Windows itself keeps for this. GeneralizationState alone
        is not enough: it stays 7 on machines deployed from a generalized image, so
        without ImageState it counts only while setup is pending.
        """
        image_state = _str(self.software.value(SETUP_STATE, "ImageState"))
        if image_state:
            return image_state.upper().startswith("IMAGE_STATE_GENERALIZE_RESEAL")
        state = _int(self.system.value("Setup\\Status\\SysprepStatus", "GeneralizationState"))
        in_setup = _int(self.system.value("Setup", "SystemSetupInProgress"))
        return state == GENERALIZED_STATE and in_setup == 1

    def integration_services(self, ccs: str) -> IntegrationServices:
        services = []
        for name in IC_SERVICES:
            key = f"{ccs}\\Services\\{name}"
            if self.system.key(key) is None:
                continue
            start = _int(self.system.value(key, "Start"))
            services.append(IcService(name, START_NAMES.get(start) if start is not None else None, start))
        version, source = self._ic_version()
        return IntegrationServices(version, source, tuple(services), self.last_host())

    def last_host(self) -> LastHost | None:
        """The host recorded under Guest\\Parameters, or None when the guest never recorded one."""
        # Value names are case-insensitive in the registry, as everywhere in Windows.
        values = {k.lower(): v for k, v in self.software.values(KVP_GUEST_PARAMETERS).items()}

        def first(*names: str):
            return next((values[n.lower()] for n in names if n.lower() in values), None)

        # Hyper-V writes HostingSystemOsMajor...; Microsoft's own blog post spells them HostSystemOSMajor.
        major = _int(first("HostingSystemOsMajor", "HostSystemOSMajor"))
        minor = _int(first("HostingSystemOsMinor", "HostSystemOSMinor"))
        name = _str(first("PhysicalHostNameFullyQualified")) or _str(first("PhysicalHostName"))
        if major is None and name is None:
            return None
        os_version = f"{major}.{minor or 0}" if major is not None else None
        return LastHost(
            name=name,
            os_version=os_version,
            service_pack=_int(first("HostingSystemSpMajor", "HostSystemSPMajor")),
            host_key=HOST_KEYS.get(os_version or ""),
            virtual_machine_name=_str(first("VirtualMachineName")),
        )

    def _ic_version(self) -> tuple[str | None, str | None]:
        kvp = _str(self.software.value(KVP_AUTO, "IntegrationServicesVersion"))
        if kvp:
            return kvp, "kvp"
        best = None
        for name in self.software.subkey_names(CBS_PACKAGES):
            m = IC_PACKAGE.match(name)
            if not m:
                continue
            state = _int(self.software.value(f"{CBS_PACKAGES}\\{name}", "CurrentState"))
            if state is not None and state != CBS_INSTALLED:
                continue
            if best is None or version_tuple(m.group(3)) > version_tuple(best):
                best = m.group(3)
        if best:
            return best, "cbs"
        if self.fs.exists(VMBUS_SYS):
            version = file_version(self.fs.read(VMBUS_SYS, 8 * MiB))
            if version:
                return version, "vmbus.sys"
            self.warnings.append("vmbus.sys has no readable version resource")
        return None, None
