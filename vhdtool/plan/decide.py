"""Deciding (the plan): how a guest gets its integration services on a host, and which cab, if any, to stage.

``plan(inspection, host, catalog, matrix)`` is a pure function of the inspected
facts, the host, the matrix revision and the cabs found: no I/O. It returns the
method (windows-update, integration-services-disk, kb3071740-cab,
package-manager, unsupported, up-to-date), the action (stage, none, manual), the
chosen cab with its verified identity, and the reasons.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from vhdtool.errors import UnknownKey
from vhdtool.guest.inspection import Inspection, require_guest
from vhdtool.plan.guestkey import NEWER_THAN_MATRIX, identify
from vhdtool.plan.matrix import Matrix, load_matrix
from vhdtool.guest.versioninfo import version_tuple
from vhdtool.plan.sources import CabCandidate, CabCatalog

# Signature verdicts (vhdtool.cabinet.catalog.SIGNATURES), named here so the plan does not load the verifier.
INVALID, UNSIGNED, UNTRUSTED = "invalid", "unsigned", "untrusted"
# Between cabs of one version, the better signature is chosen: a chain to a trusted root, then a valid
# signature without one, then none.
SIGNATURE_PREFERENCE = {"microsoft": 2, "trusted": 2, UNTRUSTED: 1}

SCHEMA = 1
WINDOWS_UPDATE = "windows-update"
IC_DISK = "integration-services-disk"
KB3071740 = "kb3071740-cab"
PACKAGE_MANAGER = "package-manager"
UNSUPPORTED = "unsupported"
UP_TO_DATE = "up-to-date"
STAGE, NONE, MANUAL = "stage", "none", "manual"
DATA_EXCHANGE_SERVICE = "vmickvpexchange"
DISABLED = 4


@dataclass(frozen=True)
class Plan:
    image: str
    host: str | None  # None: --host auto for a guest whose answer is the same on every host (Linux)
    matrix_revision: str
    guest_key: str | None
    arch: str | None
    guest_ic_version: str | None
    method: str
    action: str
    cab: CabCandidate | None
    reasons: tuple[str, ...]
    notes: tuple[str, ...]
    # Linux guests (method package-manager): what the staged boot script installs, and the units it enables.
    packages: tuple[str, ...] = ()
    package_manager: str | None = None  # "apt" | "dnf" | "yum"
    units: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        cab = self.cab.to_dict() if self.cab is not None else None
        return {
            "schema": SCHEMA,
            "image": self.image,
            "host": self.host,
            "matrix_revision": self.matrix_revision,
            "guest_key": self.guest_key,
            "arch": self.arch,
            "guest_ic_version": self.guest_ic_version,
            "method": self.method,
            "action": self.action,
            "cab": cab,
            "reasons": list(self.reasons),
            "notes": list(self.notes),
            "packages": list(self.packages),
            "package_manager": self.package_manager,
            "units": list(self.units),
        }


def plan(
    inspection: Inspection,
    host: str,
    catalog: CabCatalog | None = None,
    matrix: Matrix | None = None,
) -> Plan:
    matrix = matrix or load_matrix()
    host = matrix.resolve_host(host)
    catalog = catalog or CabCatalog((), (), ())
    guest = identify(inspection)
    ic = inspection.guest.integration_services
    ic_version = ic.version if ic else None
    reasons: list[str] = []
    notes: list[str] = list(catalog.notes)

    def done(method: str, action: str, cab: CabCandidate | None = None) -> Plan:
        if action == STAGE:
            notes.extend(f"stage would refuse this image: {why}" for why in write_refusals(inspection))
        notes.extend(dirty_hive_notes(inspection, staging=action == STAGE))
        return Plan(
            image=inspection.image.path,
            host=host,
            matrix_revision=matrix.revision,
            guest_key=guest.key,
            arch=guest.arch,
            guest_ic_version=ic_version,
            method=method,
            action=action,
            cab=cab,
            reasons=tuple(reasons),
            notes=tuple(notes),
        )

    host_info = matrix.host(host)
    if guest.key is None:
        reasons.append(guest.reason or "the guest could not be identified")
        return done(UNSUPPORTED, NONE)
    row = matrix.row(host, guest.key)
    if row is None:
        if guest.key in NEWER_THAN_MATRIX:
            reasons.append(
                f"{guest.key} is newer than revision '{matrix.revision}' of the matrix, which does not list it; "
                "no method is assumed"
            )
        else:
            reasons.append(f"{guest.key} is not supported on a {host_info.name} host (matrix revision '{matrix.revision}')")
        return done(UNSUPPORTED, NONE)
    if row.note:
        notes.append(row.note)
    if row.min_service_pack and guest.service_pack < row.min_service_pack:
        have = f"Service Pack {guest.service_pack}" if guest.service_pack else "no service pack"
        reasons.append(f"{guest.key} needs Service Pack {row.min_service_pack} on this host; the guest has {have}")
        return done(UNSUPPORTED, NONE)

    if row.method == PACKAGE_MANAGER:
        return _linux(inspection, reasons, notes, done)

    if row.method == WINDOWS_UPDATE:
        if row.requires_data_exchange:
            state = _data_exchange_state(inspection)
            if state is not None:
                reasons.append(f"Windows Update needs the Data Exchange service, which {state} in the image")
                return _with_cab(KB3071740, guest, ic_version, catalog, reasons, notes, done)
        reasons.append(f"on a {host_info.name} host, {guest.key} gets integration services from Windows Update")
        return done(WINDOWS_UPDATE, NONE)

    # Integration services disk.
    if guest.nt in ("5.1", "5.2"):
        reasons.append(f"{guest.key} installs integration services from an MSI (setup.exe on the disk), not a cab")
        return done(IC_DISK, MANUAL)
    return _with_cab(IC_DISK, guest, ic_version, catalog, reasons, notes, done)


def host_of(inspection: Inspection, matrix: Matrix) -> str:
    """The matrix host key of the host the guest last ran on (``--host auto``), or UnknownKey saying why not."""
    path = inspection.image.path
    ic = inspection.guest.integration_services
    last = ic.last_host if ic else None
    if last is None:
        raise UnknownKey(
            path,
            "--host auto: the guest never recorded the host it ran on (no data-exchange Guest\\Parameters)",
            "give the host with --host win8, win8.1 or win10",
        )
    if last.host_key is None or last.host_key not in {h.key for h in matrix.hosts}:
        on = f" ({last.name})" if last.name else ""
        raise UnknownKey(
            path,
            f"--host auto: the guest last ran on a Windows {last.os_version or '?'} host{on}, "
            f"which revision '{matrix.revision}' of the matrix has no table for",
            "give the host with --host win8, win8.1 or win10",
        )
    return last.host_key


def plan_for_host(
    inspection: Inspection, host: str | None, catalog: CabCatalog | None = None, matrix: Matrix | None = None
) -> Plan:
    """``plan`` on ``host``, or on the host the guest last ran on when ``host`` is None (``--host auto``)."""
    require_guest(inspection)  # a data disk has nothing to plan for
    matrix = matrix or load_matrix()
    if host is None and inspection.guest.os == "linux":
        # A Linux guest records no host, and needs none: its answer is the same on every host.
        p = plan(inspection, matrix.hosts[-1].key, catalog, matrix)
        return replace(p, host=None, reasons=p.reasons + (
            "--host auto: a Linux guest records no host; the answer is the same on every host",))
    return plan(inspection, host if host is not None else host_of(inspection, matrix), catalog, matrix)


def write_refusals(inspection: Inspection) -> list[str]:
    """Why the write engine would refuse to stage into this guest, read from the inspection alone."""
    w = inspection.guest.windows
    lx = inspection.guest.linux
    if w is None and lx is not None and lx.filesystem not in ("ext2", "ext3", "ext4"):
        return [f"its root filesystem is {lx.filesystem}, which vhdtool does not write (ext2/3/4 only): "
                "install the packages in the guest"]
    if w is None:
        return []
    out = []
    if w.hibernated:
        out.append("the guest is hibernated (boot it and shut it down, Fast Startup off)")
    if not w.ntfs_clean:
        out.append("its system volume was not shut down cleanly")
    if not w.drive_letter:
        out.append("MountedDevices names no drive letter for its system volume")
    for name, state in w.hives:
        if state.dirty and not state.replayed:
            out.append(f"the {name} hive is dirty and its logs cannot be replayed ({state.replay_problem}); "
                       "boot the guest once so that Windows recovers it")
    return out


def dirty_hive_notes(inspection: Inspection, staging: bool) -> list[str]:
    """What a dirty hive means for this plan: read as Windows will see it, or read stale from its primary file."""
    w = inspection.guest.windows
    notes = []
    for name, state in w.hives if w is not None else ():
        if not state.dirty:
            continue
        if state.replayed:
            entries = f"{state.entries_applied} log {'entry' if state.entries_applied == 1 else 'entries'}"
            lead = "stage replays its logs first, and" if staging else "Windows replays its logs at boot, and"
            notes.append(f"the {name} hive is dirty: {lead} this plan read it that way ({entries} replayed)")
        else:
            # stage's refusal itself is in write_refusals; this says what the plan's answer rests on.
            notes.append(f"the {name} hive is dirty and its logs cannot be replayed: this plan read the "
                         "primary file's values, which may be older than what Windows will see at boot")
    return notes


def _linux(inspection: Inspection, reasons: list[str], notes: list[str], done) -> Plan:
    """Linux guests get the drivers from their kernel and the daemons from a package, staged when missing."""
    from vhdtool.plan.packages import NoPackage, choose_packages  # with guest.linux: a Windows plan does without

    facts = inspection.guest.linux
    if facts is None:
        reasons.append("the Linux guest's facts could not be read")
        return done(PACKAGE_MANAGER, NONE)
    choice = choose_packages(facts)
    if dict(facts.hv_modules).get("hv_utils") is False:
        notes.append("no installed kernel has hv_utils (module or built in), which the daemons talk to")
    if isinstance(choice, NoPackage):
        reasons.append(choice.because)
        return done(UP_TO_DATE if choice.up_to_date else PACKAGE_MANAGER, NONE)
    reasons.append(choice.because)
    if choice.note:
        notes.append(choice.note)
    what = " ".join(choice.packages)
    reasons.append(f"{choice.package_manager} installs {what} at next boot, once the network is up")
    return replace(done(PACKAGE_MANAGER, STAGE), packages=choice.packages,
                   package_manager=choice.package_manager, units=choice.units)


def _data_exchange_state(inspection: Inspection) -> str | None:
    """Why Data Exchange cannot run in the guest, or None when it can."""
    ic = inspection.guest.integration_services
    services = {s.name: s for s in ic.services} if ic else {}
    svc = services.get(DATA_EXCHANGE_SERVICE)
    if svc is None:
        return f"is not installed ({DATA_EXCHANGE_SERVICE} is missing)"
    if svc.start_value == DISABLED:
        return f"is disabled ({DATA_EXCHANGE_SERVICE} Start=4)"
    return None


def signature_refusal(c: CabCandidate, require_signed: bool) -> str | None:
    """Why ``c``'s signature keeps it from being chosen, or None: an invalid one never is; an unsigned or
    untrusted one only without --require-signed."""
    if c.signature == INVALID:
        return f"its signature is invalid: {c.signature_reason}"
    if require_signed and c.signature in (UNSIGNED, UNTRUSTED):
        return f"--require-signed, and it is {c.signature} ({c.signature_reason})"
    return None


def _with_cab(method, guest, ic_version, catalog: CabCatalog, reasons: list[str], notes: list[str], done) -> Plan:
    """Choose the newest cab that fits the guest exactly and whose signature allows it; never one for another guest."""
    fitting, refused, unsigned = [], [], []
    for c in catalog.candidates:
        if c.problem:
            refused.append(f"{c.path}: {c.problem}")
        elif c.arch != guest.arch:
            refused.append(f"{c.path}: for {c.arch}, the guest is {guest.arch}")
        elif c.nt != guest.nt:
            refused.append(f"{c.path}: for NT {c.nt}, the guest is NT {guest.nt}")
        elif signature_refusal(c, catalog.require_signed):
            refused.append(f"{c.path}: {signature_refusal(c, catalog.require_signed)}")
            unsigned.append(refused[-1])
        else:
            fitting.append(c)
    what = "the KB3071740 cab" if method == KB3071740 else "the integration services disk"
    if not fitting:
        if not catalog.sources:
            reasons.append(f"{guest.key} ({guest.arch}) needs {what}; no cab source was given (--cabs)")
        else:
            reasons.append(
                f"no cab in the sources fits {guest.key} {guest.arch} (NT {guest.nt})"
                + (": " + "; ".join(refused) if refused else "")
            )
        return done(method, MANUAL)
    notes.extend(f"not chosen: {why}" for why in unsigned)
    best = max(fitting, key=lambda c: (version_tuple(c.version), SIGNATURE_PREFERENCE.get(c.signature, 0)))
    if ic_version and version_tuple(best.version) <= version_tuple(ic_version):
        reasons.append(
            f"the guest's integration services ({ic_version}) are not older than {best.name} ({best.version})"
        )
        return done(UP_TO_DATE, NONE, best)
    if ic_version:
        reasons.append(f"{best.name} {best.version} is newer than the guest's {ic_version}")
    else:
        reasons.append(f"the guest's integration services version is unknown; {best.name} {best.version} fits it")
    reasons.append(f"{what}: {best.name} ({best.arch}, NT {best.nt}) will install at next boot")
    if best.signature in (UNSIGNED, UNTRUSTED):
        notes.append(f"warning: {best.name} is {best.signature} ({best.signature_reason}); stage it only if you trust "
                     "where it came from (with --require-signed it is not chosen)")
    return done(method, STAGE, best)
