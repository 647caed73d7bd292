"""``vhdtool batch COMMAND [IMAGE|GLOB]... [--manifest FILE]...``: a command over many images; ``vhdtool report``."""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path
from typing import List, Optional

import typer

from vhdtool.cli.options import (CABS_HELP, DRY_RUN, HOST_HELP, REQUIRE_SIGNED, REVISION, TRUST_ROOT, cabs_option,
                                 disable_option, enable_option,
                                 host_option, json_option)

batch_app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="""Run inspect, plan, stage, status or services over many images.

Images run in parallel worker processes; each image's record (the command's JSON
document, or its error) is appended to the report as it finishes. Exit 0 when all
succeeded, 21 when some failed, 130 when stopped by Ctrl-C or SIGTERM (the images
in hand finish first).""",
)

IMAGE_GLOBS = typer.Argument(None, metavar="[IMAGE|GLOB]...", show_default=False,
                        help="VHDX or VHD files, or quoted patterns such as 'vms/**/*.vhdx'")
MANIFEST = typer.Option([], "--manifest", "-m", metavar="FILE", show_default=False,
                        help="CSV or JSON lines: image[,host,output,cabs] per row; repeatable.")
JOBS = typer.Option(0, "--jobs", "-j", metavar="N", show_default=False,
                    help="Worker processes (default: this machine's cores).")
REPORT = typer.Option(None, "--report", metavar="FILE",
                      help="Append one JSON line per image to FILE (default: stdout).")
RESUME = typer.Option(False, "--resume", help="Skip images whose last record in --report is a success.")
SHARD = typer.Option(None, "--shard", metavar="K/N",
                     help="Run shard K of N (deterministic; by default taken from JOB_COMPLETION_INDEX or "
                          "SLURM_ARRAY_TASK_ID).")
SHARDS = typer.Option(None, "--shards", metavar="N", show_default=False,
                      help="The number of shards of a Kubernetes Indexed Job (or VHDTOOL_SHARDS=N).")
FAIL_FAST = typer.Option(False, "--fail-fast", help="Start no new image after the first failure.")
TIMEOUT = typer.Option(3600.0, "--timeout", metavar="SECONDS",
                       help="Kill an image's worker after this long and fail that image (0: no limit).")
BATCH_HOST = host_option(None, HOST_HELP + " A manifest's host column overrides it.")
BATCH_CABS = cabs_option(CABS_HELP + " A manifest's cabs column overrides it.")


def _run(command: str, images, manifests, jobs, report, resume, shard, shards, fail_fast, timeout, **options) -> None:
    from vhdtool.fleet.batch import Batch, run
    from vhdtool.fleet.work import Options

    gc.enable()  # a fleet runs for long, and its forked workers inherit this (cli.main turned it off)
    if jobs < 0:
        raise typer.BadParameter("must be 1 or more", param_hint="--jobs")
    if shards is not None and shards < 1:
        raise typer.BadParameter("must be 1 or more", param_hint="--shards")
    o = Options(command, **options)
    b = Batch(o, [os.fspath(i) for i in images or []], [os.fspath(m) for m in manifests], jobs,
              os.fspath(report) if report else None, resume, shard, shards, fail_fast, timeout)
    raise typer.Exit(run(b))


@batch_app.command("inspect")
def batch_inspect(images: Optional[List[Path]] = IMAGE_GLOBS, manifest: List[Path] = MANIFEST, jobs: int = JOBS,
                  report: Optional[Path] = REPORT, resume: bool = RESUME, shard: Optional[str] = SHARD,
                  shards: Optional[int] = SHARDS, fail_fast: bool = FAIL_FAST, timeout: float = TIMEOUT) -> None:
    """Inspect every image."""
    _run("inspect", images, manifest, jobs, report, resume, shard, shards, fail_fast, timeout)


@batch_app.command("status")
def batch_status(images: Optional[List[Path]] = IMAGE_GLOBS, manifest: List[Path] = MANIFEST, jobs: int = JOBS,
                 report: Optional[Path] = REPORT, resume: bool = RESUME, shard: Optional[str] = SHARD,
                 shards: Optional[int] = SHARDS, fail_fast: bool = FAIL_FAST, timeout: float = TIMEOUT) -> None:
    """Read back whether what was staged in every image installed."""
    _run("status", images, manifest, jobs, report, resume, shard, shards, fail_fast, timeout)


@batch_app.command("plan")
def batch_plan(images: Optional[List[Path]] = IMAGE_GLOBS, host: Optional[str] = BATCH_HOST,
               cabs: List[Path] = BATCH_CABS, revision: Optional[str] = REVISION, manifest: List[Path] = MANIFEST,
               jobs: int = JOBS, report: Optional[Path] = REPORT, resume: bool = RESUME,
               shard: Optional[str] = SHARD, shards: Optional[int] = SHARDS, fail_fast: bool = FAIL_FAST,
               timeout: float = TIMEOUT, require_signed: bool = REQUIRE_SIGNED,
               trust_root: List[Path] = TRUST_ROOT) -> None:
    """Plan every image's integration services."""
    _run("plan", images, manifest, jobs, report, resume, shard, shards, fail_fast, timeout,
         host=host, cabs=tuple(os.fspath(c) for c in cabs), revision=revision, require_signed=require_signed,
         trust_roots=tuple(os.fspath(r) for r in trust_root))


@batch_app.command("stage")
def batch_stage(images: Optional[List[Path]] = IMAGE_GLOBS, host: Optional[str] = BATCH_HOST,
                cabs: List[Path] = BATCH_CABS, dry_run: bool = DRY_RUN, revision: Optional[str] = REVISION,
                manifest: List[Path] = MANIFEST, jobs: int = JOBS, report: Optional[Path] = REPORT,
                resume: bool = RESUME, shard: Optional[str] = SHARD, shards: Optional[int] = SHARDS,
                fail_fast: bool = FAIL_FAST, timeout: float = TIMEOUT, require_signed: bool = REQUIRE_SIGNED,
                trust_root: List[Path] = TRUST_ROOT) -> None:
    """Stage every image's integration services for next boot.

    A manifest's output column writes a changed copy there instead of the image.
    """
    _run("stage", images, manifest, jobs, report, resume, shard, shards, fail_fast, timeout,
         host=host, cabs=tuple(os.fspath(c) for c in cabs), revision=revision, dry_run=dry_run,
         require_signed=require_signed, trust_roots=tuple(os.fspath(r) for r in trust_root))


@batch_app.command("services")
def batch_services(images: Optional[List[Path]] = IMAGE_GLOBS,
                   enable: List[str] = enable_option("Windows: set service NAME to manual start. Linux: enable "
                                                     "daemon NAME (kvp, vss, fcopy or any of their names). "
                                                     "Repeatable."),
                   disable: List[str] = disable_option("Windows: set service NAME to disabled. Linux: disable "
                                                       "daemon NAME; a Windows-only name is passed by with a "
                                                       "note. Repeatable."),
                   dry_run: bool = DRY_RUN, manifest: List[Path] = MANIFEST, jobs: int = JOBS,
                   report: Optional[Path] = REPORT, resume: bool = RESUME, shard: Optional[str] = SHARD,
                   shards: Optional[int] = SHARDS, fail_fast: bool = FAIL_FAST, timeout: float = TIMEOUT) -> None:
    """List every image's integration services, or set how they start."""
    _run("services", images, manifest, jobs, report, resume, shard, shards, fail_fast, timeout,
         enable=tuple(enable), disable=tuple(disable), dry_run=dry_run)


def report(
    files: List[Path] = typer.Argument(..., metavar="FILE...", show_default=False,
                                       help="Reports written by `vhdtool batch --report` (of several shards too)"),
    as_json: bool = json_option("Print the summary as one JSON document."),
    html: Optional[Path] = typer.Option(None, "--html", metavar="OUT.html",
                                        help="Also write the summary as one self-contained HTML page: counts, "
                                             "charts, and a table of the images, failures first."),
) -> None:
    """Merge batch reports into one summary.

    Counts per outcome, host, guest and method, and the failures with their
    reasons. An image's last record counts. Exit 0 when no image failed, 21 when some did.
    With --html, the text summary (or --json) is printed as well.
    """
    from vhdtool.errors import EXIT_SOME_FAILED
    from vhdtool.fleet.records import read_reports, render_summary, summarize

    sources = [os.fspath(f) for f in files]
    if html is not None:
        from vhdtool.fleet.htmlreport import refuse_a_report

        refuse_a_report(os.fspath(html), sources)
    summary = summarize(read_reports(sources))
    doc = summary.to_dict()
    if html is not None:
        from vhdtool.fleet.htmlreport import render_html, write_html

        write_html(os.fspath(html), render_html(summary, doc, sources))
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
    else:
        typer.echo(render_summary(doc))
    raise typer.Exit(EXIT_SOME_FAILED if doc["outcomes"]["failed"] else 0)
