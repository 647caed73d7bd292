"""The plan for Linux guests (plan/packages.py through plan()): which package installs the daemons, with what.

Pure: facts are built here, as inspect reports them. The package names are Ubuntu's and the
distributions' own: linux-cloud-tools-<flavour> (the flavour metapackages Ubuntu's own
/usr/sbin/hv_kvp_daemon wrapper names when the tools are missing) and hyperv-daemons (Debian,
RHEL family). Every name the plan returns must also be accepted by the script generator.
"""

from __future__ import annotations

import pytest

from vhdtool.cli.render import render_plan
from vhdtool.guest.inspection import GuestInfo, ImageInfo, Inspection
from vhdtool.guest.linux import HV_MODULES, LinuxFacts
from vhdtool.plan.decide import plan, plan_for_host
from vhdtool.stage.linux_script import LinuxStagedScript, install_id

NO_DAEMONS = (("hv_kvp_daemon", False), ("hv_vss_daemon", False), ("hv_fcopy_daemon", False))
ALL_DAEMONS = (("hv_kvp_daemon", True), ("hv_vss_daemon", True), ("hv_fcopy_daemon", True))
UBUNTU_UNITS = ["hv-kvp-daemon.service", "hv-vss-daemon.service", "hv-fcopy-daemon.service"]
DEBIAN_UNITS = ["hyperv-daemons.hv-kvp-daemon.service", "hyperv-daemons.hv-vss-daemon.service",
                "hyperv-daemons.hv-fcopy-daemon.service"]


def guest(distribution, version, kernels=("5.15.0-91-generic",), daemons=NO_DAEMONS, id_like=(), hv_utils=True,
          filesystem="ext4"):
    modules = tuple((m, hv_utils if m == "hv_utils" else True) for m in HV_MODULES)
    lx = LinuxFacts(distribution, version, None, tuple(kernels), modules, daemons, 1, filesystem, id_like=tuple(id_like))
    image = ImageInfo("/images/vm.vhdx", "vhdx", 1 << 30, 1 << 25, 512, 4096, False, None, False)
    return Inspection(image, (), GuestInfo("linux", linux=lx))


def staged(p):
    """The plan is a stage, and the generator takes what it names."""
    assert (p.method, p.action, p.cab) == ("package-manager", "stage", None)
    LinuxStagedScript(install_id(p.packages), p.package_manager, p.packages, p.units)
    return p.package_manager, list(p.packages), list(p.units)


@pytest.mark.parametrize("kernels, newest, package", [
    (("5.15.0-91-generic",), "5.15.0-91-generic", "linux-cloud-tools-generic"),
    (("6.5.0-1015-azure",), "6.5.0-1015-azure", "linux-cloud-tools-azure"),
    (("5.15.0-1051-aws",), "5.15.0-1051-aws", "linux-cloud-tools-aws"),
    (("6.8.0-31-lowlatency",), "6.8.0-31-lowlatency", "linux-cloud-tools-lowlatency"),
    (("5.4.0-1100-azure-fips",), "5.4.0-1100-azure-fips", "linux-cloud-tools-azure-fips"),
    # The newest by version order, whatever order they are given in: 6.5 > 5.15, 101 > 91.
    (("6.5.0-14-lowlatency", "5.15.0-91-generic"), "6.5.0-14-lowlatency", "linux-cloud-tools-lowlatency"),
    (("5.15.0-101-azure", "5.15.0-91-generic"), "5.15.0-101-azure", "linux-cloud-tools-azure"),
    (("5.15.0-91-generic", "5.15.0-101-azure"), "5.15.0-101-azure", "linux-cloud-tools-azure"),
])
def test_ubuntu_takes_the_newest_kernels_flavour(kernels, newest, package):
    p = plan(guest("ubuntu", "22.04", kernels), "win10")
    assert staged(p) == ("apt", [package], UBUNTU_UNITS)
    assert any(package in r and newest in r for r in p.reasons)
    # The metapackage follows the archive's newest kernel; the note names the installed one's tools.
    assert any(f"linux-cloud-tools-{newest} " in n for n in p.notes)


@pytest.mark.parametrize("distribution, version", [("linuxmint", "21.3"), ("elementary", "7")])
def test_a_derivative_of_ubuntu_by_id_like(distribution, version):
    """Its VERSION_ID is its own numbering (elementary OS 7 is Ubuntu 22.04), not Ubuntu's."""
    p = plan(guest(distribution, version, id_like=("ubuntu", "debian")), "win10")
    assert staged(p)[:2] == ("apt", ["linux-cloud-tools-generic"])


@pytest.mark.parametrize("kernels", [(), ("5.15.0",), ("5.15.0-91",), ("5.15.0-91-generic;reboot",),
                                     ("5.15.0-91-Generic",), ("5.15.0-91-generic\n",), ("5.15.0-91-$(id)",),
                                     ("5.15.0-91-generic", "6.1.0-custom")])
def test_ubuntu_without_a_flavour_it_can_name_is_not_staged(kernels):
    p = plan(guest("ubuntu", "22.04", kernels), "win10")
    assert (p.method, p.action, p.packages, p.package_manager) == ("package-manager", "none", (), None)
    assert len(p.reasons) == 1 and "linux-cloud-tools" in p.reasons[0]


@pytest.mark.parametrize("missing", ["hv_kvp_daemon", "hv_vss_daemon"])
def test_one_missing_daemon_is_enough(missing):
    daemons = tuple((d, d != missing) for d, _ in ALL_DAEMONS)
    p = plan(guest("debian", "12", daemons=daemons), "win10")
    assert staged(p) == ("apt", ["hyperv-daemons"], DEBIAN_UNITS)
    assert p.reasons[0].startswith(f"{missing} is missing")


def test_fcopy_alone_does_not_decide():
    daemons = (("hv_kvp_daemon", True), ("hv_vss_daemon", True), ("hv_fcopy_daemon", False))
    p = plan(guest("ubuntu", "22.04", daemons=daemons), "win10")
    assert (p.method, p.action, p.packages) == ("up-to-date", "none", ())
    assert "installed" in p.reasons[0]


@pytest.mark.parametrize("distribution, version, id_like, manager", [
    ("rhel", "9.3", ("fedora",), "dnf"),
    ("rhel", "7.9", ("fedora",), "yum"),
    ("centos", "7", ("rhel", "fedora"), "yum"),
    ("centos", "8", ("rhel", "fedora"), "dnf"),
    ("rocky", "8.9", ("rhel", "centos", "fedora"), "dnf"),
    ("almalinux", "9.3", ("rhel", "centos", "fedora"), "dnf"),
    ("ol", "7.9", (), "yum"),
    ("ol", "8.9", (), "dnf"),
    ("fedora", "39", (), "dnf"),
    ("eurolinux", "9.2", ("rhel", "fedora", "centos"), "dnf"),  # known only by ID_LIKE
])
def test_rhel_family(distribution, version, id_like, manager):
    p = plan(guest(distribution, version, ("5.14.0-362.el9.x86_64",), id_like=id_like), "win8.1")
    assert staged(p) == (manager, ["hyperv-daemons"], [])  # udev starts the daemons: no unit to enable
    assert any(manager in r for r in p.reasons)


@pytest.mark.parametrize("distribution, version", [("debian", "12"), ("debian", "8"), ("debian", None)])
def test_debian(distribution, version):
    assert staged(plan(guest(distribution, version, ("6.1.0-18-amd64",)), "win10")) == \
        ("apt", ["hyperv-daemons"], DEBIAN_UNITS)


@pytest.mark.parametrize("distribution, version, id_like", [
    ("ubuntu", "14.04", ()), ("debian", "7", ()), ("centos", "6.10", ("rhel", "fedora")), ("fedora", "14", ()),
])
def test_releases_without_systemd_are_not_staged(distribution, version, id_like):
    p = plan(guest(distribution, version, id_like=id_like), "win10")
    assert (p.method, p.action, p.packages) == ("package-manager", "none", ())
    assert "systemd" in p.reasons[0]


@pytest.mark.parametrize("distribution, id_like", [
    ("arch", ()), ("alpine", ()), ("opensuse-leap", ("suse", "opensuse")), (None, ()), ("ubuntu;reboot", ()),
])
def test_unknown_distributions_are_not_staged(distribution, id_like):
    p = plan(guest(distribution, "1", id_like=id_like), "win10")
    assert (p.method, p.action, p.packages, p.package_manager, p.units) == ("package-manager", "none", (), None, ())
    assert f"'{distribution or 'unknown'}'" in p.reasons[0]


def test_daemons_present_is_up_to_date():
    p = plan(guest("ubuntu", "22.04", daemons=ALL_DAEMONS), "win10")
    assert (p.method, p.action, p.packages) == ("up-to-date", "none", ())


def test_a_kernel_without_hv_utils_is_noted():
    p = plan(guest("debian", "12", hv_utils=False), "win10")
    assert p.action == "stage" and any("hv_utils" in n for n in p.notes)
    assert not any("hv_utils" in n for n in plan(guest("debian", "12"), "win10").notes)


def test_the_answer_is_the_same_on_every_host_and_with_host_auto():
    g = guest("ubuntu", "22.04")
    answers = {(p.method, p.action, p.packages, p.package_manager, p.units)
               for p in [plan(g, h) for h in ("win8", "win8.1", "win10")] + [plan_for_host(g, None)]}
    assert len(answers) == 1
    assert plan_for_host(g, None).host is None


def test_json_and_text():
    p = plan(guest("ubuntu", "22.04"), "win10")
    d = p.to_dict()
    assert (d["packages"], d["package_manager"], d["units"]) == (["linux-cloud-tools-generic"], "apt", UBUNTU_UNITS)
    assert d["action"] == "stage" and d["cab"] is None
    text = render_plan(p)
    assert "  packages   linux-cloud-tools-generic (with apt)" in text
    assert "  enables    " + " ".join(UBUNTU_UNITS) in text
    none = plan(guest("arch", None), "win10")
    assert (none.to_dict()["packages"], none.to_dict()["package_manager"]) == ([], None)
    assert "packages" not in render_plan(none)


def test_stage_on_an_xfs_root_is_noted_as_refused():
    """The plan still names the package; its notes say that stage will not write an XFS root (exit 5)."""
    p = plan(guest("rhel", "9.3", daemons=NO_DAEMONS, filesystem="xfs"), "win10")
    assert staged(p)[1] == ["hyperv-daemons"]
    assert "stage would refuse this image: its root filesystem is xfs, which vhdtool does not write" in " ".join(p.notes)
    assert not any("stage would refuse" in n for n in plan(guest("rhel", "9.3"), "win10").notes)
