"""``vhdtool doctor``: judged by the system's own tools (ldconfig, dpkg, debugfs, getconf), and with a library
really hidden from the loader: an empty file bind-mounted over it in a private mount namespace (unshare -m),
so that dlopen itself fails there, as on a machine without the package."""

from __future__ import annotations

import json
import lzma
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT
from vhdtool.native.libraries import LIBC, LIBCOM_ERR, LIBEXT2FS, LIBHIVEX, LIBMSPACK, LIBNTFS_3G, LIBRARIES

VHDTOOL = [sys.executable, "-m", "vhdtool.cli.main"]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def ldconfig_paths() -> dict[str, str]:
    """soname -> path, as the loader's cache lists them (this Python's multiarch folder first)."""
    out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=True).stdout
    multiarch = f"/{getattr(sys.implementation, '_multiarch', '')}/"
    paths: dict[str, str] = {}
    for m in re.finditer(r"^\s*(\S+) \([^)]*\) => (\S+)$", out, re.M):
        if m[1] not in paths or (multiarch in m[2] and multiarch not in paths[m[1]]):
            paths[m[1]] = m[2]
    return paths


def vhdtool(*args: str, hide: str | None = None, tmp_path=None) -> subprocess.CompletedProcess:
    """vhdtool ``args`` in a subprocess; with ``hide``, that library file is an empty file there."""
    cmd = [*VHDTOOL, *args]
    if hide is not None:
        empty = tmp_path / "empty.so"
        empty.write_bytes(b"")
        cmd = ["unshare", "-m", "sh", "-c", 'mount --bind "$1" "$2" && shift 2 && exec "$@"', "sh",
               str(empty), os.path.realpath(hide), *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=60)


def doctor(*args: str, **kw) -> subprocess.CompletedProcess:
    return vhdtool("doctor", *args, **kw)


def test_every_library_is_found_where_the_loader_finds_it():
    res = doctor("--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["schema"] == 1 and doc["ok"] is True and doc["programs"] == []
    cache = ldconfig_paths()
    by_soname = {lib["soname"]: lib for lib in doc["libraries"]}
    assert list(by_soname) == [lib.soname for lib in LIBRARIES]
    for soname, lib in by_soname.items():
        assert lib["found"] is True, lib
        # the same file the loader's cache names (paths may differ by a /lib -> /usr/lib link)
        assert os.path.realpath(lib["path"]) == os.path.realpath(cache[soname]), lib
        assert lib["commands"] and lib["packages"]["debian"] and lib["packages"]["fedora"]


def test_versions_are_what_the_libraries_tell():
    libs = {lib["soname"]: lib for lib in json.loads(doctor("--json").stdout)["libraries"]}
    # libext2fs's own call, judged by e2fsck, which prints the version of the library it runs with
    e2fsck = subprocess.run(["e2fsck", "-V"], capture_output=True, text=True).stderr
    version, date = re.search(r"EXT2FS Library version (\S+), (\S+)", e2fsck).groups()
    assert libs[LIBEXT2FS.soname]["version"] == f"{version} ({date})"
    glibc = subprocess.run(["getconf", "GNU_LIBC_VERSION"], capture_output=True, text=True, check=True).stdout
    assert libs[LIBC.soname]["version"] == glibc.split()[1]
    # no version call: said so, never a version from elsewhere
    assert libs[LIBHIVEX.soname]["version"] is None and "no version call" in libs[LIBHIVEX.soname]["version_from"]
    assert libs[LIBMSPACK.soname]["version"] is None and "interface version" in libs[LIBMSPACK.soname]["version_from"]


@pytest.mark.skipif(not shutil.which("dpkg"), reason="dpkg: a Debian/Ubuntu system")
def test_the_debian_package_named_is_the_one_that_owns_the_file():
    libs = json.loads(doctor("--json").stdout)["libraries"]
    for lib in libs:
        owner = subprocess.run(["dpkg", "-S", lib["path"]], capture_output=True, text=True)
        if owner.returncode != 0:  # dpkg knows the file under the other spelling of a merged /usr
            other = lib["path"].replace("/usr/lib/", "/lib/", 1) if lib["path"].startswith("/usr/") \
                else "/usr" + lib["path"]
            owner = subprocess.run(["dpkg", "-S", other], capture_output=True, text=True)
        assert owner.returncode == 0, (lib, owner.stderr)
        packages = {line.split(":")[0] for line in owner.stdout.splitlines()}
        assert lib["packages"]["debian"] in packages, (lib, owner.stdout)


def test_text_report_names_every_library_and_package():
    res = doctor()
    assert res.returncode == 0, res.stderr
    for lib in LIBRARIES:
        assert f"{lib.soname}: found" in res.stdout
        assert f"{lib.debian} (Debian/Ubuntu), {lib.fedora} (Fedora/RHEL)" in res.stdout
    assert f"{len(LIBRARIES)} of {len(LIBRARIES)} libraries found" in res.stdout


def _can_hide() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


needs_namespace = pytest.mark.skipif(not _can_hide(), reason="needs root and unshare -m (a private mount namespace)")


@needs_namespace
@pytest.mark.parametrize("library", [LIBNTFS_3G, LIBHIVEX, LIBMSPACK, LIBEXT2FS, LIBCOM_ERR], ids=lambda lib: lib.name)
def test_a_hidden_library_exits_14_naming_its_package(tmp_path, library):
    path = ldconfig_paths()[library.soname]
    res = doctor(hide=path, tmp_path=tmp_path)
    assert res.returncode == 14, (res.stdout, res.stderr)
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("vhdtool: "), err
    assert f"{library.name} " in err and library.debian in err and library.fedora in err, err
    assert f"{library.soname}: MISSING" in res.stdout
    if library is LIBCOM_ERR:  # libext2fs links libcom_err: it cannot load without it
        assert f"{LIBEXT2FS.soname}: MISSING" in res.stdout
    res = doctor("--json", hide=path, tmp_path=tmp_path)
    assert res.returncode == 14
    doc = json.loads(res.stdout)
    found = {lib["soname"]: lib["found"] for lib in doc["libraries"]}
    assert doc["ok"] is False and found[library.soname] is False
    assert found[LIBC.soname] and found[LIBNTFS_3G.soname] != (library is LIBNTFS_3G)


@needs_namespace
def test_the_commands_named_are_those_that_need_the_library(tmp_path):
    """Without libhivex (doctor: stage, services), inspect and plan still work and stage exits 14."""
    image = tmp_path / "demo.vhdx"
    with lzma.open(ROOT / "demo" / "ws2008r2-x64.vhdx.xz") as fi, open(image, "wb") as fo:
        shutil.copyfileobj(fi, fo)
    before = image.read_bytes()
    hivex = ldconfig_paths()[LIBHIVEX.soname]
    cabs = str(ROOT / "demo" / "vmguest")
    assert vhdtool("inspect", str(image), hide=hivex, tmp_path=tmp_path).returncode == 0
    res = vhdtool("plan", str(image), "--host", "auto", "--cabs", cabs, hide=hivex, tmp_path=tmp_path)
    assert res.returncode == 0, res.stderr
    res = vhdtool("stage", str(image), "--host", "auto", "--cabs", cabs, hide=hivex, tmp_path=tmp_path)
    assert res.returncode == 14 and LIBHIVEX.debian in res.stderr, res.stderr
    assert image.read_bytes() == before
    # and plan --cabs is the command that needs libmspack
    res = vhdtool("plan", str(image), "--host", "auto", "--cabs", cabs,
                 hide=ldconfig_paths()[LIBMSPACK.soname], tmp_path=tmp_path)
    assert res.returncode == 14 and LIBMSPACK.debian in res.stderr, res.stderr


def test_the_readme_install_commands_name_the_tables_packages():
    """The README's apt-get and dnf lines install every library of the table (libc aside: every system has it)."""
    text = (ROOT / "README.md").read_text()
    apt = re.search(r"^sudo apt-get install (.*?)\s+#", text, re.M)[1].split()
    dnf = re.search(r"^sudo dnf install (.*?)\s+#", text, re.M)[1].split()
    assert apt == [lib.debian for lib in LIBRARIES if lib is not LIBC]
    assert dnf == [lib.fedora for lib in LIBRARIES if lib is not LIBC]
