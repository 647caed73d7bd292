"""Every vhdtool package is listed in pyproject.toml, and the data package installs."""

from __future__ import annotations

import importlib.resources
import json

import pytest

from conftest import ROOT

tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def test_every_subpackage_is_listed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"vhdtool." + ".".join(p.parent.relative_to(ROOT / "vhdtool").parts) if p.parent != ROOT / "vhdtool" else "vhdtool"
             for p in (ROOT / "vhdtool").rglob("__init__.py")}
    assert found | {"vhdtool.cabs"} == listed


def test_matrix_and_catalog_are_package_data():
    for name in ("matrix.json", "catalog.json"):
        json.loads(importlib.resources.files("vhdtool.cabs").joinpath(name).read_text())
