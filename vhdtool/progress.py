"""Progress bars for the few long single operations, on a terminal only.

``bar(desc, total)`` (bytes) and ``phase(desc, amount)`` (a step whose progress
cannot be measured, such as libntfs-3g writing in the sandbox child) return a
callable object, or a no-op one when no bar can ever be shown: stderr is not a
terminal, ``CI`` is set, or the amount is below ``VHDTOOL_PROGRESS_MIN_BYTES``
(default ``MIN_BYTES``). Even then nothing is drawn, and tqdm is not imported,
until the operation has run for ``VHDTOOL_PROGRESS_DELAY`` seconds (default
``DELAY``): whatever finishes sooner shows nothing and costs a clock read per
update. So the start-up of commands that never show a bar (``inspect``) is
unchanged, and a warm-cache read that takes 50 ms does not flash a bar.

Lower layers never import this module: they take a ``progress`` callback
(``progress(done)`` or ``progress(done, total)``) or a ``tick`` callback (called
while they wait on something that reports nothing), and the layer that knows
what the operation is for makes the bar and passes it down.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator

from vhdtool.units import MiB

MIN_BYTES = 32 * MiB
"""Below this an operation is done within a second even at 32 MB/s (a slow share or USB disk)."""
DELAY = 1.0  # seconds an operation runs before its bar appears
TICK = 0.25  # seconds between refreshes while something blocks (a sandbox child, a flush)


def _env_number(name: str, default, kind):
    try:
        value = kind(os.environ[name])
    except (KeyError, ValueError):
        return default
    return value if value >= 0 else default


def min_bytes() -> int:
    return _env_number("VHDTOOL_PROGRESS_MIN_BYTES", MIN_BYTES, int)


def delay() -> float:
    return _env_number("VHDTOOL_PROGRESS_DELAY", DELAY, float)


def on_terminal() -> bool:
    """Bars go to stderr, and only when it is a terminal outside CI."""
    if os.environ.get("CI"):
        return False
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


class NoProgress:
    """What is handed down when no bar will be shown: every call does nothing."""

    shown = False

    def __call__(self, done: int, total: int | None = None) -> bool:
        return False  # nothing will be shown: a caller may stop reporting

    def tick(self) -> None:
        pass

    def close(self) -> None:
        pass

    @contextlib.contextmanager
    def ticking(self) -> Iterator[None]:
        yield

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


NO_PROGRESS = NoProgress()


class Progress(NoProgress):
    """A bar that appears once the operation has run ``delay()`` seconds (see the module docstring).

    ``progress(done, total=None)``: ``done`` bytes of ``total`` so far (``total`` may
    be learnt or corrected along the way). ``tick()``: refresh the elapsed time while
    nothing moves. ``ticking()``: tick from a thread for the duration of a block that
    blocks without reporting (a flush); never around a fork.
    """

    def __init__(self, desc: str, total: int | None, counted: bool):
        self.desc = desc
        self.total = total
        self.counted = counted  # False: a phase, shown as its description and elapsed time
        self.done = 0
        self.floor = min_bytes()
        self.delay = delay()
        self._started = time.monotonic()
        self._started_wall = time.time()
        self._bar = None
        self._closed = False
        self._lock = threading.Lock()
        if self._due():  # no delay asked for (VHDTOOL_PROGRESS_DELAY=0): there at once, as a plain tqdm
            self._show()

    @property
    def shown(self) -> bool:
        return self._bar is not None

    def _due(self) -> bool:
        if self._closed or self.total is None or self.total < self.floor:
            return False
        return time.monotonic() - self._started >= self.delay

    def _show(self) -> None:
        """Make the tqdm bar and draw it, as if it had been there since the operation began."""
        cls = bar_class()
        # A delay, however short, keeps tqdm from drawing the bar before its clock is set back.
        common = dict(desc=self.desc, file=sys.stderr, leave=False, dynamic_ncols=True, delay=1e-9)
        if self.counted:
            # smoothing=0: the rate is the average since the start; these operations write in
            # bursts (a 32 MiB block, then a flush), which a moving average turns into nonsense.
            bar = cls(total=self.total, unit="B", unit_scale=True, unit_divisor=1024, smoothing=0, **common)
            bar.n = self.done
        else:
            bar = cls(total=None, bar_format="{desc} [{elapsed}]", **common)
        # Elapsed time and rate count from when the operation began.
        bar.start_t = self._started_wall
        bar.refresh()
        bar.last_print_n, bar.last_print_t = bar.n, time.time()
        self._bar = bar

    def __call__(self, done: int, total: int | None = None) -> bool:
        """Record ``done``; False when, at the pace so far, the operation ends before its bar would appear."""
        with self._lock:
            if total is not None and total != self.total:
                self.total = total
                if self._bar is not None:
                    self._bar.total = total
            self.done = done
            if self._bar is None:
                if self._due():
                    self._show()
                    return True
                if self._closed or (self.total is not None and self.total < self.floor):
                    return False
                if self.total is not None and 0 < done < self.total:
                    return (time.monotonic() - self._started) * self.total / done >= self.delay
                return True
            if self.counted and done != self._bar.n:
                self._bar.update(done - self._bar.n)
            return True

    def tick(self) -> None:
        with self._lock:
            if self._bar is None:
                if self._due():
                    self._show()
            else:
                self._bar.refresh()

    @contextlib.contextmanager
    def ticking(self) -> Iterator[None]:
        stop = threading.Event()

        def run() -> None:
            while not stop.wait(TICK):
                self.tick()

        thread = threading.Thread(target=run, name="vhdtool-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._bar is not None:
                self._bar.close()
                self._bar = None


_BAR_CLASS = None


def bar_class():
    """tqdm, imported on the first bar actually shown, without its monitor thread (the sandbox and
    the batch's workers are forked from the process that draws it)."""
    global _BAR_CLASS
    if _BAR_CLASS is None:
        from tqdm import tqdm

        class Bar(tqdm):
            monitor_interval = 0

        _BAR_CLASS = Bar
    return _BAR_CLASS


def bar(desc: str, total: int | None) -> NoProgress:
    """A byte bar for ``total`` bytes (None: told later, through the first call)."""
    if not on_terminal() or (total is not None and total < min_bytes()):
        return NO_PROGRESS
    return Progress(desc, total, counted=True)


def phase(desc: str, amount: int) -> NoProgress:
    """A step that handles ``amount`` bytes but cannot say how far it is: its description and elapsed time."""
    if not on_terminal() or amount < min_bytes():
        return NO_PROGRESS
    return Progress(desc, amount, counted=False)


def size_text(n: int) -> str:
    """``n`` bytes as users read them: 95.4 MiB."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"
