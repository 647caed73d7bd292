"""The package as a whole: every subpackage listed in pyproject.toml, the data installs, imports point
down the layers, and exit codes live in vhdtool/errors.py alone. (Import cycles, module and
function sizes: tests/test_structure.py.)"""

from __future__ import annotations

import fnmatch
import importlib.resources
import json
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from test_structure import import_graph

try:
    import tomllib  # Python 3.11+
except ModuleNotFoundError:  # Python 3.10: the test extra brings tomli, the same parser
    import tomli as tomllib

PACKAGE = ROOT / "vhdtool"


def test_every_subpackage_is_listed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"vhdtool." + ".".join(p.parent.relative_to(PACKAGE).parts) if p.parent != PACKAGE else "vhdtool"
             for p in PACKAGE.rglob("__init__.py")}
    assert found | {"vhdtool.cabs"} == listed


def test_matrix_is_package_data():
    """cabs/ installs as vhdtool.cabs with every data file vhdtool loads from it, and what the installed
    package reads is the repository's matrix."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"]["vhdtool.cabs"] == "cabs"
    patterns = config["package-data"]["vhdtool.cabs"]
    data = sorted(p.name for p in (ROOT / "cabs").iterdir() if p.is_file() and p.suffix != ".py")
    assert data == ["matrix.json"] and all(any(fnmatch.fnmatch(n, pat) for pat in patterns) for n in data), patterns
    installed = importlib.resources.files("vhdtool.cabs").joinpath("matrix.json").read_bytes()
    assert installed == (ROOT / "cabs" / "matrix.json").read_bytes()
    matrix = json.loads(installed)
    assert sorted(matrix["hosts"]) == ["win10", "win8", "win8.1"]
    assert matrix["default_revision"] in matrix["revisions"]


LAYERS = ["units", "errors", "native", "container", "volume", "filesystem", "registry", "guest", "editor",
          "cabinet", "iso", "plan", "stage", "fleet", "cli"]


def test_imports_point_down_the_layers():
    # docs/ARCHITECTURE.md, "Layers": each layer imports only the layers below it. cabinet and iso
    # are sources for plan; they sit above guest only for ordering's sake and import neither.
    rank = {name: i for i, name in enumerate(LAYERS)}

    def layer(module: str) -> str | None:
        parts = module.split(".")
        return parts[1] if len(parts) > 1 and parts[1] in rank else None

    upward = []
    for module, targets in import_graph().items():
        here = layer(module)
        for t in targets:
            there = layer(t)
            if here and there and rank[there] > rank[here]:
                upward.append(f"{module} -> {t}")
    assert not upward, upward


EXIT_CODE = re.compile(r"exit_code\s*=\s*\d|(?:sys\.exit|_exit|typer\.Exit|SystemExit)\(\s*\d")


def test_exit_codes_are_defined_only_in_errors_py():
    strays = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "errors.py" and path.parent == PACKAGE:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if EXIT_CODE.search(line):
                strays.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not strays, strays
    assert EXIT_CODE.search("    exit_code = 12") and EXIT_CODE.search("sys.exit(130)")


def test_internal_and_interrupt_codes_are_no_error_types_codes():
    from vhdtool import errors

    kinds = {}
    for name in dir(errors):
        cls = getattr(errors, name)
        if isinstance(cls, type) and issubclass(cls, errors.VhdtoolError) and cls is not errors.VhdtoolError:
            kinds.setdefault(cls.exit_code, set()).add(name)
    codes = set(kinds) | {errors.EXIT_INTERNAL_ERROR, errors.EXIT_INTERRUPTED}
    assert len(codes) == len(kinds) + 2, kinds


def test_version_flag():
    from vhdtool import __version__

    out = subprocess.run([sys.executable, "-m", "vhdtool.cli.main", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout == f"vhdtool {__version__}\n"


@pytest.mark.parametrize("command", [[], ["inspect"], ["matrix"], ["plan"], ["copy-in"], ["services"], ["stage"], ["status"],
                                     ["batch"], ["report"], ["doctor"], *(["batch", c] for c in ("inspect", "plan", "stage",
                                                                                     "status", "services"))])
def test_help_fits_80_columns_without_type_markers(command):
    env = {"COLUMNS": "80", "PATH": "/usr/bin:/bin", "TERM": "xterm"}
    out = subprocess.run([sys.executable, "-m", "vhdtool.cli.main", *command, "--help"],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines and all(len(line) <= 80 for line in lines), out.stdout
    # Type markers such as "<bool>" or "<list[Path]>" say nothing to a user.
    assert not re.search(r"<\w+(\[\w+\])?>", out.stdout), out.stdout
    commands = ("inspect", "matrix", "plan", "copy-in", "services", "stage", "status", "batch", "report", "doctor")
    assert "..." not in "".join(l for l in lines if l.startswith("  ") and l.strip().split()[0] in commands)
