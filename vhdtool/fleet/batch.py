"""``vhdtool batch``: one command over many images, in parallel, resumable and shardable.

Order of work: the images (paths, globs, manifests; each once) → this machine's
shard → with ``--resume``, leave out those whose last record in the report is a
success → the workers. Each finished image's record is appended to the report and
flushed before the next is handed out by that worker, so a batch killed at any
moment has lost no finished record, and a resumed one redoes only what has none:
an image that was being written when the batch died is then either unchanged or
fully changed (the transaction), and redoing it is safe because every command is
idempotent (staging the same cab twice changes nothing the second time).

Exit: 0 when every image succeeded, 21 (EXIT_SOME_FAILED) when any failed or was
not run because of --fail-fast, 130 when stopped by SIGINT or SIGTERM. The first
signal lets the images in hand finish (their records are written); a second kills
their workers, which leaves each of them as it was or fully written.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from vhdtool.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_SOME_FAILED, BadManifest
from vhdtool.fleet import manifest, shard as sharding
from vhdtool.fleet.records import (FAILED, OK, Loaded, ReportWriter, latest, now, one_line, read_reports, record,
                                   render_summary, summarize)
from vhdtool.fleet.pool import Pool
from vhdtool.fleet.work import ImageCommand, Options
from vhdtool.progress import bar_class, on_terminal

DEFAULT_TIMEOUT = 3600.0


@dataclass
class Batch:
    options: Options
    images: list[str] = field(default_factory=list)
    manifests: list[str] = field(default_factory=list)
    jobs: int = 0  # 0: the machine's cores
    report: str | None = None  # None: records on stdout
    resume: bool = False
    shard: str | None = None
    shards: int | None = None
    fail_fast: bool = False
    timeout: float | None = DEFAULT_TIMEOUT


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def run(b: Batch, env: Mapping[str, str] = os.environ, say: Callable[[str], None] | None = None) -> int:
    """Run the batch; its exit code. ``say`` takes the lines meant for a person (stderr)."""
    say = say or _say_on_stderr
    _check(b)
    chosen = _choose(b, env, say)
    # The batch-wide host and cab sources are checked (and loaded, for the workers to inherit)
    # before the report is opened and before any worker starts.
    command = ImageCommand(b.options)
    command.warm()
    ran = _run_workers(b, command, chosen, say)
    return _summarize(b, chosen, ran, say)


def _say_on_stderr(text: str) -> None:
    print(f"vhdtool: {text}", file=sys.stderr, flush=True)


def _check(b: Batch) -> None:
    if b.resume and not b.report:
        raise BadManifest(None, "--resume needs --report FILE", "give the report of the batch to resume")
    if not b.images and not b.manifests:
        raise BadManifest(None, "no images", "give IMAGE, GLOB or --manifest FILE")


@dataclass
class _Chosen:
    """The images this run works on, and how they were chosen."""

    jobs: list[manifest.Job]
    shard: sharding.Shard | None
    skipped: int  # done before, per the report (--resume)


def _choose(b: Batch, env: Mapping[str, str], say: Callable[[str], None]) -> _Chosen:
    """The images (each once), then this machine's shard of them, then with --resume those not done yet."""
    jobs, warnings = manifest.collect(b.images, b.manifests)
    for w in warnings:
        say(f"batch: {w}")
    shard = sharding.choose(b.shard, b.shards, env)
    if shard:
        mine = shard.select(jobs)
        say(f"batch: shard {shard} ({shard.source}): {len(mine)} of {len(jobs)} images")
        jobs = mine
    if not b.resume:
        return _Chosen(jobs, shard, 0)
    loaded = read_reports([b.report], missing_ok=True, strict=False)
    for line in loaded.skipped_lines:
        say(f"batch: warning: skipped {line}")
    last = latest(loaded.records)
    todo = [j for j in jobs if last.get((b.options.command, j.key), {}).get("outcome") != OK]
    skipped = len(jobs) - len(todo)
    if skipped:
        say(f"batch: --resume: {skipped} image{'s' * (skipped != 1)} already done, per {b.report}")
    return _Chosen(todo, shard, skipped)


@dataclass
class _Ran:
    """What the worker processes did."""

    size: int  # worker processes
    done: list[dict]  # the records written, in the order the images finished
    not_run: list[manifest.Job]  # never started: a stop came first
    killed: list[manifest.Job]  # in hand when a second signal came: no record
    interrupted: bool  # by SIGINT or SIGTERM
    wall: float  # seconds


def _run_workers(b: Batch, command: ImageCommand, chosen: _Chosen, say: Callable[[str], None]) -> _Ran:
    """The pool over the chosen images; each finished image's record appended to the report as it comes."""
    size = min(b.jobs or cores(), max(1, len(chosen.jobs)))
    done: list[dict] = []
    with contextlib.ExitStack() as stack:  # closed in reverse: signals restored, then the bar, then the report
        writer = ReportWriter(b.report or "-")
        stack.callback(writer.close)
        progress = BatchProgress(b.options.command, len(chosen.jobs), chosen.skipped, say)
        stack.callback(progress.close)
        signals = stack.enter_context(_Signals(progress.say))

        def on_done(job, ok, payload, started, seconds):
            rec = record(b.options.command, job, OK if ok else FAILED, started, seconds, chosen.shard,
                         result=payload if ok else None, error=None if ok else payload)
            writer.write(rec)
            done.append(rec)
            progress.finished(job, rec)

        started = time.monotonic()
        pool = Pool(command, size, b.timeout, progress.worker_line, now)
        not_run = pool.run(chosen.jobs, progress.started, on_done,
                           stopping=lambda: signals.count > 0 or (b.fail_fast and progress.failed > 0),
                           killing=lambda: signals.count > 1)
    return _Ran(size, done, not_run, pool.killed, signals.count > 0, time.monotonic() - started)


class _Signals:
    """SIGINT and SIGTERM while the workers run, counted: the first stops handing out images, the second kills."""

    def __init__(self, say: Callable[[str], None]):
        self.count = 0
        self._say = say
        self._old: dict = {}

    def __enter__(self) -> _Signals:
        self._old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)

    def _on_signal(self, number, _frame) -> None:
        self.count += 1
        name = signal.Signals(number).name
        if self.count == 1:
            self._say(f"batch: {name}: stopping; the images in hand finish and are recorded "
                      f"(again to kill them: each is left as it was or fully written)")
        else:
            self._say(f"batch: {name} again: killing the workers")


def _summarize(b: Batch, chosen: _Chosen, ran: _Ran, say: Callable[[str], None]) -> int:
    """Say the summary of this run and what it left undone; the batch's exit code."""
    doc = summarize(Loaded(records=ran.done)).to_dict()
    shard, size = chosen.shard, ran.size
    rate = f", {len(ran.done) / ran.wall:.2f} images/s" if ran.wall > 0 and ran.done else ""
    title = (f"batch {b.options.command}{f' shard {shard}' if shard else ''} in {ran.wall:.1f} s with {size} "
             f"worker{'s' * (size != 1)}{rate}")
    say(render_summary(doc, title))
    extra = []
    if chosen.skipped:
        extra.append(f"{chosen.skipped} skipped (done before)")
    if ran.not_run:
        extra.append(f"{len(ran.not_run)} not run")
    if ran.killed:
        extra.append(f"{len(ran.killed)} killed in hand, with no record (each is as it was or fully written; "
                     f"--resume redoes them): {', '.join(j.image for j in ran.killed)}")
    if extra:
        say("batch: " + ", ".join(extra))
    if ran.interrupted:
        return EXIT_INTERRUPTED
    if doc["outcomes"][FAILED] or ran.not_run:
        return EXIT_SOME_FAILED
    return EXIT_OK


class BatchProgress:
    """A tqdm bar on a terminal (done / failed / skipped, the images in hand, rate, time left); lines otherwise."""

    def __init__(self, command: str, total: int, skipped: int, say: Callable[[str], None]):
        self.total, self.skipped, self._say = total, skipped, say
        self.ok = self.failed = 0
        self.current: list[str] = []
        self.bar = None
        if total and on_terminal():
            self.bar = bar_class()(total=total, unit="image", desc=f"batch {command}", file=sys.stderr,
                                   dynamic_ncols=True, leave=True)
            self._postfix()

    def say(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(f"vhdtool: {text}", file=sys.stderr)
        else:
            self._say(text)

    def worker_line(self, line: str) -> None:
        self.say(f"worker: {line[9:] if line.startswith('vhdtool: ') else line}")

    def _postfix(self) -> None:
        if self.bar is not None:
            names = ", ".join(os.path.basename(c) for c in self.current)
            self.bar.set_postfix_str(f"ok {self.ok}, failed {self.failed}, skipped {self.skipped}"
                                     + (f" | {names[:60]}" if names else ""), refresh=True)

    def started(self, job) -> None:
        self.current.append(job.image)
        self._postfix()

    def finished(self, job, rec: dict) -> None:
        if job.image in self.current:
            self.current.remove(job.image)
        if rec["outcome"] == OK:
            self.ok += 1
        else:
            self.failed += 1
        n = self.ok + self.failed
        if self.bar is not None:
            if rec["outcome"] != OK:
                self.bar.write(f"vhdtool: batch: failed {job.image}: {one_line(rec)}", file=sys.stderr)
            self.bar.update(1)
            self._postfix()
        else:
            self._say(f"batch: [{n}/{self.total}] {rec['outcome']} {job.image} ({rec['seconds']:.2f} s): "
                      f"{one_line(rec)}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
