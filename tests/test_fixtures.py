"""The fixture images (fixtures/build.py) judged by independent tools.

Every image must be a valid container (qemu-img), carry the partition table its facts
list (sfdisk, blkid), and every fact recorded for it must be read back out of the image
with tools that are not vhdtool: ntfsls/ntfscat/ntfsinfo for NTFS, hivexget/hivexsh for
the hives, debugfs for ext4. Images are built once per cache (see fixtures/build.py) and
converted to raw once per session.
"""

from __future__ import annotations

import contextlib
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
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fixtures import build as fb  # noqa: E402

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
IC_NAMES = ("vmicheartbeat", "vmickvpexchange", "vmicshutdown", "vmictimesync", "vmicvss",
            "vmicguestinterface", "vmicrdv", "vmicvmsession")
IC_PACKAGE = "Microsoft-Hyper-V-Guest-Integration-Drivers-Package~"


def sh(*cmd: object, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}: {proc.stderr.decode()}")
    return proc


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


def _copy_range(src: Path, dest: Path, offset: int, size: int) -> Path:
    with open(src, "rb") as fi, open(dest, "wb") as fo:
        fi.seek(offset)
        left = size
        while left:
            chunk = fi.read(min(left, 1 << 20))
            assert chunk, f"{src} ends before {offset + size}"
            if chunk.count(0) == len(chunk):
                fo.seek(len(chunk), os.SEEK_CUR)
            else:
                fo.write(chunk)
            left -= len(chunk)
        fo.truncate(size)
    return dest


@pytest.fixture(scope="session")
def partition(raw):
    """partition(name, index) -> a file holding that partition (index 1-based, per facts)."""
    extracted: dict[tuple[str, int], Path] = {}

    def get(name: str, index: int) -> Path:
        key = (name, index)
        if key not in extracted:
            p = fb.FIXTURES[name].facts["partitions"][index - 1]
            disk = raw(name)
            extracted[key] = _copy_range(disk, disk.parent / f"part{index}.img", p["offset"], p["size"])
        return extracted[key]

    return get


# --------------------------------------------------------------------------------------
# hivexget output, parsed


def _unquote(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def hive_values(hive: Path, key: str) -> dict[str, object] | None:
    """All values of `key` as {name: str | int | bytes}; None if the key does not exist."""
    proc = sh("hivexget", hive, key, check=False)
    if proc.returncode != 0:
        assert b"not found" in proc.stderr, proc.stderr
        return None
    values: dict[str, object] = {}
    for line in proc.stdout.decode().splitlines():
        m = re.fullmatch(r'(?:"((?:[^"\\]|\\.)*)"|@)=(.*)', line)
        assert m, line
        name, data = _unquote(m.group(1) or ""), m.group(2)
        if data.startswith('"'):
            values[name] = _unquote(data[1:-1])
        elif data.startswith("str(2):"):
            values[name] = _unquote(data[8:-1])
        elif data.startswith("dword:"):
            values[name] = int(data[6:], 16)
        elif data.startswith("hex("):
            hexbytes = data.split(":", 1)[1]
            values[name] = bytes.fromhex(hexbytes.replace(",", "")) if hexbytes else b""
        else:
            raise AssertionError(f"unparsed hivexget line {line!r}")
    return values


def hive_subkeys(hive: Path, key: str) -> list[str]:
    proc = subprocess.run(["hivexsh", str(hive)], input=f"cd \\{key}\nls\n".encode(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if proc.returncode != 0:
        return []
    return proc.stdout.decode().splitlines()


def hive_sequences(hive: Path) -> tuple[int, int, bool]:
    block = hive.read_bytes()[:4096]
    assert block[:4] == b"regf"
    seq1, seq2 = struct.unpack_from("<II", block, 4)
    csum = 0
    for (word,) in struct.iter_unpack("<I", block[:508]):
        csum ^= word
    csum = {0: 1, 0xFFFFFFFF: 0xFFFFFFFE}.get(csum, csum)
    return seq1, seq2, csum == struct.unpack_from("<I", block, 508)[0]


def file_version(data: bytes) -> str:
    """dwFileVersionMS/LS of the VS_FIXEDFILEINFO after the VS_VERSION_INFO key."""
    key = "VS_VERSION_INFO\0".encode("utf-16-le")
    at = data.index(key)
    node = at - 6
    length, value_length, vtype = struct.unpack_from("<HHH", data, node)
    assert (value_length, vtype) == (52, 0)
    fixed = node + ((6 + len(key) + 3) & ~3)
    sig, _, ms, ls = struct.unpack_from("<IIII", data, fixed)
    assert sig == 0xFEEF04BD
    return f"{ms >> 16}.{ms & 0xFFFF}.{ls >> 16}.{ls & 0xFFFF}"


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


def _vhdx_bat_states(path: Path) -> list[int]:
    """Payload-block states from the VHDX BAT (region table at 192 KiB)."""
    with open(path, "rb") as f:
        f.seek(0x30000)
        table = f.read(64 * 1024)
        assert table[:4] == b"regi"
        count = struct.unpack_from("<I", table, 8)[0]
        bat = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
        for i in range(count):
            guid, offset, length, _ = struct.unpack_from("<16sQII", table, 16 + 32 * i)
            if uuid.UUID(bytes_le=guid) == bat:
                f.seek(offset)
                entries = struct.unpack(f"<{length // 8}Q", f.read(length))
                return [e & 7 for e in entries]
    raise AssertionError("no BAT region")


@pytest.mark.parametrize("name", [n for n, f in fb.FIXTURES.items() if f.container == "vhdx"])
def test_vhdx_block_states(name, image):
    fixture = fb.FIXTURES[name]
    info = json.loads(sh("qemu-img", "info", "--output=json", image(name)).stdout)
    blocks = fixture.virtual_size // info["cluster-size"]
    states = _vhdx_bat_states(image(name))[:blocks]  # a small disk has no sector bitmap entry in front
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
        if name in done:
            return done[name]
        index = fb.FIXTURES[name].facts["guest"]["windows"]["system_partition"]
        part = partition(name, index)
        out = tmp_path_factory.mktemp(f"{name}-files")
        listing = sh("ntfsls", "-f", part, "-p", "/Windows/System32/config").stdout.decode().split()
        assert "SOFTWARE" in listing and "SYSTEM" in listing
        for entry in listing:
            if entry.startswith(("SOFTWARE", "SYSTEM")):
                (out / entry).write_bytes(sh("ntfscat", "-f", part, f"/Windows/System32/config/{entry}").stdout)
        for src, dest in (("/Windows/System32/drivers/vmbus.sys", "vmbus.sys"), ("/hiberfil.sys", "hiberfil.sys")):
            proc = sh("ntfscat", "-f", part, src, check=False)
            if proc.returncode == 0:
                (out / dest).write_bytes(proc.stdout)
        done[name] = out
        return out

    return get


def derive_windows_facts(raw: Path, volumes: dict[int, Path], files: Path) -> dict:
    """The facts of the Windows guest, read with hivexget/ntfsls/ntfsinfo/sfdisk only.
    `volumes`: every NTFS partition (by index) extracted to a file."""
    software, system = files / "SOFTWARE", files / "SYSTEM"
    cv = hive_values(software, "Microsoft\\Windows NT\\CurrentVersion")
    if "CurrentMajorVersionNumber" in cv:
        version = f"{cv['CurrentMajorVersionNumber']}.{cv['CurrentMinorVersionNumber']}"
    else:
        version = cv["CurrentVersion"]
    current = hive_values(system, "Select")["Current"]
    cs = f"ControlSet{current:03d}"
    env = hive_values(system, f"{cs}\\Control\\Session Manager\\Environment")
    arch = {"AMD64": "x64", "x86": "x86"}[env["PROCESSOR_ARCHITECTURE"]]

    # The drive letter: MountedDevices \DosDevices\C: must name the system partition.
    table = json.loads(sh("sfdisk", "--json", raw).stdout)["partitiontable"]
    c_drive = hive_values(system, "MountedDevices")["\\DosDevices\\C:"]
    named = []
    for i, p in enumerate(table["partitions"], 1):
        if table["label"] == "dos":
            ident = struct.pack("<IQ", int(table["id"], 16), p["start"] * 512)
        else:
            ident = b"DMIO:ID:" + uuid.UUID(p["uuid"]).bytes_le
        if ident == c_drive:
            named.append(i)
    system_partitions = [i for i, volume in sorted(volumes.items())
                         if sh("ntfsls", "-f", volume, "-p", "/Windows/System32/config", check=False).returncode == 0]
    assert len(system_partitions) == 1, system_partitions
    part = volumes[system_partitions[0]]
    image_state = (hive_values(software, "Microsoft\\Windows\\CurrentVersion\\Setup\\State") or {}).get("ImageState")
    sysprep = hive_values(system, "Setup\\Status\\SysprepStatus") or {}
    hiberfil = files / "hiberfil.sys"
    volume_flags = re.search(r"Volume Flags: (0x[0-9a-f]+)", sh("ntfsinfo", "-m", "-f", part).stdout.decode())
    with open(part, "rb") as f:
        boot_sector = f.read(512)
    dirty = {}
    for hive in ("SYSTEM", "SOFTWARE"):
        seq1, seq2, checksum_ok = hive_sequences(files / hive)
        assert checksum_ok, f"{hive} base block checksum"
        dirty[hive] = {"dirty": seq1 != seq2}

    windows = {
        "product_name": cv["ProductName"],
        "version": version,
        "build": int(cv["CurrentBuildNumber"]),
        "ubr": cv.get("UBR"),
        "service_pack": cv.get("CSDVersion"),
        "edition": cv["EditionID"],
        "installation_type": cv["InstallationType"],
        "arch": arch,
        "system_partition": system_partitions[0],
        "drive_letter": "C" if named == system_partitions else None,
        "control_set": current,
        "generalized": image_state == "IMAGE_STATE_GENERALIZE_RESEAL_TO_OOBE"
                       and sysprep.get("GeneralizationState") == 7,
        "hibernated": hiberfil.exists() and hiberfil.read_bytes()[:4] in (b"HIBR", b"hibr"),
        "ntfs_clean": volume_flags is not None and int(volume_flags.group(1), 16) & 1 == 0,
        "bitlocker": boot_sector[3:11] == b"-FVE-FS-",
        "hives": dirty,
    }

    kvp = (hive_values(software, "Microsoft\\Virtual Machine\\Auto") or {}).get("IntegrationServicesVersion")
    packages_key = "Microsoft\\Windows\\CurrentVersion\\Component Based Servicing\\Packages"
    installed = [k.split("~")[-1] for k in hive_subkeys(software, packages_key)
                 if k.startswith(IC_PACKAGE)
                 and hive_values(software, f"{packages_key}\\{k}").get("CurrentState") == 0x70]
    if kvp:
        ic = {"version": kvp, "source": "kvp"}
    elif installed:
        ic = {"version": max(installed, key=lambda v: tuple(map(int, v.split(".")))), "source": "cbs"}
    else:
        ic = {"version": file_version((files / "vmbus.sys").read_bytes()), "source": "vmbus.sys"}
    services = []
    for service in IC_NAMES:
        values = hive_values(system, f"{cs}\\Services\\{service}")
        if values is not None:
            start = values["Start"]
            services.append({"name": service, "start": ["boot", "system", "automatic", "manual", "disabled"][start],
                             "start_value": start})
    ic["services"] = services
    return {"guest": {"os": "windows", "windows": windows, "integration_services": ic}}


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


def _replay_new_log(primary: bytes, log: bytes) -> bytes:
    """A minimal replay of a new-format (HvLE) log onto a dirty primary, per yarp."""
    seq2 = struct.unpack_from("<I", primary, 8)[0]
    assert log[:4] == b"regf" and struct.unpack_from("<I", log, 28)[0] == 6
    expected = struct.unpack_from("<I", log, 4)[0]
    assert expected >= seq2
    hive = bytearray(primary)
    pos = 512
    applied = 0
    while pos + 40 <= len(log) and log[pos:pos + 4] == b"HvLE":
        size, _flags, seq, bins_size, count = struct.unpack_from("<IIIII", log, pos + 4)
        entry = log[pos:pos + size]
        h1, h2 = struct.unpack_from("<QQ", entry, 24)
        if seq != expected or h2 != fb.marvin32(entry[:32]) or h1 != fb.marvin32(entry[40:]):
            break
        data = pos + 40 + 8 * count
        for i in range(count):
            off, length = struct.unpack_from("<II", log, pos + 40 + 8 * i)
            end = 4096 + off + length
            if len(hive) < end:
                hive.extend(b"\0" * (end - len(hive)))
            hive[4096 + off:end] = log[data:data + length]
            data += length
        struct.pack_into("<II", hive, 4, seq, seq)
        struct.pack_into("<I", hive, 40, bins_size)
        applied += 1
        pos += size
        expected += 1
    assert applied, "no log entry applied"
    csum = 0
    for (word,) in struct.iter_unpack("<I", bytes(hive[:508])):
        csum ^= word
    struct.pack_into("<I", hive, 508, {0: 1, 0xFFFFFFFF: 0xFFFFFFFE}.get(csum, csum))
    return bytes(hive)


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
    recovered.write_bytes(_replay_new_log((files / "SYSTEM").read_bytes(), (files / "SYSTEM.LOG1").read_bytes()))
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


class Ext4Volume:
    """An ext4 image read with debugfs. Paths are taken as they are: no symlink in them
    is followed by the test's own resolve() (debugfs stat does not follow the last one)."""

    def __init__(self, image: Path):
        self.image = image

    def _debugfs(self, request: str) -> bytes:
        return sh("debugfs", "-R", request, self.image).stdout

    def kind(self, path: str) -> str | None:
        m = re.search(r"Type: (\w+)", self._debugfs(f"stat {path}").decode())
        return m.group(1) if m else None

    def names(self, path: str) -> list[str]:
        out = self._debugfs(f"ls -p {path}").decode()
        return [n for n in (line.split("/")[5] for line in out.splitlines() if line.count("/") >= 6)
                if n not in (".", "..")]

    def read(self, path: str) -> bytes:
        return self._debugfs(f"cat {path}")

    def readlink(self, path: str) -> str:
        m = re.search(r'Fast link dest: "(.*)"', self._debugfs(f"stat {path}").decode())
        assert m, f"{path} is not a fast symlink"
        return m.group(1)


XFS_MODES = {0o040000: "directory", 0o100000: "regular", 0o120000: "symlink"}


class XfsVolume:
    """An XFS image read with xfs_db -r: directory listings (ls), inode modes, symlink
    targets (u3.symlink) and file extents (bmap), whose blocks are then read from the image."""

    def __init__(self, image: Path):
        self.image = image
        sb = dict(re.findall(r"^(\w+) = (\d+)$", self._db("sb 0", "print blocksize agblocks"), re.M))
        self.blocksize, self.agblocks = int(sb["blocksize"]), int(sb["agblocks"])

    def _db(self, *commands: str, check: bool = True) -> str:
        args = [a for c in commands for a in ("-c", c)]
        return sh("xfs_db", "-r", *args, self.image, check=check).stdout.decode()

    def _inode(self, path: str, *fields: str) -> dict[str, str] | None:
        out = self._db(f"path {path}", f"print {' '.join(fields)}", check=False)
        values = dict(re.findall(r"^([\w.]+) = (.*)$", out, re.M))
        return values or None

    def kind(self, path: str) -> str | None:
        inode = self._inode(path, "core.mode")
        return None if inode is None else XFS_MODES.get(int(inode["core.mode"], 8) & 0o170000, "other")

    def names(self, path: str) -> list[str]:
        out = self._db(f"ls {path}")
        entries = [line.split() for line in out.splitlines()[1:]]
        assert all(e[-1] == "(good)" for e in entries), out
        return [e[5] for e in entries if e[5] not in (".", "..")]

    def read(self, path: str) -> bytes:
        inode = self._inode(path, "core.size", "core.format")
        assert inode and inode["core.format"] == "2 (extents)", inode
        size = int(inode["core.size"])
        data = bytearray(-(-size // self.blocksize) * self.blocksize)
        with open(self.image, "rb") as f:
            for m in re.finditer(r"data offset (\d+) startblock \d+ \((\d+)/(\d+)\) count (\d+) flag (\d)",
                                 self._db(f"path {path}", "bmap")):
                offset, ag, agbno, count, unwritten = map(int, m.groups())
                if unwritten:
                    continue
                f.seek((ag * self.agblocks + agbno) * self.blocksize)
                chunk = f.read(count * self.blocksize)
                data[offset * self.blocksize:offset * self.blocksize + len(chunk)] = chunk
        return bytes(data[:size])

    def readlink(self, path: str) -> str:
        inode = self._inode(path, "core.format", "u3.symlink")
        assert inode and inode["core.format"] == "1 (local)", inode
        return inode["u3.symlink"][1:-1]


def resolve(volume, path: str) -> str | None:
    """`path` with every symlink in it (the last one too) resolved inside the volume."""
    parts, done, hops = [p for p in path.split("/") if p], [], 0
    while parts:
        name = parts.pop(0)
        if name == ".":
            continue
        if name == "..":
            done = done[:-1]
            continue
        here = "/" + "/".join(done + [name])
        kind = volume.kind(here)
        if kind is None:
            return None
        if kind == "symlink":
            hops += 1
            assert hops <= 40, f"symlink loop at {path}"
            target = volume.readlink(here)
            if target.startswith("/"):
                done = []
            parts = [p for p in target.split("/") if p] + parts
            continue
        done.append(name)
    return "/" + "/".join(done)


def blkid_type(image: Path) -> str | None:
    proc = sh("blkid", "-p", "-o", "value", "-s", "TYPE", image, check=False)
    return proc.stdout.decode().strip() or None


@contextlib.contextmanager
def lvm_readonly(image: Path, work: Path):
    """Yields report(command, *args) -> rows: pvs/vgs/lvs --readonly on `image`, attached to
    a read-only loop device, with an lvm.conf that sees that device only."""
    dev = sh("losetup", "--find", "--show", "--read-only", image).stdout.decode().strip()
    try:
        system = work / "lvm-system"
        (system / "lock").mkdir(parents=True, exist_ok=True)
        accept = f'[ "a|^{dev}$|", "r|.*|" ]'
        (system / "lvm.conf").write_text(
            f"devices {{ filter = {accept} global_filter = {accept} use_devicesfile = 0 hints = \"none\" "
            f"obtain_device_list_from_udev = 0 }}\n"
            f"global {{ locking_dir = \"{system / 'lock'}\" use_lvmpolld = 0 notify_dbus = 0 }}\n"
            "activation { udev_sync = 0 udev_rules = 0 monitoring = 0 }\nbackup { backup = 0 archive = 0 }\n")
        env = {**os.environ, "LVM_SYSTEM_DIR": str(system), "LVM_SUPPRESS_FD_WARNINGS": "1"}

        def report(command: str, *args: str) -> list[dict[str, str]]:
            proc = subprocess.run(["lvm", command, "--readonly", "--devices", dev, "--reportformat", "json",
                                   "--units", "b", "--nosuffix", *args],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, check=False)
            assert proc.returncode == 0, proc.stderr.decode()
            doc = json.loads(proc.stdout)
            return [row for r in doc["report"] for rows in r.values() for row in rows]

        yield dev, report
    finally:
        sh("losetup", "--detach", dev)


@pytest.fixture(scope="session")
def lvm_volumes(partition, tmp_path_factory):
    """lvm_volumes(name, index) -> {vg/lv: (offset in the PV, extracted image)} of the PV
    on that partition, as pvs/vgs/lvs report it."""
    done: dict[tuple[str, int], dict[str, tuple[int, Path]]] = {}

    def get(name: str, index: int) -> dict[str, tuple[int, Path]]:
        if (name, index) in done:
            return done[name, index]
        pv_image = partition(name, index)
        work = tmp_path_factory.mktemp(f"{name}-lvm")
        with lvm_readonly(pv_image, work) as (dev, report):
            (pv,) = report("pvs", "-o", "pv_name,pe_start,vg_name,pv_size")
            assert int(pv["pv_size"]) <= fb.FIXTURES[name].facts["partitions"][index - 1]["size"]
            (vg,) = report("vgs", "-o", "vg_name,vg_extent_size")
            segments = report("lvs", "--segments", "-o", "lv_name,vg_name,seg_pe_ranges,lv_size")
        volumes: dict[str, tuple[int, Path]] = {}
        for seg in segments:  # one segment each (in the order lvs lists them)
            m = re.fullmatch(re.escape(dev) + r":(\d+)-(\d+)", seg["seg_pe_ranges"])
            assert m, seg
            first, last = int(m.group(1)), int(m.group(2))
            offset = int(pv["pe_start"]) + first * int(vg["vg_extent_size"])
            size = (last - first + 1) * int(vg["vg_extent_size"])
            assert size == int(seg["lv_size"])
            key = f"{seg['vg_name']}/{seg['lv_name']}"
            assert key not in volumes, f"{key} has more than one segment"
            volumes[key] = (offset, _copy_range(pv_image, work / f"{seg['lv_name']}.img", offset, size))
        done[name, index] = volumes
        return volumes

    return get


VOLUME_READERS = {"ext4": Ext4Volume, "xfs": XfsVolume}
# The Hyper-V daemons under the names distributions install them (Debian/Ubuntu's
# hyperv-daemons and linux-tools: hv_*_daemon; RHEL's hyperv-daemons: hyperv*d).
DAEMON_FILES = {
    "hv_kvp_daemon": ("hv_kvp_daemon", "hypervkvpd"),
    "hv_vss_daemon": ("hv_vss_daemon", "hypervvssd"),
    "hv_fcopy_daemon": ("hv_fcopy_daemon", "hypervfcopyd"),
}


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


def derive_linux_facts(volumes: list[tuple[int, str, object]], tmp_path: Path) -> dict:
    roots = [(i, kind, vol) for i, kind, vol in volumes if resolve(vol, "/etc/os-release")]
    assert len(roots) == 1, roots
    index, kind, vol = roots[0]
    os_release = dict(re.findall(r'^(\w+)="?([^"\n]*)"?$', vol.read(resolve(vol, "/etc/os-release")).decode(), re.M))

    def is_file(path: str) -> bool:
        real = resolve(vol, path)
        return real is not None and vol.kind(real) == "regular"

    boot = resolve(vol, "/boot")
    kernels = sorted(n[len("vmlinuz-"):] for n in vol.names(boot)
                     if n.startswith("vmlinuz-") and vol.kind(f"{boot}/{n}") == "regular")
    modules: dict[str, bool] = {}
    for kernel in kernels:
        base = resolve(vol, f"/lib/modules/{kernel}")
        builtin = vol.read(f"{base}/modules.builtin").decode().split()
        for module, (directory, _) in fb.HV_MODULES.items():
            files = [f"{base}/{directory}/{module}{ext}" for ext in (".ko", ".ko.zst", ".ko.xz")]
            present = [f for f in files if is_file(f)]
            modules[module] = modules.get(module, False) or f"{directory}/{module}.ko" in builtin or bool(present)
            for path in present:  # compressed modules must decompress to the module
                data = vol.read(resolve(vol, path))
                out = tmp_path / f"{kernel}-{Path(path).name}"
                out.write_bytes(data)
                if path.endswith(".ko.xz"):
                    data = sh("xz", "-dc", out).stdout
                elif path.endswith(".ko.zst"):
                    if not shutil.which("zstd"):
                        continue
                    data = sh("zstd", "-dc", out).stdout
                assert data[:4] == b"\x7fELF" and f"name={module}\0".encode() in data, path
    daemons = {key: any(is_file(f"/usr/sbin/{n}") for n in names) for key, names in DAEMON_FILES.items()}
    return {"os": "linux", "linux": {
        "distribution": os_release["ID"],
        "version": os_release["VERSION_ID"],
        "kernels": kernels,
        "hv_modules": modules,
        "daemons": daemons,
        "root_partition": index,
        "filesystem": kind,
    }}


@pytest.mark.parametrize("name", LINUX)
def test_linux_facts_read_back(name, linux_volumes, tmp_path):
    facts = fb.FIXTURES[name].facts["guest"]
    derived = derive_linux_facts(linux_volumes(name), tmp_path)
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
            json.dumps(facts)
    assert "ws2008r2-x64-4k" not in fb.FIXTURES and "ws2008r2-x64-4k" in fb.UNBUILDABLE


def test_cache_reuses_and_replaces_atomically(tmp_path, monkeypatch):
    first = fb.build("no-partition-table", tmp_path)
    stamp = first.stat().st_mtime_ns
    assert fb.build("no-partition-table", tmp_path) == first and first.stat().st_mtime_ns == stamp

    def broken(work: Path) -> Path:
        (work / "disk.raw").write_bytes(b"half")
        raise fb.FixtureBuildError("boom")

    fixture = fb.FIXTURES["no-partition-table"]
    monkeypatch.setitem(fb.FIXTURES, "no-partition-table", fb.dataclasses.replace(fixture, builder=broken))
    monkeypatch.setattr(fb, "cache_key", lambda name: "f" * 64)  # as if the builder had changed
    with pytest.raises(fb.FixtureBuildError):
        fb.build("no-partition-table", tmp_path)
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == [".no-partition-table.lock", first.name]


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
