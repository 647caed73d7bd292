"""The shape of the code (docs/ARCHITECTURE.md, "Layers"): no module of vhdtool/ over 450 lines, no
import cycle among vhdtool's modules (imports inside functions included), and no function in the
write path over 80 lines.

Everything is read with ``ast`` from the source files: nothing of vhdtool is imported, so a cycle
that would only bite at run time (a lazy import inside a function) is found as well.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "vhdtool"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80

# The write path: the code that decides and makes a change to a user's image, and the batch that
# runs it (its signals and worker kills decide where a write is cut short). In vhdtool/registry/
# everything but the read-only reader is in it, so a module split out of the hive editor or the
# log replay is checked without being listed here.
WRITE_PATH_PACKAGES = ("container", "editor", "stage", "fleet")
WRITE_PATH_MODULES = ("filesystem/ntfs3g.py", "filesystem/ntfsdevice.py", "filesystem/ntfsbitmap.py",
                      "filesystem/freebits.py", "filesystem/ntfsanswer.py", "filesystem/ntfsacl.py", "filesystem/ext2fs.py", "filesystem/ext2fsio.py", "filesystem/answer.py",
                      "filesystem/ext2stream.py", "filesystem/extbitmap.py")
REGISTRY_READER = ("__init__.py", "cells.py", "keys.py", "records.py")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The vhdtool modules ``name`` imports anywhere in its code, relative imports resolved.

    ``from P import x`` imports the module P.x when there is one, else it takes x from P itself (an
    edge to P, even when P is this module's own package). ``import P.Q`` and ``from P.Q import x``
    are edges to P.Q only: that Python runs P's __init__ first is not counted, or every package
    whose __init__ imports a submodule would be a cycle."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                up = up[: len(up) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}" if base else alias.name
                found.add(sub if sub in known else base)
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    """Module -> the vhdtool modules it imports, lazy imports included."""
    found = modules()
    known = set(found)
    return {name: imported_modules(name, path, known) for name, path in found.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as [a, b, ..., a], or None. Every edge counts, a package's to its own submodules too."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def all_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles until none is left, each reported once: after one is found, its closing edge is set aside."""
    graph = {k: set(v) for k, v in graph.items()}
    cycles = []
    while (cycle := find_cycle(graph)) is not None and len(cycles) < 20:
        cycles.append(cycle)
        graph[cycle[-2]].discard(cycle[-1])
    return cycles


def in_write_path(path: Path) -> bool:
    rel = path.relative_to(PACKAGE)
    if rel.parts[0] in WRITE_PATH_PACKAGES or rel.as_posix() in WRITE_PATH_MODULES:
        return True
    return rel.parts[0] == "registry" and len(rel.parts) == 2 and rel.name not in REGISTRY_READER


def function_lengths(path: Path) -> list[tuple[str, int, int]]:
    """(qualified name, first line, lines) of every function and method in ``path``, nested ones
    too; a function's lines run from its first decorator to its last line, docstring included."""
    found = []

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([child.lineno] + [d.lineno for d in child.decorator_list])
                found.append((prefix + child.name, first, child.end_lineno - first + 1))
                walk(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                walk(child, f"{prefix}{child.name}.")
            else:
                walk(child, prefix)

    walk(ast.parse(path.read_text(), str(path)), "")
    return found


# -- the checkers check something ----------------------------------------------------------------

def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    # A package's __init__ importing its own submodule is an edge like any other.
    assert find_cycle({"p": {"p.x"}, "p.x": {"p"}}) == ["p", "p.x", "p"]
    assert find_cycle({"p": {"p.x"}, "p.x": {"p.y"}, "p.y": set()}) is None
    assert all_cycles({"a": {"b", "c"}, "b": {"a"}, "c": {"a"}}) == [["a", "b", "a"], ["a", "c", "a"]]


def test_imports_are_read_from_every_depth_and_resolved(tmp_path):
    pkg = tmp_path / "p"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("def __getattr__(name):\n    from p import sub\n    return sub\n")
    (pkg / "sub.py").write_text("from . import helper\n\ndef f():\n    from p import thing\n")
    (pkg / "helper.py").write_text("import p.sub as s\n")
    known = {"p", "p.sub", "p.helper"}
    assert imported_modules("p", pkg / "__init__.py", known) == {"p.sub"}
    assert imported_modules("p.sub", pkg / "sub.py", known) == {"p.helper", "p"}
    assert imported_modules("p.helper", pkg / "helper.py", known) == {"p.sub"}


def test_function_lengths_count_decorators_docstrings_and_nesting(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("@dec\ndef f():\n    '''doc'''\n    def g():\n        pass\n    return g\n\n"
                      "class C:\n    def m(self):\n        return 1\n")
    assert function_lengths(source) == [("f", 1, 6), ("f.g", 4, 2), ("C.m", 9, 2)]


def test_the_graph_sees_vhdtool():
    graph = import_graph()
    assert "vhdtool.container.vhdx.writer" in graph
    assert "vhdtool.container.vhdx.log" in graph["vhdtool.container.vhdx.writer"]
    assert "vhdtool.errors" in graph["vhdtool.container.chain"]
    # A lazy import inside a function is seen (vhdtool.container.commit imports the writers in one).
    assert "vhdtool.container.vhdx.writer" in graph["vhdtool.container.commit"]
    assert any(in_write_path(p) for p in modules().values())
    assert not in_write_path(PACKAGE / "registry" / "keys.py") and in_write_path(PACKAGE / "registry" / "logreplay.py")


# -- the targets ---------------------------------------------------------------------------------

def test_no_module_over_450_lines():
    long = [f"{p.relative_to(ROOT)}: {n} lines" for p in modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them by concern): " + "; ".join(long)


def test_no_import_cycle_lazy_imports_included():
    cycles = all_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("area", ["container", "filesystem/ntfs3g.py", "filesystem/ext2fs.py", "filesystem/ext2fsio.py",
                                  "filesystem/answer.py", "registry", "editor", "stage", "fleet"])
def test_no_function_in_the_write_path_over_80_lines(area):
    files = [p for p in modules().values() if in_write_path(p) and p.relative_to(PACKAGE).as_posix().startswith(area)]
    assert files, f"nothing of vhdtool/{area} is in the write path"
    long = [f"{p.relative_to(ROOT)}:{line} {name}(): {n} lines"
            for p in files for name, line, n in function_lengths(p) if n > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines in the write path: " + "; ".join(long)
