"""Which row of the matrix a guest is: its key ("server-2008r2", "windows-7", "linux"...).

From the inspected facts alone: NT version, build, client or server, and the product
name for the NT 6.1 server family members that have rows of their own (Small
Business Server 2011, Home Server 2011) and for Server 2003 R2. Guests newer than
the matrix (Windows 11, Server 2019 and later) get keys of their own that no table
lists, so the plan can say so instead of guessing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vhdtool.guest.inspection import Inspection

# NT 10 server builds: LTSC releases by build; the rest are Semi-Annual Channel.
SERVER_LTSC_BUILDS = {14393: "server-2016", 17763: "server-2019", 20348: "server-2022", 26100: "server-2025"}
SERVER_SAC_BUILDS = {16299, 17134, 18362, 18363, 19041, 19042}
WINDOWS_11_FIRST_BUILD = 22000
NEWER_THAN_MATRIX = {"server-2019", "server-2022", "server-2025", "server-newer", "windows-11"}


@dataclass(frozen=True)
class GuestIdentity:
    key: str | None
    nt: str | None  # "6.1"
    arch: str | None  # "x64", "x86", "arm64"
    service_pack: int  # 0 when none
    reason: str | None  # why there is no key


def service_pack_number(text: str | None) -> int:
    m = re.search(r"Service Pack (\d+)", text or "", re.IGNORECASE)
    return int(m.group(1)) if m else 0


def identify(inspection: Inspection) -> GuestIdentity:
    g = inspection.guest
    if g.os == "linux":
        return GuestIdentity("linux", None, None, 0, None)
    w = g.windows
    if g.os != "windows" or w is None:
        return GuestIdentity(None, None, None, 0, "no guest operating system was found")
    sp = service_pack_number(w.service_pack)
    nt = w.version
    server = (w.installation_type or "").lower().startswith("server") or "server" in (w.product_name or "").lower()
    product = (w.product_name or "").lower()
    key = None
    if nt == "10.0":
        build = w.build or 0
        if server:
            key = SERVER_LTSC_BUILDS.get(build) or ("server-sac" if build in SERVER_SAC_BUILDS else None)
            if key is None and build > max(SERVER_LTSC_BUILDS):
                key = "server-newer"
        else:
            key = "windows-11" if build >= WINDOWS_11_FIRST_BUILD else "windows-10"
    elif nt == "6.3":
        key = "server-2012r2" if server else "windows-8.1"
    elif nt == "6.2":
        key = "server-2012" if server else "windows-8"
    elif nt == "6.1":
        if "small business" in product:
            key = "sbs-2011"
        elif "home server" in product:
            key = "home-server-2011"
        else:
            key = "server-2008r2" if server else "windows-7"
    elif nt == "6.0":
        key = "server-2008" if server else "windows-vista"
    elif nt == "5.1":
        key = "windows-xp"
    elif nt == "5.2":
        if "xp" in product:
            key = "windows-xp"
        else:
            key = "server-2003r2" if "r2" in product else "server-2003"
    reason = None if key else f"unrecognised Windows version {nt} build {w.build} ({w.product_name})"
    return GuestIdentity(key, nt, w.arch, sp, reason)
