from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import lzma
import os
import shutil
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parent.parent
REAL = ROOT / "fixtures" / "real"
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
# The judges' own asserts explain their failures too, whichever test imports them first.
pytest.register_assert_rewrite("judges")

OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def decompress(src: Path, dest_dir: Path) -> Path:
    """A decompressed copy of a compressed real file (never decompressed in place)."""
    opener = OPENERS.get(src.suffix)
    dest = dest_dir / (src.stem if opener else src.name)
    if not dest.exists():
        tmp = dest.with_suffix(dest.suffix + ".tmp")
        with (opener(src, "rb") if opener else open(src, "rb")) as fi, open(tmp, "wb") as fo:
            shutil.copyfileobj(fi, fo)
        tmp.replace(dest)
    return dest


@pytest.fixture(scope="session")
def real_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("real")


@pytest.fixture(scope="session")
def real(real_dir):
    """real("vhdx/fixed.vhdx.gz") -> decompressed path of fixtures/real/<that>."""

    def get(name: str) -> Path:
        src = REAL / name
        if not src.exists():
            matches = sorted(REAL.rglob(Path(name).name))
            assert matches, f"missing real test file {name} under {REAL}"
            src = matches[0]
        return decompress(src, real_dir)

    return get


@contextlib.contextmanager
def held_by_qemu(path, fmt: str):
    """qemu-io with ``path`` open, holding QEMU's image locks as a running VM would."""
    import subprocess
    import time

    holder = subprocess.Popen(["qemu-io", "-f", fmt, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)  # qemu-io has opened and locked the image by then
        yield holder
    finally:
        holder.kill()
        holder.wait()


def digest(path: Path) -> str:
    """sha256 of a whole file: how tests show an image byte-identical."""
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def work_copy(name: str, tmp: Path) -> Path:
    """A copy in ``tmp`` of fixture image ``name`` (built or taken from the cache), for a test to write."""
    from fixtures import build as fb

    src = Path(fb.build(name))
    dst = tmp / src.name
    shutil.copyfile(src, dst)
    return dst


def run_cli(*args: str) -> tuple[int, str, str]:
    """Run the vhdtool CLI in process; returns (exit code, stdout, stderr)."""
    from vhdtool.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with redirect_stdout(out), redirect_stderr(err), mock.patch.object(sys, "argv", ["vhdtool", *map(str, args)]):
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def cli():
    return run_cli


def assert_one_line_error(code: int, out: str, err: str, path) -> None:
    assert code != 0
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert str(path) in lines[0], err
    assert lines[0].startswith("vhdtool: ")
    assert "Traceback" not in err and "Traceback" not in out


# -- the long sweeps: full behind the `slow` marker, a reduced one by default ------------------------
#
# A crash sweep kills the writer at every write and flush system call and at many random times; a
# fuzzer runs thousands of cases. Each such test is parametrised with SWEEPS: "reduced" runs by
# default and still reaches every crash path (the first, middle and last call of each kind, a few
# random kills, a tenth of the fuzz cases); "full" is marked slow and runs with `-m slow` or
# VHDTOOL_SLOW=1. The default run deselects slow tests (pytest_configure below) so that it stays
# within CI's 15 minutes on 2 cores.

REDUCED, FULL = "reduced", "full"
SWEEPS = [REDUCED, pytest.param(FULL, marks=pytest.mark.slow)]
REDUCED_RANDOM_KILLS = 3


def sweep_points(points: list[tuple], sweep: str) -> list[tuple]:
    """Kill points (syscall name, call number, ...) for a sweep: all of them for the full one; for the
    reduced one the first, middle and last call of each syscall, in the order given."""
    if sweep == FULL:
        return list(points)
    by_name: dict = {}
    for point in points:
        by_name.setdefault(point[0], []).append(point)
    keep = {p for calls in by_name.values() for p in (calls[0], calls[len(calls) // 2], calls[-1])}
    return [p for p in points if p in keep]


def sweep_count(full: int, sweep: str, reduced: int = REDUCED_RANDOM_KILLS) -> int:
    """How many random kills (or fuzz cases) a sweep makes: ``full`` or at most ``reduced``."""
    return full if sweep == FULL else min(full, reduced)


def pytest_configure(config):
    # Slow tests are deselected unless asked for: `-m slow` (or any -m), VHDTOOL_SLOW=1, or a test
    # named by node id (tests/x.py::test_y[full]).
    explicit = any("::" in str(arg) for arg in config.args)
    if not config.option.markexpr and not os.environ.get("VHDTOOL_SLOW") and not explicit:
        config.option.markexpr = "not slow"


@pytest.fixture(scope="session")
def wine(tmp_path_factory):
    """One Wine prefix for the session's boot simulations (tests/wine_boot.py); skipped where Wine cannot run."""
    import wine_boot
    from wine_boot import WinePrefix, WineUnusable

    reason = wine_boot.missing_tools()
    if reason:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("wine")
    try:
        prefix = WinePrefix.create(base / "prefix", base / "stubs")
    except WineUnusable as e:
        pytest.skip(f"Wine cannot run here: {e}")
    print(f"\n{prefix.version}: prefix made in {prefix.created_seconds:.1f} s; findstr: {prefix.findstr}")
    yield prefix
    prefix.close()
    shutil.rmtree(base / "prefix", ignore_errors=True)  # about 700 MB
