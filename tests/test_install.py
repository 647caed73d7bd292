"""install.sh, run from a fresh clone of the committed HEAD: what it asks apt and pip for, with and without --test.

apt-get, dpkg-query and sudo are stubs on PATH that record their arguments and install nothing
(dpkg-query reports every package missing, so each one is asked for). The fast tests stub python3 too:
its venv's python records the pip command. The last one runs the real runtime install (real venv, real
pip from the configured index; apt is stubbed, the system packages are already there) and then the
README's first command, judged by qemu-img check and ntfs-3g's ntfscat (about 15 s, most of it pip).
"""

from __future__ import annotations

import hashlib
import lzma
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT
from judges.volumes import ntfscat, partition_volume
from vhdtool.native.libraries import LIBC, LIBRARIES

# What a user needs at run time: Python with venv, the libraries vhdtool loads (libc6 is part of every
# Debian system and not asked for), xz for the demo image.
RUNTIME = {"python3", "python3-venv", "xz-utils"} | {lib.debian for lib in LIBRARIES if lib is not LIBC}
# The test and judge toolchain: none of it is a user's business.
TOOLCHAIN = {"qemu-utils", "gcab", "genisoimage", "osslsigncode", "e2fsprogs", "fdisk", "gdisk", "dosfstools",
             "xfsprogs", "btrfs-progs", "lvm2", "strace", "wine", "wine64", "gcc-mingw-w64-x86-64",
             "busybox-static", "systemd", "slurm-wlm", "munge", "libhivex-bin", "ntfs-3g", "bzip2", "git"}
# The programs the tests and fixture builders run (grep tests/ fixtures/ for subprocess calls), beyond
# those of the base system (packages of priority required or important).
TEST_PROGRAMS = ("qemu-img", "qemu-io", "sfdisk", "sgdisk", "mkntfs", "ntfs-3g", "ntfsls", "ntfscat", "ntfsinfo",
                 "ntfsfix", "ntfscp", "ntfssecaudit", "mkfs.fat", "mkfs.ext4", "debugfs", "dumpe2fs", "e2fsck",
                 "hivexsh", "hivexget", "hivexml", "mkfs.xfs", "xfs_db", "xfs_repair", "mkfs.btrfs", "lvm", "strace",
                 "gcab", "genisoimage", "isoinfo", "osslsigncode", "openssl", "wineserver", "x86_64-w64-mingw32-gcc",
                 "busybox", "systemctl", "systemd-analyze", "sbatch", "slurmctld", "slurmd", "munged", "mungekey",
                 "bzip2", "xz", "git", "losetup", "blkid", "mkswap", "unshare", "ldconfig", "getconf")

STUBS = {
    "apt-get": '#!/bin/sh\necho "$*" >> "$STUB_LOG/apt-get"\n',
    "dpkg-query": "#!/bin/sh\nexit 1\n",
    "sudo": '#!/bin/sh\necho "$*" >> "$STUB_LOG/sudo"\nexec "$@"\n',
}
# python3 -m venv DIR makes DIR/bin/python, which records what it is asked (pip install ...).
FAKE_PYTHON = ('#!/bin/sh\nif [ "$1 $2" = "-m venv" ]; then\n  mkdir -p "$3/bin"\n'
               '  printf \'#!/bin/sh\\necho "$*" >> "$STUB_LOG/python"\\n\' > "$3/bin/python"\n'
               '  chmod +x "$3/bin/python"\n  exit 0\nfi\necho "python3 $*" >> "$STUB_LOG/python"\n')


def clone_head(tmp_path: Path) -> Path:
    """A fresh clone of this checkout's committed HEAD (what a user clones; uncommitted changes are not
    in it). A checkout git cannot read (an exported tree without .git, or one another user owns, which
    git refuses) is copied instead, without what the ignore rules and the fixture caches keep out."""
    clone = tmp_path / "vhdtool"
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        subprocess.run(["git", "clone", "-q", "--no-checkout", str(ROOT), str(clone)], check=True)
        subprocess.run(["git", "-C", str(clone), "checkout", "-q", head.stdout.strip()], check=True)
        return clone
    ignored = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", ".pytest_cache", ".hypothesis",
                                     "build", ".cache")
    shutil.copytree(ROOT, clone, ignore=ignored, symlinks=True)
    for image in (clone / "demo").glob("*.vhdx"):
        image.unlink()  # /demo/*.vhdx: install.sh unpacks it
    return clone


def stub_path(tmp_path: Path, python: bool) -> tuple[dict, Path]:
    bin_dir, log = tmp_path / "stubs", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    for name, text in {**STUBS, **({"python3": FAKE_PYTHON} if python else {})}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", STUB_LOG=str(log))
    env.pop("VIRTUAL_ENV", None)
    return env, log


def asked(log: Path) -> set[str]:
    """The packages `apt-get install` was asked for."""
    lines = (log / "apt-get").read_text().splitlines() if (log / "apt-get").exists() else []
    installs = [shlex.split(line) for line in lines if " install " in f" {line} "]
    return {a for words in installs for a in words[words.index("install") + 1:] if not a.startswith("-")}


def sha256(f) -> str:
    digest = hashlib.sha256()
    while chunk := f.read(1 << 20):
        digest.update(chunk)
    return digest.hexdigest()


def run_install(clone: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    res = subprocess.run(["./install.sh", *args], cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    return res


@pytest.fixture
def stubbed(tmp_path):
    clone = clone_head(tmp_path)
    env, log = stub_path(tmp_path, python=True)
    return clone, env, log


def test_the_runtime_install_asks_for_the_libraries_and_none_of_the_toolchain(stubbed):
    clone, env, log = stubbed
    run_install(clone, env)
    packages = asked(log)
    assert RUNTIME <= packages, RUNTIME - packages
    assert not packages & TOOLCHAIN, packages & TOOLCHAIN
    assert "update -qq" in (log / "apt-get").read_text()
    pip = (log / "python").read_text()
    assert re.search(r"^-m pip install .*-e \.$", pip, re.M), pip
    assert "test" not in pip
    # the demo image is unpacked beside its .xz (judged by Python's own xz decoder)
    demo = clone / "demo" / "ws2008r2-x64.vhdx"
    with lzma.open(f"{demo}.xz") as packed, open(demo, "rb") as unpacked:
        assert sha256(packed) == sha256(unpacked)


def test_the_test_install_asks_for_the_toolchain_and_the_test_extras(stubbed):
    clone, env, log = stubbed
    run_install(clone, env, "--test")
    packages = asked(log)
    assert (RUNTIME | TOOLCHAIN) <= packages, (RUNTIME | TOOLCHAIN) - packages
    assert re.search(r"^-m pip install .*-e \.\[test\]$", (log / "python").read_text(), re.M)


@pytest.mark.parametrize("args,named", [(["--tests"], "--tests"), (["--test", "--bogus"], "--bogus")])
def test_an_unknown_option_is_refused(stubbed, args, named):
    clone, env, log = stubbed
    res = subprocess.run(["./install.sh", *args], cwd=clone, env=env, capture_output=True, text=True)
    assert res.returncode == 2 and f"'{named}'" in res.stderr and "--test" in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1, res.stderr
    assert not (log / "apt-get").exists() and not (clone / ".venv").exists()


def dpkg_query(field: str, packages) -> dict[str, str]:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Package}\t${" + field + "}\n", *packages],
                         capture_output=True, text=True).stdout
    return dict(line.split("\t", 1) for line in out.splitlines() if "\t" in line)


@pytest.mark.skipif(not shutil.which("dpkg"), reason="dpkg: a Debian/Ubuntu system")
def test_every_program_the_tests_run_comes_from_a_package_the_test_install_asks_for(stubbed):
    clone, env, log = stubbed
    run_install(clone, env, "--test")
    packages = asked(log)
    direct = set(packages)  # and what those depend on (wine -> wine64 -> libwine, slurm-wlm -> slurmd)
    for depends in dpkg_query("Depends", packages).values():
        direct |= {d.split()[0].split(":")[0] for d in re.split(r"[,|]", depends) if d.strip()}
    paths = {}
    for program in TEST_PROGRAMS:
        path = shutil.which(program)
        assert path, f"{program} is not installed"
        real = os.path.realpath(path)
        # dpkg knows a file under one spelling of a merged /usr
        paths[program] = {q for p in (path, real) for q in (p, p.removeprefix("/usr"), "/usr" + p.removeprefix("/usr"))}
    out = subprocess.run(["dpkg", "-S", *{p for ps in paths.values() for p in ps}], capture_output=True, text=True).stdout
    owners_of: dict[str, set[str]] = {}
    for line in out.splitlines():
        names, _, file = line.partition(": ")
        owners_of.setdefault(file, set()).update(n.split(":")[0] for n in names.split(", "))
    priority = dpkg_query("Priority", {o for os_ in owners_of.values() for o in os_})
    for program, spellings in paths.items():
        owners = set().union(*(owners_of.get(p, set()) for p in spellings))
        assert owners, f"no package owns {program}"
        base = {o for o in owners if priority.get(o) in ("required", "important")}
        assert owners & direct or base, f"{program} ({', '.join(owners)}) is not asked for by install.sh --test"


def readme_first_command() -> str:
    text = (ROOT / "README.md").read_text()
    return re.search(r"```sh\n(.*?)\n```", text, re.S)[1].strip()


def test_the_readme_first_command_installs_and_stages_without_the_test_extras(tmp_path):
    command = readme_first_command()
    assert command.startswith("./install.sh && "), command
    clone = clone_head(tmp_path)
    env, log = stub_path(tmp_path, python=False)
    res = subprocess.run(["bash", "-c", command], cwd=clone, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "staged     6.2.9200.16384-x64" in res.stdout, res.stdout
    venv = clone / ".venv" / "bin" / "python"
    for module in ("pytest", "hypothesis"):  # the test extras are not installed
        assert subprocess.run([venv, "-c", f"import {module}"], capture_output=True).returncode != 0, module
    doctor = subprocess.run([clone / ".venv" / "bin" / "vhdtool", "doctor"], capture_output=True, text=True)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    # judged by others: qemu-img on the container, ntfscat on the staged cab
    image = clone / "demo" / "ws2008r2-x64.vhdx"
    check = subprocess.run(["qemu-img", "check", "-f", "vhdx", image], capture_output=True, text=True)
    assert check.returncode == 0 and "No errors were found" in check.stdout, check.stdout + check.stderr
    cab = clone / "demo" / "vmguest" / "Windows6.1-HyperVIntegrationServices-x64.cab"
    volume = partition_volume(image, tmp_path, 2)
    staged = ntfscat(volume, f"/Windows/vhdtool/6.2.9200.16384-x64/{cab.name}")
    assert staged == cab.read_bytes()
    assert b"dism" in ntfscat(volume, "/Windows/vhdtool/6.2.9200.16384-x64/install.cmd").lower()
