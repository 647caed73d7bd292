"""Fuzz .msu reading: damaged and odd .msu files (built with gcab) give a candidate or a one-line error.

Each case goes through ``load_sources``, as `plan --cabs` reads an .msu: the outer cab listed and the
package cab and pkgProperties.txt extracted by libmspack, then the package cab read. Only a VhdtoolError
may escape, with a one-line message; the temporary copy of the package cab is removed whatever happens
(TMPDIR is watched). Byte damage hits the .msu gcab made (flips, random bytes, insertions, deletions,
truncations); structural variants are made by gcab itself (no package cab, two, a name with a folder,
pkgProperties.txt huge, empty or garbage, an .msu inside the .msu, a damaged package cab inside an
intact .msu). VHDTOOL_MSU_FUZZ_EXAMPLES sets the byte-damage cases of the full sweep (default 2000,
marked slow); the default run makes a tenth of them.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path

import pytest

from conftest import SWEEPS, sweep_count
from test_msu import build_msu, gcab
from vhdtool.errors import VhdtoolError
from vhdtool.plan.sources import load_sources

EXAMPLES = int(os.environ.get("VHDTOOL_MSU_FUZZ_EXAMPLES", "2000"))
STEM = "Windows6.1-KB3071740-x64"


@pytest.fixture()
def watched_tmp(tmp_path, monkeypatch):
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    assert tempfile.gettempdir() == str(tmp)  # where package_cab's copy goes
    return tmp


def read_as_plan(path: Path, tmp: Path, what: str) -> None:
    start = time.perf_counter()
    try:
        catalog = load_sources([path])
    except VhdtoolError as e:
        assert e.message and "\n" not in e.message, (what, e.message)
    else:
        for c in catalog.candidates:
            assert c.problem is None or "\n" not in c.problem, (what, c.problem)
    assert time.perf_counter() - start < 5, what
    assert not list(tmp.iterdir()), (what, list(tmp.iterdir()))  # the package cab's copy is gone


@pytest.fixture(scope="module")
def good_msu(tmp_path_factory):
    msu, inner = build_msu(tmp_path_factory.mktemp("msufuzz") / "base")
    return msu.read_bytes(), inner


@pytest.mark.parametrize("sweep", SWEEPS)
def test_damaged_msu_gives_a_candidate_or_a_one_line_error(good_msu, watched_tmp, tmp_path, sweep):
    data, _ = good_msu
    rng = random.Random("msu")
    path = tmp_path / f"{STEM}.msu"
    for n in range(sweep_count(EXAMPLES, sweep, EXAMPLES // 10)):
        b = bytearray(data)
        kind = rng.choice(["flip", "byte", "insert", "delete", "truncate", "header"])
        at = rng.randrange(64 if kind == "header" else len(b))
        if kind in ("flip", "header"):
            for _ in range(rng.randint(1, 4)):
                b[at] ^= 1 << rng.randrange(8)
                at = rng.randrange(len(b)) if kind == "flip" else rng.randrange(64)
        elif kind == "byte":
            b[at] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
        elif kind == "insert":
            b[at:at] = rng.randbytes(rng.randint(1, 32))
        elif kind == "delete":
            del b[at : at + rng.randint(1, 32)]
        else:
            del b[at:]
        path.write_bytes(bytes(b))
        read_as_plan(path, watched_tmp, f"case {n}: {kind}@{at}")


def _variant(tmp: Path, inner: Path, kind: str) -> Path:
    parts = tmp / f"parts-{kind}"
    parts.mkdir()
    members = []

    def put(name: str, data: bytes) -> None:
        (parts / name).parent.mkdir(parents=True, exist_ok=True)
        (parts / name).write_bytes(data)
        members.append(name)

    cab = inner.read_bytes()
    props = b"\xff\xfe" + 'KB Article Number="3071740"\r\n'.encode("utf-16-le")
    if kind == "no-package":
        put(f"{STEM}-pkgProperties.txt", props)
    elif kind == "two-packages":
        put(f"{STEM}.cab", cab)
        put("Windows6.1-KB3071741-x64.cab", cab)
    elif kind == "folder-name":
        put(f"sub/{STEM}.cab", cab)
    elif kind == "huge-properties":
        put(f"{STEM}.cab", cab)
        put(f"{STEM}-pkgProperties.txt", b"\xff\xfe" + ("x" * 200_000 + "\r\n").encode("utf-16-le") + props[2:])
    elif kind == "garbage-properties":
        put(f"{STEM}.cab", cab)
        put(f"{STEM}-pkgProperties.txt", b"\xfe\xff\xd8\x00" + os.urandom(999) + b'KB Article Number="9' + b"9" * 50)
    elif kind == "empty-properties":
        put(f"{STEM}.cab", cab)
        put(f"{STEM}-pkgProperties.txt", b"")
    elif kind == "two-properties":
        put(f"{STEM}.cab", cab)
        put(f"{STEM}-pkgProperties.txt", props)
        put(f"a{STEM}-pkgProperties.txt", b"\xff\xfe" + 'KB Article Number="1"'.encode("utf-16-le"))
    elif kind == "nested-msu":
        inner_msu = gcab(tmp / "inner.msu", inner.parent, [inner.name])
        put(f"{STEM}.cab", inner_msu.read_bytes())
    elif kind == "damaged-package":
        bad = bytearray(cab)
        bad[len(bad) // 2 : len(bad) // 2 + 64] = b"\xa5" * 64
        put(f"{STEM}.cab", bytes(bad))
    elif kind == "not-a-cab":
        put(f"{STEM}.cab", b"MSCF" + os.urandom(4000))
    elif kind == "empty-package":
        put(f"{STEM}.cab", b"")
    return gcab(tmp / f"{STEM}-{kind}.msu", parts, members)


VARIANTS = ["no-package", "two-packages", "folder-name", "huge-properties", "garbage-properties",
            "empty-properties", "two-properties", "nested-msu", "damaged-package", "not-a-cab", "empty-package"]


@pytest.mark.parametrize("kind", VARIANTS)
def test_odd_msu_layouts_give_a_candidate_or_a_one_line_error(good_msu, watched_tmp, tmp_path, kind):
    _, inner = good_msu
    msu = _variant(tmp_path, inner, kind)
    renamed = msu.with_name(f"{STEM}.msu")
    shutil.move(msu, renamed)
    read_as_plan(renamed, watched_tmp, kind)
