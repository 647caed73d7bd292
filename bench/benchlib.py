"""What the bench scripts share: a script beside this one as a module, sparse copies, libguestfs's check.

The scripts import it as ``benchlib``: this folder is on ``sys.path`` whether a script
runs alone (``python3 bench/stage.py``) or is loaded by bench/run.py.
"""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def load(name: str):
    """The script ``bench/<name>.py`` as a module (named ``bench_<name>``, so that it shadows nothing)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def precompile() -> None:
    """Compile vhdtool's modules to bytecode once, as an installed package is, so that the figures do
    not include compiling its sources at every start (PYTHONDONTWRITEBYTECODE, set on some machines,
    would otherwise make every run compile them: about 0.3 s)."""
    import compileall

    compileall.compile_dir(str(Path(__file__).resolve().parent.parent / "vhdtool"), quiet=1)


def sparse_copy(src: Path, dst: Path) -> None:
    """A copy that allocates what the source allocates (a reflink where the filesystem has them)."""
    subprocess.run(["cp", "--sparse=always", "--reflink=auto", str(src), str(dst)], check=True)


def guestfs_setup() -> tuple[bool, str]:
    """Whether libguestfs can run here, and how (bench/guestfs.py)."""
    return load("guestfs").setup()
