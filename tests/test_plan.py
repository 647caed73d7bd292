"""plan() is a pure function of the inspection, the host, the matrix and the cabs: every cell, no images."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from vhdtool.guest.inspection import GuestInfo, ImageInfo, Inspection
from vhdtool.guest.linux import LinuxFacts
from vhdtool.guest.windows import IcService, IntegrationServices, WindowsFacts
from vhdtool.plan.decide import plan
from vhdtool.plan.guestkey import identify
from vhdtool.plan.matrix import UnknownKey, load_matrix
from vhdtool.plan.sources import CabCandidate, CabCatalog

# Independent transcription of the matrix, written as the document reads.
WIN10_TEXT = """
windows-10 windows-update -
windows-8.1 windows-update -
windows-8 windows-update DE
windows-7 windows-update DE
windows-vista windows-update DE SP2
server-2016 windows-update -
server-sac windows-update -
server-2012r2 windows-update -
server-2012 windows-update DE
server-2008r2 windows-update DE SP1
server-2008 windows-update - SP2
home-server-2011 windows-update -
sbs-2011 windows-update -
linux package-manager -
"""
OLDER_DISK = """
windows-8 integration-services-disk -
windows-7 integration-services-disk -
windows-vista integration-services-disk - SP2
windows-xp integration-services-disk - SP2
server-2012 integration-services-disk -
server-2008r2 integration-services-disk -
server-2008 integration-services-disk - SP2
home-server-2011 integration-services-disk -
sbs-2011 integration-services-disk -
server-2003r2 integration-services-disk - SP2
server-2003 integration-services-disk - SP2
linux package-manager -
"""
WIN81_TEXT = """
windows-10 windows-update -
windows-8.1 windows-update -
server-2016 windows-update -
server-sac windows-update -
server-2012r2 windows-update -
""" + OLDER_DISK
WIN8_TEXT = """
windows-8.1 windows-update -
server-2012r2 windows-update -
""" + OLDER_DISK
TRANSCRIPTION = {"win10": WIN10_TEXT, "win8.1": WIN81_TEXT, "win8": WIN8_TEXT}


def transcribed(host: str) -> dict[str, tuple[str, bool, int | None]]:
    out = {}
    for line in TRANSCRIPTION[host].strip().splitlines():
        parts = line.split()
        if not parts:
            continue
        sp = int(parts[3][2:]) if len(parts) > 3 else None
        out[parts[0]] = (parts[1], parts[2] == "DE", sp)
    return out


@pytest.mark.parametrize("host", ["win8", "win8.1", "win10"])
def test_matrix_json_matches_the_transcription(host):
    code, out, err = run_cli("matrix", "--json", "--host", host)
    assert code == 0, err
    rows = json.loads(out)
    assert all(set(r) == {"host", "guest", "method", "requires_data_exchange", "min_service_pack", "note"} for r in rows)
    got = {r["guest"]: (r["method"], r["requires_data_exchange"], r["min_service_pack"]) for r in rows if r["host"] == host}
    assert got == transcribed(host)


def test_matrix_notes_and_revisions():
    m = load_matrix()
    assert m.row("win10", "server-2008").note == "extended support only, in Server 2016"
    assert m.row("win10", "home-server-2011").note == "not supported in Server 2016"
    assert m.row("win10", "sbs-2011").note == "not in mainstream support"
    assert m.host("win10").vmguest_iso is False
    later = load_matrix("later")
    for host in ("win8", "win8.1"):
        for guest in ("windows-8.1", "server-2012r2"):
            assert later.row(host, guest).method == "integration-services-disk"
            assert m.row(host, guest).method == "windows-update"
    with pytest.raises(UnknownKey):
        load_matrix("nope")


@pytest.mark.parametrize("alias,key", [("2012", "win8"), ("2012r2", "win8.1"), ("2016", "win10"), ("2019", "win10"), ("Win8.1", "win8.1"), ("10", "win10")])
def test_host_aliases(alias, key):
    assert load_matrix().resolve_host(alias) == key


def test_unknown_host_is_a_clean_error(cli):
    code, out, err = cli("matrix", "--host", "hyperv-2008")
    assert code == 11 and "unknown host 'hyperv-2008'" in err and "Traceback" not in err


# -- synthetic inspections -----------------------------------------------------------------------
GUESTS = {
    "windows-10": ("Windows 10 Pro", "10.0", 19045, "Client"),
    "windows-8.1": ("Windows 8.1 Pro", "6.3", 9600, "Client"),
    "windows-8": ("Windows 8 Pro", "6.2", 9200, "Client"),
    "windows-7": ("Windows 7 Professional", "6.1", 7601, "Client"),
    "windows-vista": ("Windows Vista (TM) Business", "6.0", 6002, "Client"),
    "windows-xp": ("Microsoft Windows XP", "5.1", 2600, None),
    "server-2016": ("Windows Server 2016 Datacenter", "10.0", 14393, "Server"),
    "server-sac": ("Windows Server Datacenter", "10.0", 19042, "Server Core"),
    "server-2012r2": ("Windows Server 2012 R2 Standard", "6.3", 9600, "Server"),
    "server-2012": ("Windows Server 2012 Standard", "6.2", 9200, "Server"),
    "server-2008r2": ("Windows Server 2008 R2 Enterprise", "6.1", 7601, "Server"),
    "server-2008": ("Windows Server (R) 2008 Standard", "6.0", 6002, "Server"),
    "home-server-2011": ("Windows Home Server 2011", "6.1", 7601, "Server"),
    "sbs-2011": ("Windows Small Business Server 2011 Standard", "6.1", 7601, "Server"),
    "server-2003r2": ("Microsoft Windows Server 2003 R2", "5.2", 3790, None),
    "server-2003": ("Microsoft Windows Server 2003", "5.2", 3790, None),
    "server-2019": ("Windows Server 2019 Datacenter", "10.0", 17763, "Server"),
    "windows-11": ("Windows 10 Pro", "10.0", 22631, "Client"),  # Windows 11 keeps "Windows 10" in ProductName
}


def windows(key, sp=None, arch="x64", ic="6.0.6001.18016", kvp_start=3, product_type="Server"):
    product, version, build, itype = GUESTS[key]
    services = () if kvp_start is None else (IcService("vmickvpexchange", {2: "automatic", 3: "manual", 4: "disabled"}[kvp_start], kvp_start),)
    w = WindowsFacts(product, version, build, None, f"Service Pack {sp}" if sp else None, "X", itype or ("Server" if "Server" in product else "Client"),
                     arch, 1, "C", 1, False, False, True, False, True, False, ())
    return Inspection(_image(), (), GuestInfo("windows", w, IntegrationServices(ic, "kvp" if ic else None, services)))


def linux():
    """Ubuntu without the Hyper-V daemons: the package manager installs them (tests/test_plan_linux.py has the rest)."""
    daemons = (("hv_kvp_daemon", False), ("hv_vss_daemon", False), ("hv_fcopy_daemon", False))
    lx = LinuxFacts("ubuntu", "22.04", "Ubuntu", ("5.15.0-91-generic",), (), daemons, 1, "ext4", ("debian",))
    return Inspection(_image(), (), GuestInfo("linux", linux=lx))


def _image():
    return ImageInfo("/images/vm.vhdx", "vhdx", 1 << 30, 1 << 25, 512, 4096, False, None, False)


def cab(nt, arch, version, name=None, problem=None):
    name = name or f"Windows{nt}-HyperVIntegrationServices-{arch}.cab"
    return CabCandidate(f"/iso:/support/{name}", "/iso", name, version, arch, nt, "ab" * 32, "Package", None, problem)


NT = {k: v[1] for k, v in GUESTS.items()}


@pytest.mark.parametrize("key", sorted(GUESTS))
def test_guest_keys(key):
    assert identify(windows(key)).key == key


def test_linux_key():
    assert identify(linux()).key == "linux"


CELLS = [(host, r) for host in ("win8", "win8.1", "win10") for r in load_matrix().table(host)]


@pytest.mark.parametrize("host,row", CELLS, ids=[f"{h}-{r.guest}" for h, r in CELLS])
def test_every_cell(host, row):
    if row.guest == "linux":
        p = plan(linux(), host)
        assert (p.method, p.action, p.cab) == ("package-manager", "stage", None)
        assert (p.packages, p.package_manager) == (("linux-cloud-tools-generic",), "apt")
        return
    nt = NT[row.guest]
    fitting = CabCatalog((cab(nt, "x64", "9.9.9999.1"), cab(nt, "x86", "9.9.9999.1")), (), ("/iso",))
    inspection = windows(row.guest, sp=row.min_service_pack)
    p = plan(inspection, host, fitting)
    assert p.guest_key == row.guest
    if row.method == "windows-update":
        assert (p.method, p.action, p.cab) == ("windows-update", "none", None), p
    elif nt.startswith("5."):
        assert (p.method, p.action, p.cab) == ("integration-services-disk", "manual", None), p
        assert any("MSI" in r for r in p.reasons)
    else:
        assert (p.method, p.action) == ("integration-services-disk", "stage"), p
        assert (p.cab.nt, p.cab.arch) == (nt, "x64")
        # The same guest with no source: manual, saying what it needs.
        p2 = plan(inspection, host, CabCatalog((), (), ()))
        assert (p2.method, p2.action) == ("integration-services-disk", "manual")
    if row.min_service_pack:
        below = plan(windows(row.guest, sp=row.min_service_pack - 1 or None), host, fitting)
        assert (below.method, below.action) == ("unsupported", "none")
        assert any(f"Service Pack {row.min_service_pack}" in r for r in below.reasons)
    if row.requires_data_exchange:
        off = plan(windows(row.guest, sp=row.min_service_pack, kvp_start=4), host, fitting)
        assert (off.method, off.action) == ("kb3071740-cab", "stage"), off
        assert any("Data Exchange" in r for r in off.reasons)
        none = plan(windows(row.guest, sp=row.min_service_pack, kvp_start=4), host, CabCatalog((), (), ()))
        assert (none.method, none.action) == ("kb3071740-cab", "manual")


@pytest.mark.parametrize("host", ["win8", "win8.1", "win10"])
def test_guests_a_table_does_not_list_are_unsupported(host):
    listed = {r.guest for r in load_matrix().table(host)}
    for key in sorted(set(GUESTS) - listed - {"server-2019", "windows-11"}):
        p = plan(windows(key, sp=2), host)
        assert (p.method, p.action) == ("unsupported", "none"), (host, key)
        assert any("not supported" in r for r in p.reasons)


@pytest.mark.parametrize("key", ["server-2019", "windows-11"])
def test_guests_newer_than_the_matrix_say_so(key):
    p = plan(windows(key), "win10")
    assert (p.method, p.action) == ("unsupported", "none")
    assert any("newer than revision" in r for r in p.reasons)


def test_cab_choice_is_exact():
    guest = windows("server-2008r2", sp=1, ic="6.1.7601.17514")
    x86_only = CabCatalog((cab("6.1", "x86", "6.3.9600.16384"),), (), ("/iso",))
    p = plan(guest, "win8", x86_only)
    assert (p.action, p.cab) == ("manual", None)
    assert any("x86" in r and "x64" in r for r in p.reasons)
    wrong_nt = CabCatalog((cab("6.2", "x64", "6.3.9600.16384"),), (), ("/iso",))
    assert plan(guest, "win8", wrong_nt).action == "manual"
    disagreeing = CabCatalog((cab("6.1", "x64", "6.3.9600.16384", problem="its name targets NT 6.1 but its manifest's parent is NT 6.2"),), (), ("/iso",))
    assert plan(guest, "win8", disagreeing).action == "manual"
    older = CabCatalog((cab("6.1", "x64", "6.1.7601.17514"),), (), ("/iso",))
    p = plan(guest, "win8", older)
    assert (p.method, p.action) == ("up-to-date", "none")
    several = CabCatalog((cab("6.1", "x64", "6.2.9200.16384"), cab("6.1", "x64", "6.3.9600.18692"), cab("6.1", "x86", "6.3.9600.99999")), (), ("/iso",))
    p = plan(guest, "win8", several)
    assert (p.action, p.cab.version, p.cab.arch) == ("stage", "6.3.9600.18692", "x64")


def test_plan_lists_the_cabs_it_weighed():
    guest = windows("server-2008r2", sp=1)
    old, new, x86 = cab("6.1", "x64", "6.2.9200.16384"), cab("6.1", "x64", "6.3.9600.18692"), cab("6.1", "x86", "6.3.9600.99999")
    p = plan(guest, "win8", CabCatalog((old, new, x86), (), ("/iso",)))
    got = [(c["version"], c["arch"], c["chosen"], c["not_chosen"]) for c in p.to_dict()["candidates"]]
    assert got == [("6.2.9200.16384", "x64", False, f"{new.path} is newer (6.3.9600.18692)"),
                   ("6.3.9600.18692", "x64", True, None),
                   ("6.3.9600.99999", "x86", False, "for x86, the guest is x64")], got
    # Up to date: the newest fitting cab is still the plan's cab, and the one listed as chosen.
    p = plan(guest, "win8", CabCatalog((cab("6.1", "x64", "6.0.6001.18016"),), (), ("/iso",)))
    assert p.action == "none" and [c["chosen"] for c in p.to_dict()["candidates"]] == [True], p
    # Windows Update: no cab is weighed, whatever the sources hold.
    p = plan(windows("server-2012r2"), "win10", CabCatalog((old,), (), ("/iso",)))
    assert p.method == "windows-update" and p.to_dict()["candidates"] == [], p


def test_plan_to_dict_keys():
    d = plan(windows("server-2012", ic=None), "win8.1", CabCatalog((cab("6.2", "x64", "6.3.9600.16384"),), (), ("/iso",))).to_dict()
    assert {"schema", "image", "host", "guest_key", "arch", "guest_ic_version", "method", "action", "cab", "reasons", "notes"} <= set(d)
    assert set(d["cab"]) >= {"path", "source", "name", "version", "arch", "sha256"}
    assert d["action"] == "stage" and d["guest_ic_version"] is None


# -- --host auto: the host the guest last ran on -------------------------------------------------
def with_last_host(inspection, os_version, name="hv-01.example.test"):
    import dataclasses

    from vhdtool.guest.windows import HOST_KEYS, LastHost

    ic = inspection.guest.integration_services
    last = None if os_version is None else LastHost(name, os_version, 0, HOST_KEYS.get(os_version), "vm1")
    guest = dataclasses.replace(inspection.guest, integration_services=dataclasses.replace(ic, last_host=last))
    return dataclasses.replace(inspection, guest=guest)


def test_guest_host_keys_are_matrix_hosts():
    from vhdtool.guest.windows import HOST_KEYS

    assert set(HOST_KEYS.values()) == {h.key for h in load_matrix().hosts}


@pytest.mark.parametrize("os_version,host", [("6.2", "win8"), ("6.3", "win8.1"), ("10.0", "win10")])
def test_host_auto_uses_the_recorded_host(os_version, host):
    from vhdtool.plan.decide import plan_for_host

    p = plan_for_host(with_last_host(windows("server-2008r2", sp=1), os_version), None)
    assert p.host == host
    assert p.to_dict() == plan(windows("server-2008r2", sp=1), host).to_dict()


@pytest.mark.parametrize("os_version,needle", [(None, "never recorded the host"), ("6.1", "Windows 6.1 host (hv-01.example.test)")])
def test_host_auto_without_a_usable_host(os_version, needle):
    from vhdtool.plan.decide import plan_for_host

    with pytest.raises(UnknownKey) as e:
        plan_for_host(with_last_host(windows("server-2008r2", sp=1), os_version), None)
    assert needle in e.value.message and "--host win8, win8.1 or win10" in e.value.message
    assert e.value.path == "/images/vm.vhdx" and e.value.exit_code == 11
