"""Component Based Servicing (CBS): Windows' own record of the packages it installed, in the SOFTWARE hive.

``Microsoft\\Windows\\CurrentVersion\\Component Based Servicing\\Packages\\<identity>`` is a key per
package, named ``name~publicKeyToken~arch~language~version`` (the language empty for neutral
packages); its REG_DWORD ``CurrentState`` (four bytes; any other type or size is no state) is where the package is, in the values DISM names
(``STATE_NAMES``). ``RebootPending`` and ``PackagesPending`` under Component Based Servicing exist
while servicing waits for a restart to finish. Key names are case-insensitive, as the hive reader's
lookups are.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vhdtool.registry.hive import Hive
from vhdtool.registry.records import REG_DWORD, fold

CBS = "Microsoft\\Windows\\CurrentVersion\\Component Based Servicing"
CBS_PACKAGES = CBS + "\\Packages"
REBOOT_PENDING = CBS + "\\RebootPending"
PACKAGES_PENDING = CBS + "\\PackagesPending"
STATE_NAMES = {
    0x05: "uninstall-pending",
    0x20: "resolved",
    0x40: "staged",
    0x50: "superseded",
    0x60: "install-pending",
    0x65: "partially-installed",
    0x70: "installed",
    0x80: "permanent",
}
INSTALLED, PERMANENT, SUPERSEDED, INSTALL_PENDING = 0x70, 0x80, 0x50, 0x60


@dataclass(frozen=True)
class CbsPackage:
    """What CBS records for one package identity (None: the identity is not known)."""

    identity: str | None
    present: bool  # the package's key exists
    current_state: int | None  # its CurrentState REG_DWORD, None when absent or of another type

    @property
    def state(self) -> str:
        """"unknown" (no identity), "absent" (no key), a ``STATE_NAMES`` name, or "other"."""
        if self.identity is None:
            return "unknown"
        if not self.present:
            return "absent"
        return STATE_NAMES.get(self.current_state, "other") if self.current_state is not None else "other"

    def to_dict(self) -> dict:
        return {"identity": self.identity, "current_state": self.current_state, "state": self.state}


@dataclass(frozen=True)
class ServicingState:
    """The machine-wide keys that say servicing waits for a restart."""

    reboot_pending: bool
    packages_pending: bool

    @property
    def restart_needed(self) -> bool:
        return self.reboot_pending or self.packages_pending

    def to_dict(self) -> dict:
        return {"reboot_pending": self.reboot_pending, "packages_pending": self.packages_pending}


def read_package(software: Hive, identity: str | None) -> CbsPackage:
    """The CBS record of ``identity`` (a name checked against ``cabinet.format.CBS_IDENTITY``) in SOFTWARE."""
    if identity is None:
        return CbsPackage(None, False, None)
    if "\\" in identity or not identity:
        raise ValueError(f"not a package identity: {identity!r}")  # a path, never a key name
    key = f"{CBS_PACKAGES}\\{identity}"
    if software.key(key) is None:
        return CbsPackage(identity, False, None)
    # Only a REG_DWORD of four bytes is a state: another type (a QWORD, a big-endian DWORD, a string) or a
    # DWORD of another size is not one, and not damage to the hive either (status reads the rest).
    wanted = fold("CurrentState")
    value = next((v for v in software.stored_values(key) if not v.default and v.folded == wanted), None)
    ok = value is not None and value.type == REG_DWORD and len(value.data) == 4
    return CbsPackage(identity, True, struct.unpack("<I", value.data)[0] if ok else None)


def read_servicing(software: Hive) -> ServicingState:
    return ServicingState(software.key(REBOOT_PENDING) is not None, software.key(PACKAGES_PENDING) is not None)
