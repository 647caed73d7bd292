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
