"""The package as a whole: every subpackage listed in pyproject.toml, the data installs, imports point
downward with no cycle, and exit codes live in vhdtool/errors.py alone."""

from __future__ import annotations

import ast
import importlib.resources
import json
import re
import subprocess
import sys

import pytest

from conftest import ROOT

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

PACKAGE = ROOT / "vhdtool"


def test_every_subpackage_is_listed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"vhdtool." + ".".join(p.parent.relative_to(PACKAGE).parts) if p.parent != PACKAGE else "vhdtool"
             for p in PACKAGE.rglob("__init__.py")}
    assert found | {"vhdtool.cabs"} == listed


def test_matrix_is_package_data():
    json.loads(importlib.resources.files("vhdtool.cabs").joinpath("matrix.json").read_text())


def module_name(path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def vhdtool_imports() -> dict[str, set[str]]:
    """Module -> the vhdtool modules it imports (at any depth of its code: lazy imports count too)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                for a in node.names:
                    # "from vhdtool.x import y" imports the module vhdtool.x.y when there is one.
                    targets.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            # A package importing its own submodules (to re-export them) is how packages work,
            # and a submodule importing its parent package's siblings is not a loop through it.
            if nxt.startswith(node + "."):
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "p": {"p.x"}, "p.x": {"a"}}) is None


def test_no_import_cycle_inside_vhdtool():
    graph = vhdtool_imports()
    assert "vhdtool.container.chain" in graph and graph["vhdtool.guest.discover"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


LAYERS = ["units", "errors", "native", "container", "volume", "filesystem", "registry", "guest", "editor",
          "cabinet", "iso", "plan", "stage", "fleet", "cli"]


def test_imports_point_down_the_layers():
    # DESIGN.md: each layer imports only the layers below it. cabinet and iso are sources
    # for plan; they sit above guest only for ordering's sake and import neither guest nor plan.
    rank = {name: i for i, name in enumerate(LAYERS)}

    def layer(module: str) -> str | None:
        parts = module.split(".")
        return parts[1] if len(parts) > 1 and parts[1] in rank else None

    upward = []
    for module, targets in vhdtool_imports().items():
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
                                     ["batch"], ["report"], *(["batch", c] for c in ("inspect", "plan", "stage",
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
    commands = ("inspect", "matrix", "plan", "copy-in", "services", "stage", "status", "batch", "report")
    assert "..." not in "".join(l for l in lines if l.startswith("  ") and l.strip().split()[0] in commands)
