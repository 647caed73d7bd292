"""libguestfs for the benchmarks' comparisons: whether its appliance starts here, and how.

On a machine whose KVM cannot run libguestfs's qemu (here: it aborts setting an MSR),
the appliance still starts under TCG, software emulation, slower: ``setup()`` finds
that out once and sets LIBGUESTFS_BACKEND_SETTINGS=force_tcg for this process's
children.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

GUESTFS_TOOLS = ("virt-inspector", "virt-copy-in", "virt-customize", "virt-win-reg")


def sh(*cmd: str) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def setup() -> tuple[bool, str]:
    """Whether libguestfs can be used here, and a line saying how (or why not).

    Launches the appliance once (``guestfish -a /dev/null run``); if that fails as it is
    set up, tries again with TCG (LIBGUESTFS_BACKEND_SETTINGS=force_tcg, set for this run's
    children), as on a machine whose KVM cannot run libguestfs's qemu."""
    missing = [t for t in GUESTFS_TOOLS if not shutil.which(t)]
    if missing:
        return False, f"not installed ({', '.join(missing)} missing): no comparison with it"
    if not shutil.which("guestfish"):
        return False, "guestfish missing: cannot check that its appliance starts"
    tries = [None] if os.environ.get("LIBGUESTFS_BACKEND_SETTINGS") else [None, "force_tcg"]
    why = ""
    for setting in tries:
        env = dict(os.environ)
        if setting:
            env["LIBGUESTFS_BACKEND_SETTINGS"] = setting
        t0 = time.perf_counter()
        try:
            res = subprocess.run(["guestfish", "-a", "/dev/null", "run"], capture_output=True, text=True, timeout=180,
                                 env=env)
        except subprocess.TimeoutExpired:
            why = "its appliance did not start within 180 s"
            continue
        wall = time.perf_counter() - t0
        if res.returncode == 0:
            if setting:
                os.environ["LIBGUESTFS_BACKEND_SETTINGS"] = setting
            how = ("TCG, software emulation: KVM failed to start its qemu" if setting else
                   f"as set up ({os.environ.get('LIBGUESTFS_BACKEND_SETTINGS') or 'KVM where it can'})")
            version = sh("guestfish", "--version")
            return True, f"{version}; appliance launch {wall:.1f} s, {how}"
        lines = [l for l in res.stderr.splitlines() if l.strip()]
        why = lines[-1][:160] if lines else f"exit {res.returncode}"
    return False, f"installed, but its appliance does not start here ({why}): no comparison with it"
