"""The demo image the README inspects is the ws2008r2-x64 fixture, and still reports its facts."""

from __future__ import annotations

import lzma
import shutil

from conftest import ROOT
from fixtures import build as fb
from test_inspect import assert_facts
from vhdtool import inspect


def test_demo_image_reports_the_fixture_facts(tmp_path):
    src = ROOT / "demo" / "ws2008r2-x64.vhdx.xz"
    out = tmp_path / "demo.vhdx"
    with lzma.open(src) as fi, open(out, "wb") as fo:
        shutil.copyfileobj(fi, fo)
    assert_facts(fb.FIXTURES["ws2008r2-x64"].facts, inspect(out).to_dict())


def test_the_readme_first_command_stages_the_demo(tmp_path):
    """README: `vhdtool stage demo/ws2008r2-x64.vhdx --host auto --cabs demo/vmguest` (here on a copy)."""
    import json
    import os
    import subprocess
    import sys

    src = ROOT / "demo" / "ws2008r2-x64.vhdx.xz"
    out = tmp_path / "ws2008r2-x64.vhdx"
    with lzma.open(src) as fi, open(out, "wb") as fo:
        shutil.copyfileobj(fi, fo)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "vhdtool.cli.main", "stage", str(out), "--host", "auto", "--cabs",
           str(ROOT / "demo" / "vmguest"), "--json"]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr
    doc = json.loads(first.stdout)
    assert (doc["host"], doc["action"], doc["staged"], doc["committed"]) == ("win8", "stage", True, True)
    again = subprocess.run(cmd, capture_output=True, text=True, env=env)  # the command can be run again
    assert again.returncode == 0 and json.loads(again.stdout)["bytes_written"] == 0
    res = subprocess.run(["qemu-img", "check", str(out)], capture_output=True, text=True)
    assert res.returncode == 0 and "No errors were found" in res.stdout
