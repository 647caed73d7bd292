"""A Windows staging's state: what install.cmd's result.txt says, cross-checked with Windows' own record (CBS).

Pure. The inputs: the state the staging's files give (``status.parse_state``: pending, running,
installed for exit code 0 or 3010, failed), the package's CBS record (``guest.cbs.CbsPackage``:
its CurrentState, or its key absent, or its identity unknown for a staging made before stage
recorded it), the machine-wide RebootPending/PackagesPending keys, and the integration services
version the guest recorded. The rules, in order (the README's status table says the same):

1. The package's CBS state is Installed, Permanent or Superseded ("CBS says installed") while
   result.txt does not say success (pending, running, failed): ``inconsistent``.
2. Otherwise pending, running and failed stay as they are.
3. result.txt says success, and RebootPending or PackagesPending exists, or CBS says Install
   Pending: ``reboot-pending`` (Windows finishes servicing at the next restart).
4. CBS says installed, or the package is an integration services package (or of unknown identity)
   and the guest's recorded IC version is at least its version: ``installed``.
5. Identity unknown (an older staging): ``reboot-pending`` after exit code 3010, else ``installed``
   (result.txt alone, as before).
6. Exit code 3010 and the package's key present in another state (Partially Installed, Staged...):
   ``reboot-pending``.
7. Otherwise (success, but CBS has no such package, or holds it Staged, Resolved, Partially
   Installed or Uninstall Pending after exit code 0): ``inconsistent``.
"""

from __future__ import annotations

from vhdtool.guest.cbs import INSTALL_PENDING, INSTALLED, PERMANENT, SUPERSEDED, CbsPackage, ServicingState
from vhdtool.guest.versioninfo import version_tuple
from vhdtool.guest.windows import IC_PACKAGE

CBS_SAYS_INSTALLED = (INSTALLED, PERMANENT, SUPERSEDED)
REBOOT_CODE = 3010
STATES = ("none", "pending", "running", "installed", "reboot-pending", "failed", "inconsistent")


def ic_covers(package: CbsPackage, staged_version: str, ic_version: str | None) -> bool:
    """Whether the guest's recorded IC version shows this package (or a newer one) in effect.

    Only for integration services packages (and stagings of unknown identity, which vhdtool makes only
    from IC cabs and KB3071740, whose version is below any IC version): another package's version says
    nothing about the ICs.
    """
    if ic_version is None:
        return False
    if package.identity is None:
        return version_tuple(ic_version) >= version_tuple(staged_version)
    # The IC package names inspect counts (guest.windows), whose version is the IC version the guest reports.
    m = IC_PACKAGE.match(package.identity)
    return m is not None and version_tuple(ic_version) >= version_tuple(m.group(3))


def crosscheck(result_state: str, exit_code: int | None, package: CbsPackage, servicing: ServicingState,
               covered: bool) -> str:
    """The staging's state from its result (``parse_state``'s state) and Windows' record (``covered``: ``ic_covers``)."""
    cbs_installed = package.present and package.current_state in CBS_SAYS_INSTALLED
    if result_state != "installed":
        return "inconsistent" if cbs_installed else result_state
    if servicing.restart_needed or (package.present and package.current_state == INSTALL_PENDING):
        return "reboot-pending"
    if cbs_installed or covered:
        return "installed"
    if package.identity is None:
        return "reboot-pending" if exit_code == REBOOT_CODE else "installed"
    if exit_code == REBOOT_CODE and package.present:
        return "reboot-pending"
    return "inconsistent"
