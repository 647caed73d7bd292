"""The fixture images (fixtures/build/) judged by independent tools.

Every image must be a valid container (qemu-img), carry the partition table its facts
list (sfdisk, blkid), and every fact recorded for it must be read back out of the image
with tools that are not vhdtool: ntfsls/ntfscat/ntfsinfo for NTFS, hivexget/hivexsh for
the hives, debugfs for ext4, xfs_db for XFS, the LVM tools read-only. The code that reads
them is in tests/judges/ and imports neither vhdtool nor the builder. Images are built
once per cache (see fixtures/build/) and converted to raw once per session.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT, ROOT / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
pytest.register_assert_rewrite("judges")

from fixtures import build as fb  # noqa: E402
from judges.disks import blkid_type, copy_range, vhdx_bat_states  # noqa: E402
from judges.hives import (REG_SZ, hive_sequences, hive_subkeys, hive_typed_values, hive_values,  # noqa: E402
                          replay_new_log)
from judges.linux import VOLUME_READERS, derive_linux_facts, logical_volumes, resolve  # noqa: E402
from judges.pe import file_version  # noqa: E402
from judges.tools import sh  # noqa: E402
from judges.windows import GUEST_PARAMETERS, IC_NAMES, IC_PACKAGE, copy_system_files, derive_windows_facts  # noqa: E402

JUDGES = ROOT / "tests" / "judges"

TOOLS = ("qemu-img", "sfdisk", "sgdisk", "blkid", "mkntfs", "ntfs-3g", "ntfsls", "ntfscat", "ntfsinfo",
         "mkfs.fat", "mkfs.ext4", "debugfs", "dumpe2fs", "e2fsck", "hivexsh", "hivexget", "mkfs.xfs", "xfs_db",
         "xfs_repair", "lvm", "losetup", "mkswap", "xz")
_missing = [t for t in TOOLS if shutil.which(t) is None]
if not os.path.exists("/dev/fuse"):
    _missing.append("/dev/fuse")
if not os.path.exists("/dev/loop-control"):
    _missing.append("/dev/loop-control")
if _missing and os.environ.get("CI"):
    raise RuntimeError(f"fixture tools missing on CI: {', '.join(_missing)}")

pytestmark = [
    pytest.mark.fixtures,
    pytest.mark.skipif(bool(_missing), reason=f"fixture tools missing: {', '.join(_missing)}"),
]

NAMES = list(fb.FIXTURES)
WINDOWS = [n for n, f in fb.FIXTURES.items() if f.facts.get("guest", {}).get("os") == "windows"]
LINUX = [n for n, f in fb.FIXTURES.items() if f.facts.get("guest", {}).get("os") == "linux"]


# --------------------------------------------------------------------------------------
# Session-wide: one build per cache, one raw conversion and extraction per session


@pytest.fixture(scope="session")
def image():
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = fb.build(name)
        return built[name]

    return get


@pytest.fixture(scope="session")
def raw(image, tmp_path_factory):
    converted: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in converted:
            out = tmp_path_factory.mktemp(name) / "disk.raw"
            fmt = "vhdx" if fb.FIXTURES[name].container == "vhdx" else "vpc"
            sh("qemu-img", "convert", "-f", fmt, "-O", "raw", image(name), out)
            converted[name] = out
        return converted[name]

    return get


@pytest.fixture(scope="session")
def partition(raw):
    """partition(name, index) -> a file holding that partition (index 1-based, per facts)."""
    extracted: dict[tuple[str, int], Path] = {}

    def get(name: str, index: int) -> Path:
        key = (name, index)
        if key not in extracted:
            p = fb.FIXTURES[name].facts["partitions"][index - 1]
            disk = raw(name)
            extracted[key] = copy_range(disk, disk.parent / f"part{index}.img", p["offset"], p["size"])
        return extracted[key]

    return get


# --------------------------------------------------------------------------------------
# Containers and partition tables


@pytest.mark.parametrize("name", NAMES)
def test_container_is_valid(name, image):
    fixture = fb.FIXTURES[name]
    path = image(name)
    assert path.suffix == fixture.suffix and path.parent.is_dir()
    fmt = "vhdx" if fixture.container == "vhdx" else "vpc"
    # -f: qemu-img's probe only looks at offset 0, so it calls a fixed VHD (footer only) "raw".
    info = json.loads(sh("qemu-img", "info", "-f", fmt, "--output=json", path).stdout)
    assert info["format"] == fmt
    assert info["virtual-size"] == fixture.virtual_size
    if fixture.container == "vhdx":
        sh("qemu-img", "check", "-f", "vhdx", path)
        assert info["cluster-size"] == (fixture.block_size or info["cluster-size"])
        if fixture.block_size is None:
            assert info["cluster-size"] not in (1 << 20, 2 << 20)
    else:  # VHD footer: "conectix", disk type 2 fixed / 3 dynamic, current size
        footer = path.read_bytes()[-512:]
        assert footer[:8] == b"conectix"
        assert struct.unpack_from(">I", footer, 60)[0] == (2 if fixture.subformat == "fixed" else 3)
        assert struct.unpack_from(">Q", footer, 48)[0] == fixture.virtual_size


@pytest.mark.parametrize("name", [n for n, f in fb.FIXTURES.items() if f.container == "vhdx"])
def test_vhdx_block_states(name, image):
    fixture = fb.FIXTURES[name]
    info = json.loads(sh("qemu-img", "info", "--output=json", image(name)).stdout)
    blocks = fixture.virtual_size // info["cluster-size"]
    states = vhdx_bat_states(image(name))[:blocks]  # a small disk has no sector bitmap entry in front
    if fixture.subformat == "fixed":
        assert states == [6] * blocks  # every block FULLY_PRESENT, as Hyper-V makes fixed disks
    else:
        assert set(states) <= {0, 2, 6} and 6 in states or name == "no-partition-table"


@pytest.mark.parametrize("name", NAMES)
def test_partition_table_matches_facts(name, raw):
    facts = fb.FIXTURES[name].facts["partitions"]
    disk = raw(name)
    proc = sh("sfdisk", "--json", disk, check=False)
    if not facts:
        assert proc.returncode != 0 and b"does not contain a recognized partition table" in proc.stderr
        assert sh("blkid", "-p", disk, check=False).returncode == 2  # nothing at all
        return
    table = json.loads(proc.stdout)["partitiontable"]
    assert {"dos": "mbr", "gpt": "gpt"}[table["label"]] == facts[0]["table"]
    got = [{"index": i, "table": facts[0]["table"], "offset": p["start"] * 512, "size": p["size"] * 512}
           for i, p in enumerate(table["partitions"], 1)]
    assert got == [{k: f[k] for k in ("index", "table", "offset", "size")} for f in facts]
    for f in facts:
        probe = sh("blkid", "-p", "-o", "export", "-O", f["offset"], "-S", f["size"], disk, check=False)
        tags = dict(line.split("=", 1) for line in probe.stdout.decode().splitlines() if "=" in line)
        found = {"ntfs": "ntfs", "vfat": "fat", "ext4": "ext4", "xfs": "xfs", "LVM2_member": "lvm2",
                 "BitLocker": "bitlocker"}.get(tags.get("TYPE"))
        assert found == f["filesystem"], (f, tags)


# --------------------------------------------------------------------------------------
# Windows guests: every fact, derived again from the image


@pytest.fixture(scope="session")
def windows_files(partition, tmp_path_factory):
    """windows_files(name) -> dir with the hives (and logs), vmbus.sys and hiberfil.sys
    copied out of the system volume with ntfscat."""
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            index = fb.FIXTURES[name].facts["guest"]["windows"]["system_partition"]
            done[name] = copy_system_files(partition(name, index), tmp_path_factory.mktemp(f"{name}-files"))
        return done[name]

    return get


@pytest.mark.parametrize("name", WINDOWS)
def test_windows_facts_read_back(name, raw, partition, windows_files):
    facts = fb.FIXTURES[name].facts
    volumes = {i: partition(name, i) for i, p in enumerate(facts["partitions"], 1) if p["filesystem"] == "ntfs"}
    derived = derive_windows_facts(raw(name), volumes, windows_files(name))
    assert derived["guest"]["windows"] == facts["guest"]["windows"]
    assert derived["guest"]["integration_services"] == facts["guest"]["integration_services"]
    assert set(facts) == {"guest", "partitions"} and set(facts["guest"]) == {"os", "windows", "integration_services"}


@pytest.mark.parametrize("name", WINDOWS)
def test_windows_volume_layout(name, partition):
    facts = fb.FIXTURES[name].facts
    part = partition(name, facts["guest"]["windows"]["system_partition"])
    root = sh("ntfsls", "-f", part).stdout.decode().split("\n")
    assert "Windows" in root and "Program Files" in root
    assert ("Program Files (x86)" in root) == (facts["guest"]["windows"]["arch"] == "x64")
    drivers = sh("ntfsls", "-f", part, "-p", "/Windows/System32/drivers").stdout.decode().split()
    assert "vmbus.sys" in drivers


@pytest.mark.parametrize("name", WINDOWS)
def test_last_host_only_with_kvp_data(name, windows_files):
    """The host the guest last ran on is in Guest\\Parameters as REG_SZ values, which the guest's
    data-exchange (KVP) service writes: so they are there exactly where Virtual Machine\\Auto is."""
    software = windows_files(name) / "SOFTWARE"
    kvp = (hive_values(software, "Microsoft\\Virtual Machine\\Auto") or {}).get("IntegrationServicesVersion")
    params = hive_typed_values(software, GUEST_PARAMETERS)
    last_host = fb.FIXTURES[name].facts["guest"]["integration_services"]["last_host"]
    if kvp is None:
        assert params is None and last_host is None
        return
    assert params is not None and last_host is not None
    hyperv = {"HostingSystemOsMajor", "HostingSystemOsMinor", "HostingSystemSpMajor"}
    blog = {"HostSystemOSMajor", "HostSystemOSMinor", "HostSystemSPMajor"}
    version_names = blog if name == "ws2008r2-dirtyhive" else hyperv
    assert set(params) - {"PhysicalHostNameFullyQualified"} == version_names | {"PhysicalHostName", "VirtualMachineName"}
    assert all(kind == REG_SZ for kind, _ in params.values()), params
    assert params[sorted(version_names)[-1]] == (REG_SZ, "0")


def test_real_hives_are_unchanged(windows_files):
    """win7-x86 and win10-gpt carry the REAL SYSTEM hives byte for byte."""
    import gzip
    import lzma
    for name, opener, src in (("win7-x86", lzma.open, "SYSTEM-win7-x86.xz"),
                              ("win10-gpt", gzip.open, "SYSTEM-win10-x64.gz")):
        with opener(fb.REAL / src, "rb") as f:
            assert (windows_files(name) / "SYSTEM").read_bytes() == f.read()


def test_real_hive_facts_as_recorded(windows_files):
    """What the builder says about the real hives (read with hivexget when it was written)."""
    w7 = windows_files("win7-x86") / "SYSTEM"
    assert hive_values(w7, "Select")["Current"] == 1
    c_drive = hive_values(w7, "MountedDevices")["\\DosDevices\\C:"]
    assert c_drive == bytes.fromhex("3ea0be5c") + (1 << 20).to_bytes(8, "little")
    assert not [k for k in hive_subkeys(w7, "ControlSet001\\Services") if k.lower().startswith("vmic")]
    w10 = windows_files("win10-gpt") / "SYSTEM"
    assert hive_values(w10, "MountedDevices")["\\DosDevices\\C:"] == b"DMIO:ID:" + uuid.UUID(fb.WIN10_C_GUID).bytes_le
    services = hive_subkeys(w10, "ControlSet001\\Services")
    assert sorted(k for k in services if k.lower().startswith("vmic")) == sorted(IC_NAMES)
    # Both real systems say GeneralizationState 7 although neither is generalized:
    for hive in (w7, w10):
        assert hive_values(hive, "Setup\\Status\\SysprepStatus")["GeneralizationState"] == 7


def test_ws2012_control_sets_differ(windows_files):
    system = windows_files("ws2012-sysprep") / "SYSTEM"
    select = hive_values(system, "Select")
    assert (select["Current"], select["LastKnownGood"]) == (2, 1)
    assert hive_values(system, "ControlSet001\\Services\\vmicheartbeat")["Start"] == 4
    assert hive_values(system, "ControlSet002\\Services\\vmicheartbeat")["Start"] == 3
    assert hive_values(system, "ControlSet001\\Services\\vmicrdv") is None
    assert hive_values(system, "Setup")["CmdLine"] == "oobe\\windeploy.exe"


def test_ws2012_setupcomplete_exists(partition):
    part = partition("ws2012-sysprep", 1)
    data = sh("ntfscat", "-f", part, "/Windows/Setup/Scripts/SetupComplete.cmd").stdout
    assert data.startswith(b"@echo off\r\n") and data.endswith(b"\r\n")


def test_win10_cbs_decoys(windows_files):
    software = windows_files("win10-gpt") / "SOFTWARE"
    key = "Microsoft\\Windows\\CurrentVersion\\Component Based Servicing\\Packages"
    packages = hive_subkeys(software, key)
    assert f"{IC_PACKAGE}31bf3856ad364e35~amd64~~10.0.19041.1" in packages
    superseded = [p for p in packages if hive_values(software, f"{key}\\{p}")["CurrentState"] != 0x70]
    assert superseded == ["Package_for_RollupFix~31bf3856ad364e35~amd64~~19041.1348.1.7"]
    assert hive_values(software, "Microsoft\\Windows NT\\CurrentVersion")["CurrentVersion"] == "6.3"
    assert file_version((windows_files("win10-gpt") / "vmbus.sys").read_bytes()) == "10.0.19041.1151"
    hiberfil = (windows_files("win10-gpt") / "hiberfil.sys").read_bytes()
    assert len(hiberfil) == 1 << 20 and not any(hiberfil)


def test_hibernated_hiberfil(windows_files):
    data = (windows_files("ws2008r2-hibernated") / "hiberfil.sys").read_bytes()
    assert len(data) == 1 << 20 and data[:4] == b"HIBR"
    assert not (windows_files("ws2008r2-x64") / "hiberfil.sys").exists()


def test_dirty_hive_and_its_log(windows_files, tmp_path):
    files = windows_files("ws2008r2-dirtyhive")
    seq1, seq2, ok = hive_sequences(files / "SYSTEM")
    assert ok and seq1 == seq2 + 1
    assert (files / "SYSTEM.LOG1").exists()
    s1, s2, ok = hive_sequences(files / "SOFTWARE")
    assert ok and s1 == s2

    # Marvin32 as implemented by the builder matches real Windows log entries.
    real_log = (fb.REAL / "registry/NewDirtyHive1/NewDirtyHive.LOG1").read_bytes()
    h1, h2 = struct.unpack_from("<QQ", real_log, 512 + 24)
    size = struct.unpack_from("<I", real_log, 512 + 4)[0]
    assert (fb.marvin32(real_log[512 + 40:512 + size]), fb.marvin32(real_log[512:512 + 32])) == (h1, h2)

    # Replaying the fixture's log gives a clean hive that differs only in ShutdownTime.
    recovered = tmp_path / "SYSTEM.recovered"
    recovered.write_bytes(replay_new_log((files / "SYSTEM").read_bytes(), (files / "SYSTEM.LOG1").read_bytes(),
                                          fb.marvin32))
    r1, r2, ok = hive_sequences(recovered)
    assert ok and r1 == r2
    before = hive_values(files / "SYSTEM", "ControlSet001\\Control\\Windows")["ShutdownTime"]
    after = hive_values(recovered, "ControlSet001\\Control\\Windows")["ShutdownTime"]
    assert before == struct.pack("<Q", fb.filetime(2021, 3, 4, 17, 12))
    assert after == struct.pack("<Q", fb.filetime(2021, 3, 5, 8, 30))
    for key in ("Select", "MountedDevices", "ControlSet001\\Services\\vmictimesync",
                "ControlSet001\\Control\\Session Manager\\Environment"):
        assert hive_values(recovered, key) == hive_values(files / "SYSTEM", key), key


# --------------------------------------------------------------------------------------
# Linux guests: volumes read with debugfs (ext4), xfs_db (XFS) and the LVM tools


@pytest.fixture(scope="session")
def lvm_volumes(partition, tmp_path_factory):
    """lvm_volumes(name, index) -> {vg/lv: (offset in the PV, extracted image)} of the PV
    on that partition, as pvs/vgs/lvs report it."""
    done: dict[tuple[str, int], dict[str, tuple[int, Path]]] = {}

    def get(name: str, index: int) -> dict[str, tuple[int, Path]]:
        if (name, index) not in done:
            pv_size, volumes = logical_volumes(partition(name, index), tmp_path_factory.mktemp(f"{name}-lvm"))
            assert pv_size <= fb.FIXTURES[name].facts["partitions"][index - 1]["size"]
            done[name, index] = volumes
        return done[name, index]

    return get



@pytest.fixture(scope="session")
def linux_volumes(partition, lvm_volumes):
    """linux_volumes(name) -> [(partition index, blkid TYPE, reader)] of every ext4/XFS
    volume of the fixture: on partitions, and on LVM logical volumes of lvm2 partitions."""
    def get(name: str) -> list[tuple[int, str, object]]:
        found = []
        for i, p in enumerate(fb.FIXTURES[name].facts["partitions"], 1):
            if p["filesystem"] is None:
                continue
            image = partition(name, i)
            kind = blkid_type(image)
            images = [image] if kind != "LVM2_member" else [img for _, img in lvm_volumes(name, i).values()]
            for img in images:
                kind = blkid_type(img)
                if kind in VOLUME_READERS:
                    found.append((i, kind, VOLUME_READERS[kind](img)))
        return found

    return get


@pytest.mark.parametrize("name", LINUX)
def test_linux_facts_read_back(name, linux_volumes, tmp_path):
    facts = fb.FIXTURES[name].facts["guest"]
    derived = derive_linux_facts(linux_volumes(name), tmp_path, fb.HV_MODULES)
    assert set(facts) == {"os", "linux"} and set(facts["linux"]) <= set(derived["linux"])
    assert derived["linux"] == {**derived["linux"], **facts["linux"]}, (derived, facts)


def test_ubuntu_lib_is_a_directory(linux_volumes):
    ((_, _, vol),) = linux_volumes("ubuntu-ext4")
    assert vol.kind("/lib") == "directory"
    assert vol.readlink("/boot/vmlinuz") == "vmlinuz-6.5.0-14-generic"


def test_rhel_merged_usr_on_xfs(partition, linux_volumes):
    (_, kind, vol), = linux_volumes("rhel-xfs")
    assert kind == "xfs"
    # /lib and /etc/os-release are symlinks: the modules and os-release are only found through them.
    assert (vol.kind("/lib"), vol.readlink("/lib")) == ("symlink", "usr/lib")
    assert (vol.kind("/etc/os-release"), vol.readlink("/etc/os-release")) == ("symlink", "../usr/lib/os-release")
    assert vol.kind("/lib/modules") is None  # xfs_db does not follow /lib
    assert resolve(vol, "/lib/modules") == "/usr/lib/modules"
    assert b'PRETTY_NAME="Red Hat Enterprise Linux 9.3 (Plow)"' in vol.read("/usr/lib/os-release")
    base = f"/usr/lib/modules/{fb.RHEL_KERNEL}/kernel/drivers"
    assert sorted(vol.names(base)) == ["hid", "net", "pci", "scsi"]  # no drivers/hv: hv_balloon is absent
    assert vol.names(f"{base}/scsi") == ["hv_storvsc.ko.xz"]
    assert sorted(vol.names("/usr/sbin")) == ["hypervfcopyd", "hypervkvpd", "hypervvssd"]
    # The filesystem is consistent (xfs_repair -n changes nothing) and the ESP is FAT.
    sh("xfs_repair", "-n", "-f", partition("rhel-xfs", 2))
    assert blkid_type(partition("rhel-xfs", 1)) == "vfat"
    label = sh("xfs_db", "-r", "-c", "label", partition("rhel-xfs", 2)).stdout.decode().strip()
    assert label == 'label = "root"'


def test_debian_lvm_layout(raw, partition, lvm_volumes, linux_volumes):
    disk = json.loads(sh("sfdisk", "--json", raw("debian-lvm-ext4")).stdout)["partitiontable"]
    assert [p["type"] for p in disk["partitions"]] == ["8e"]
    volumes = lvm_volumes("debian-lvm-ext4", 1)
    assert sorted(volumes) == ["vg0/root", "vg0/swap"]
    swap_offset, swap = volumes["vg0/swap"]
    root_offset, root = volumes["vg0/root"]
    # swap comes first in the VG, so root does not start at the first extent.
    assert swap_offset < root_offset and root_offset - swap_offset == swap.stat().st_size
    assert blkid_type(swap) == "swap" and blkid_type(root) == "ext4"
    dump = sh("dumpe2fs", "-h", root).stdout.decode()
    assert re.search(r"^Filesystem volume name:\s+root$", dump, re.M)
    assert int(re.search(r"^Block count:\s+(\d+)$", dump, re.M).group(1)) * 4096 == root.stat().st_size
    sh("e2fsck", "-fn", root)
    (_, kind, vol), = linux_volumes("debian-lvm-ext4")
    assert kind == "ext4" and vol.kind("/lib") == "directory"
    assert vol.names("/usr/sbin") == ["hv_kvp_daemon"]
    # Building left no loop device attached to a fixture's work files.
    assert "vhdtool-fixture-" not in sh("losetup", "--list", "--noheadings", "--output", "BACK-FILE").stdout.decode()


# --------------------------------------------------------------------------------------
# BitLocker, no guest


def test_bitlocker_volume(raw):
    p = fb.FIXTURES["bitlocker"].facts["partitions"][0]
    disk = raw("bitlocker")
    with open(disk, "rb") as f:
        f.seek(p["offset"])
        volume = f.read(p["size"])
    assert volume[3:11] == b"-FVE-FS-" and volume[510:512] == b"\x55\xaa"
    probe = sh("blkid", "-p", "-o", "export", "-O", p["offset"], "-S", p["size"], disk).stdout.decode()
    assert "TYPE=BitLocker" in probe.split()
    # Nothing but the boot sector and the three FVE metadata block headers.
    nonzero = {i // 4096 * 4096 for i in range(0, len(volume), 4096) if any(volume[i:i + 4096])}
    assert nonzero == {0, *fb.FVE_METADATA_OFFSETS}


def test_no_windows_volume_is_empty(partition):
    listing = sh("ntfsls", "-f", partition("no-windows", 1)).stdout.decode().split()
    assert listing == []


# --------------------------------------------------------------------------------------
# The builder's cache


def test_facts_are_subsets_of_the_schema():
    windows_keys = {"product_name", "version", "build", "ubr", "service_pack", "edition", "installation_type",
                    "arch", "system_partition", "drive_letter", "control_set", "generalized", "hibernated",
                    "ntfs_clean", "bitlocker", "hives"}
    for name, fixture in fb.FIXTURES.items():
        facts = fixture.facts
        assert set(facts) <= {"guest", "partitions"}, name
        for i, p in enumerate(facts["partitions"], 1):
            assert set(p) == {"index", "table", "offset", "size", "filesystem"} and p["index"] == i
            assert p["filesystem"] in ("ntfs", "fat", "ext4", "xfs", "lvm2", "bitlocker", None)
        guest = facts.get("guest")
        if guest and guest["os"] == "windows":
            assert set(guest["windows"]) == windows_keys, name
            assert set(guest["integration_services"]) == {"version", "source", "services", "last_host"}, name
            json.dumps(facts)
    assert "ws2008r2-x64-4k" not in fb.FIXTURES and "ws2008r2-x64-4k" in fb.UNBUILDABLE


def test_last_hosts_recorded():
    """ws2008r2-x64 last ran on a Server 2012 host; between them the Windows guests name a host
    of each of the matrix's host tables, one it has none for, and one without a fully
    qualified name (the name is then PhysicalHostName)."""
    hosts = {n: fb.FIXTURES[n].facts["guest"]["integration_services"]["last_host"] for n in WINDOWS}
    assert hosts["ws2008r2-x64"] == {"name": "hv-host-01.contoso.test", "os_version": "6.2", "service_pack": 0,
                                     "host_key": "win8", "virtual_machine_name": "ws2008r2-x64"}
    assert {h["host_key"] for h in hosts.values() if h} == {"win8", "win8.1", "win10", None}
    assert any(h and "." not in h["name"] for h in hosts.values())
    assert [n for n, h in hosts.items() if h is None] == ["win7-x86", "win10-gpt", "ws2012-sysprep"]


def test_judges_import_neither_vhdtool_nor_the_builder(tmp_path):
    """The judges must not share code with what they judge: no import of vhdtool or of
    fixtures (the builder), neither in their source nor, transitively, when imported."""
    forbidden = ("vhdtool", "fixtures")
    modules = sorted(JUDGES.glob("*.py"))
    assert len(modules) > 5
    for path in modules:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            assert not [n for n in names if n.split(".")[0] in forbidden], f"{path.name} imports {names}"
    code = ("import importlib, json, pkgutil, sys; sys.path.insert(0, sys.argv[1]); import judges; "
            "loaded = [importlib.import_module('judges.' + m.name).__name__ "
            "for m in pkgutil.iter_modules(judges.__path__)]; "
            "print(json.dumps([loaded, sorted(m for m in sys.modules if m.split('.')[0] in sys.argv[2:])]))")
    proc = subprocess.run([sys.executable, "-c", code, str(JUDGES.parent), *forbidden], cwd=tmp_path,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.returncode == 0, proc.stderr
    loaded, imported = json.loads(proc.stdout)
    assert sorted(loaded) == sorted(f"judges.{p.stem}" for p in modules if p.stem != "__init__")
    assert imported == []


def test_cache_reuses_and_replaces_atomically(tmp_path, monkeypatch):
    first = fb.build("no-partition-table", tmp_path)
    stamp = first.stat().st_mtime_ns
    assert fb.build("no-partition-table", tmp_path) == first and first.stat().st_mtime_ns == stamp

    def broken(work: Path) -> Path:
        (work / "disk.raw").write_bytes(b"half")
        raise fb.FixtureBuildError("boom")

    fixture = fb.FIXTURES["no-partition-table"]
    monkeypatch.setitem(fb.FIXTURES, "no-partition-table", dataclasses.replace(fixture, builder=broken))
    monkeypatch.setattr(fb.cache, "cache_key", lambda name: "f" * 64)  # as if the builder had changed
    with pytest.raises(fb.FixtureBuildError):
        fb.build("no-partition-table", tmp_path)
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == [".no-partition-table.lock", first.name]


def test_cache_key_covers_every_builder_module(tmp_path, monkeypatch):
    """Editing any module of the builder package changes every fixture's cache key."""
    package = tmp_path / "build"
    shutil.copytree(Path(fb.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(fb.cache, "PACKAGE_DIR", package)
    modules = sorted(package.glob("*.py"))
    names = {m.name for m in modules}
    assert {"__init__.py", "__main__.py", "cache.py", "windows.py", "linux.py", "no_guest.py"} <= names
    before = {name: fb.cache_key(name) for name in NAMES}
    for module in modules:
        text = module.read_text()
        module.write_text(text + "# edited\n")
        assert all(fb.cache_key(name) != key for name, key in before.items()), module.name
        module.write_text(text)
    assert {name: fb.cache_key(name) for name in NAMES} == before


def test_cache_concurrent_builders(tmp_path):
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from fixtures import build as fb; "
            "print(fb.build('bitlocker', __import__('pathlib').Path(sys.argv[2])))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(tmp_path)], stdout=subprocess.PIPE)
             for _ in range(3)]
    outs = {p.communicate()[0].decode().strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(outs) == 1
    images = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert [str(p) for p in images] == list(outs)
    sh("qemu-img", "check", "-q", images[0])
