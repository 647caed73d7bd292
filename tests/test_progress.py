"""Progress bars (vhdtool.progress): drawn on a terminal only, for long operations only, never costing a start-up.

The command-line tests run the real `vhdtool` with its stderr on a pseudo-terminal
(and, for the opposite case, on a pipe), with VHDTOOL_PROGRESS_MIN_BYTES and
VHDTOOL_PROGRESS_DELAY lowered so that the small fixtures cross the thresholds.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import pty
import select
import shutil
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from conftest import ROOT
from fixtures import build as fb
from fixtures.cabs import CabSpec, build_cab, build_iso
from vhdtool import progress
from vhdtool.iso import read_reporting

WIN8_IC = "6.2.9200.16384"
CAB = "Windows6.1-HyperVIntegrationServices-x64.cab"
FORCED = {"VHDTOOL_PROGRESS_MIN_BYTES": "1", "VHDTOOL_PROGRESS_DELAY": "0"}


# -- the helper ---------------------------------------------------------------------------

class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def on_terminal(monkeypatch) -> Terminal:
    """sys.stderr as a terminal that records what is drawn; no CI, default thresholds.

    Called from the test itself: pytest puts its own sys.stderr back between a fixture's setup and the test.
    """
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    for name in ("CI", "VHDTOOL_PROGRESS_MIN_BYTES", "VHDTOOL_PROGRESS_DELAY"):
        monkeypatch.delenv(name, raising=False)
    return term


def test_no_bar_off_a_terminal_or_in_ci(monkeypatch):
    on_terminal(monkeypatch)
    assert type(progress.bar("x", 1 << 40)) is progress.Progress
    monkeypatch.setenv("CI", "true")
    assert progress.bar("x", 1 << 40) is progress.NO_PROGRESS
    assert progress.phase("x", 1 << 40) is progress.NO_PROGRESS
    monkeypatch.delenv("CI")
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert progress.bar("x", 1 << 40) is progress.NO_PROGRESS


def test_small_amounts_get_no_bar(monkeypatch):
    terminal = on_terminal(monkeypatch)
    assert progress.bar("x", progress.MIN_BYTES - 1) is progress.NO_PROGRESS
    assert progress.phase("x", progress.MIN_BYTES - 1) is progress.NO_PROGRESS
    monkeypatch.setenv("VHDTOOL_PROGRESS_MIN_BYTES", "10")
    assert type(progress.bar("x", 10)) is progress.Progress
    monkeypatch.setenv("VHDTOOL_PROGRESS_MIN_BYTES", "not a number")
    assert progress.min_bytes() == progress.MIN_BYTES
    # A total learnt later is held to the same floor.
    with progress.bar("x", None) as later:
        monkeypatch.setattr(later, "delay", 0)
        assert later(5, 100) is False and not later.shown and terminal.getvalue() == ""


def test_bar_appears_only_after_the_delay(monkeypatch):
    terminal = on_terminal(monkeypatch)
    total = 4 * progress.MIN_BYTES
    with progress.bar("reading big.cab", total) as bar:
        bar(total // 4)
        assert not bar.shown and terminal.getvalue() == ""
        bar._started -= progress.DELAY  # as if it had run that long
        bar._started_wall -= progress.DELAY
        bar(total // 2)
        assert bar.shown
        drawn = terminal.getvalue()
        assert "reading big.cab:" in drawn and "%|" in drawn and "50%" in drawn
        assert "00:01" in drawn  # elapsed counts from the start of the operation, not from the bar
    assert terminal.getvalue().endswith("\r")  # leave=False: the line is cleared when done


def test_a_fast_operation_is_told_no_bar_will_come(monkeypatch):
    on_terminal(monkeypatch)
    total = 4 * progress.MIN_BYTES
    with progress.bar("x", total) as bar:
        assert bar(total // 100) is False  # at this pace it ends long before the delay
    with progress.bar("x", total) as bar:
        bar._started -= progress.DELAY / 2
        assert bar(total // 100) is True  # this one will not


def test_phase_shows_its_description_and_time(monkeypatch):
    terminal = on_terminal(monkeypatch)
    monkeypatch.setenv("VHDTOOL_PROGRESS_DELAY", "0.05")
    with progress.phase("writing 40.0 MiB to partition 2 (libntfs-3g)", progress.MIN_BYTES) as step:
        step.tick()
        assert not step.shown
        time.sleep(0.06)
        step.tick()
        step.tick()
        assert step.shown
    assert "writing 40.0 MiB to partition 2 (libntfs-3g) [00:00]" in terminal.getvalue()
    assert "%|" not in terminal.getvalue()


def test_ticking_draws_while_the_caller_blocks(monkeypatch):
    terminal = on_terminal(monkeypatch)
    monkeypatch.setenv("VHDTOOL_PROGRESS_DELAY", "0.1")
    with progress.bar("committing to x.vhdx", None) as bar, bar.ticking():
        bar(1, progress.MIN_BYTES)
        time.sleep(0.6)  # a flush
        assert bar.shown
    assert "committing to x.vhdx:" in terminal.getvalue()


@pytest.mark.parametrize("size", [0, 1, progress.MIN_BYTES // 7, 3 * 8 * 1024 * 1024 + 5])
@pytest.mark.parametrize("answer", [True, False])
def test_read_reporting_reads_everything(tmp_path, size, answer):
    data = os.urandom(size)
    path = tmp_path / "f"
    path.write_bytes(b"head" + data)
    seen = []
    with open(path, "rb") as f:
        f.read(4)
        got = read_reporting(f, size + 1, lambda done: seen.append(done) or answer)
    assert got == data
    assert seen and seen == sorted(seen) and seen[-1] <= size
    if answer:
        assert seen[-1] == size
    with open(path, "rb") as f:
        f.read(4)
        assert read_reporting(f, max(0, size - 1), lambda done: answer) == data[: max(0, size - 1)]


def test_size_text():
    assert progress.size_text(100) == "100 bytes"
    assert progress.size_text(100 * 1024 * 1024 + 1) == "100.0 MiB"


@pytest.mark.fixtures
def test_inspect_never_imports_tqdm():
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "vhdtool.cli.main", "inspect",
                          fb.build("ws2008r2-x64")], capture_output=True, text=True, cwd=ROOT, env=_env({}))
    assert res.returncode == 0, res.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in res.stderr.splitlines() if line.startswith("import time:")}
    assert "vhdtool.guest" in imported  # the import log is what it seems
    assert not {name for name in imported if name.split(".")[0] == "tqdm" or name == "vhdtool.progress"}


# -- the command, on a terminal -------------------------------------------------------------

def _env(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("CI", "VHDTOOL_PROGRESS_MIN_BYTES", "VHDTOOL_PROGRESS_DELAY")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def run_vhdtool(args, tty: bool, extra: dict, python_args=()) -> tuple[int, str, str]:
    """The real command with stderr on a pseudo-terminal (80x24) or a pipe; (exit code, stdout, stderr)."""
    cmd = [sys.executable, *python_args, "-m", "vhdtool.cli.main", *map(str, args)]
    if not tty:
        res = subprocess.run(cmd, capture_output=True, env=_env(extra), cwd=ROOT, timeout=300)
        return res.returncode, res.stdout.decode(), res.stderr.decode()
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave,
                            env=_env(extra), cwd=ROOT)
    os.close(slave)
    err = bytearray()
    out = bytearray()
    deadline = time.monotonic() + 300
    try:
        streams = {master: err, proc.stdout.fileno(): out}
        while streams and time.monotonic() < deadline:
            ready, _, _ = select.select(list(streams), [], [], 1)
            for fd in ready:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:  # EIO: the terminal's last user has closed it
                    chunk = b""
                if chunk:
                    streams[fd] += chunk
                else:
                    del streams[fd]
        code = proc.wait(timeout=max(1, deadline - time.monotonic()))
    finally:
        os.close(master)
        proc.stdout.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return code, out.decode(), err.decode(errors="replace")


@pytest.fixture(scope="module")
def iso(tmp_path_factory):
    return build_iso([CabSpec("6.1", "x64", WIN8_IC)], tmp_path_factory.mktemp("iso") / "vmguest.iso")


def work_copy(name: str, tmp: Path) -> Path:
    src = Path(fb.build(name))
    dst = tmp / src.name
    shutil.copyfile(src, dst)
    return dst


@pytest.mark.fixtures
def test_stage_on_a_terminal_shows_each_long_step(iso, tmp_path):
    image = work_copy("ws2008r2-x64", tmp_path)
    new = tmp_path / "staged.vhdx"
    code, out, err = run_vhdtool(["stage", "--json", image, "--host", "win8", "--cabs", iso, "--output", new],
                                 tty=True, extra=FORCED)
    assert code == 0, err
    assert json.loads(out)["staged"] and new.exists()
    assert "%|" in err
    assert f"reading {CAB}:" in err  # out of the ISO
    assert f"copying {image.name}:" in err
    assert "to partition 2 (libntfs-3g) [00:0" in err
    assert "committing to staged.vhdx:" in err
    assert "Traceback" not in err


@pytest.mark.fixtures
def test_stage_into_a_pipe_draws_nothing(iso, tmp_path):
    image = work_copy("ws2008r2-x64", tmp_path)
    code, out, err = run_vhdtool(["stage", image, "--host", "win8", "--cabs", iso, "--output", tmp_path / "new.vhdx"],
                                 tty=False, extra=FORCED)
    assert code == 0, err
    assert "action     stage" in out
    assert err == ""  # no bar, no stray carriage return


@pytest.mark.fixtures
def test_small_work_on_a_terminal_shows_nothing_and_imports_no_tqdm(iso, tmp_path):
    image = work_copy("ws2008r2-x64", tmp_path)
    code, out, err = run_vhdtool(["stage", image, "--host", "win8", "--cabs", iso], tty=True, extra={},
                                 python_args=("-X", "importtime"))
    assert code == 0, err
    lines = [line for line in err.splitlines() if not line.startswith("import time:")]
    assert "%|" not in err and not "".join(lines).strip(), err[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in err.splitlines() if line.startswith("import time:")}
    assert "vhdtool.progress" in imported and not any(name.split(".")[0] == "tqdm" for name in imported)


@pytest.mark.fixtures
def test_copy_in_to_a_vhd_on_a_terminal(tmp_path):
    """A VHD commits through a copy of the whole image: the commit's bar follows the copy, then the writes."""
    image = work_copy("ws2008r2-x64-vhd", tmp_path)
    local = tmp_path / "big.bin"
    local.write_bytes(os.urandom(3 * 1024 * 1024))
    code, out, err = run_vhdtool(["copy-in", image, local, "C:\\Windows\\Temp"], tty=True, extra=FORCED)
    assert code == 0, err
    assert f"committing to {image.name}:" in err and "%|" in err
    assert "to partition 2 (libntfs-3g) [00:0" in err


@pytest.mark.fixtures
def test_a_big_cab_from_a_folder(tmp_path):
    """The folder read path, chunked on a terminal, gives the cab byte for byte."""
    folder = tmp_path / "cabs"
    cab = build_cab(CabSpec("6.1", "x64", WIN8_IC), folder, payload_size=5 * 1000 * 1000)
    image = work_copy("ws2008r2-x64", tmp_path)
    code, out, err = run_vhdtool(["stage", "--json", image, "--host", "win8", "--cabs", folder], tty=True,
                                 extra=FORCED)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["files"][0]["size"] == cab.stat().st_size
    assert doc["files"][0]["sha256"] == hashlib.sha256(cab.read_bytes()).hexdigest()
    assert f"reading {CAB}:" in err and "%|" in err


@pytest.mark.fixtures
@pytest.mark.parametrize("name", ["ws2008r2-x64", "ws2008r2-x64-vhd"])
def test_commit_reports_every_byte_it_writes(name, tmp_path, monkeypatch):
    """The container writers' progress(done, total): rising, ending at the total, which is what they wrote."""
    import vhdtool

    calls: dict[str, list] = {}

    class Recorder(progress.NoProgress):
        def __init__(self, desc):
            self.seen = calls.setdefault(desc.split()[0], [])

        def __call__(self, done, total=None):
            self.seen.append((done, total))
            return True

    monkeypatch.setattr(progress, "bar", lambda desc, total: Recorder(desc))
    monkeypatch.setattr(progress, "phase", lambda desc, amount: Recorder(desc))
    image = work_copy(name, tmp_path)
    original_size = image.stat().st_size
    with vhdtool.edit(image) as ed:
        ed.write_file("/Windows/Temp/big.bin", os.urandom(5 * 1024 * 1024 + 512))
    seen = calls["committing"]
    assert seen and all(total == seen[-1][1] for _done, total in seen)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    assert seen[-1][0] == seen[-1][1]
    if name.endswith("vhd"):
        # A VHD's commit copies the image first: its bar counts the copy by position, holes included.
        assert seen[-1][1] >= ed.result.changed_bytes + original_size
    else:
        assert seen[-1][1] == ed.result.bytes_written
