"""Fuzz `vhdtool report`: hostile JSON-lines records give a summary (text, --json, --html) or a one-line
BadReport, never an internal error.

Base records have the shape README's "batch and report" documents (one ok inspect/stage/status record,
one failed); mutations put hostile values at random places in them (wrong types, deep nesting, huge
numbers and strings, NaN/Infinity, invalid UTF-8, odd keys) or damage the line's bytes. The summary is
made in-process for speed, as `report` makes it; --json's document must be standard JSON (Python's
parser with NaN and Infinity refused is the judge). A few cases go through the real command too, for
the exit codes (0, 21 or 25, never 70). VHDTOOL_RECORDS_FUZZ_EXAMPLES sets the cases of the full sweep
(default 20000, marked slow); the default run makes a tenth of them.
"""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys

import pytest

from conftest import ROOT, SWEEPS, sweep_count
from vhdtool.errors import VhdtoolError
from vhdtool.fleet.htmlreport import render_html
from vhdtool.fleet.records import read_reports, render_summary, summarize

DEEP = "\x01deep\x01"  # where _line writes a nesting too deep for Python's json
EXAMPLES = int(os.environ.get("VHDTOOL_RECORDS_FUZZ_EXAMPLES", "20000"))
BASE = [
    {"schema": 1, "record": "vhdtool-batch", "command": "inspect", "key": "a", "image": "/i/a.vhdx", "outcome": "ok",
     "exit_code": 0, "started": "2026-01-01T00:00:00Z", "seconds": 1.5, "shard": None, "machine": "m1",
     "result": {"guest": {"os": "windows", "windows": {"product_name": "Windows Server 2012", "arch": "x64"},
                          "integration_services": {"version": "6.2.9200.16384",
                                                   "last_host": {"host_key": "win8"}}}}},
    {"schema": 1, "record": "vhdtool-batch", "command": "stage", "key": "b", "image": "/i/b.vhdx", "outcome": "ok",
     "exit_code": 0, "started": "2026-01-01T00:00:01Z", "seconds": 3, "shard": "1/2", "machine": "m1",
     "result": {"method": "cab", "action": "stage", "dry_run": False, "host": "win8", "guest_key": "ws2012",
                "arch": "x64", "id": "abc", "changes": {"files": ["x"], "registry": ["y"]}}},
    {"schema": 1, "record": "vhdtool-batch", "command": "status", "key": "c", "image": "/i/c.vhdx", "outcome": "ok",
     "exit_code": 0, "started": "2026-01-01T00:00:02Z", "seconds": 0.2, "shard": "2/2", "machine": "m2",
     "result": {"state": "pending", "staged": [{"id": "abc", "staged_at": "2026-01-01"}]}},
    {"schema": 1, "record": "vhdtool-batch", "command": "plan", "key": "d", "image": "/i/d.vhdx",
     "outcome": "failed", "exit_code": 4, "started": "2026-01-01T00:00:03Z", "seconds": 0.1,
     "error": {"code": 4, "kind": "CorruptImage", "message": "d.vhdx: bad header"}},
]


def _hostile(rng: random.Random):
    return rng.choice([
        None, True, 0, -1, 10**30, -(10**30), 1e308, 2**63, float("nan"), float("inf"), float("-inf"), "",
        "x" * rng.choice([1, 1000, 200_000]), "\u202e<script>\n\x00", [], {}, [1, "a", None],
        {"": {"\x00": 1}}, "[" * 3, _nest(rng.choice([2, 50]), rng.choice(["list", "dict"])), DEEP,
    ])


def _nest(depth: int, kind: str):
    value = 0
    for _ in range(depth):
        value = [value] if kind == "list" else {"k": value}
    return value


def _paths(obj, prefix=()):
    yield prefix
    if len(prefix) >= 6:
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _get(obj, path):
    for p in path:
        obj = obj[p]
    return obj


def _set(obj, path, value):
    for p in path[:-1]:
        obj = obj[p]
    obj[path[-1]] = value


def _line(rec) -> bytes:
    """The record as JSON, each DEEP value written as 100 000 nested arrays (deeper than json.dumps goes)."""
    text = json.dumps(rec)
    return text.replace(json.dumps(DEEP), "[" * 100_000 + "]" * 100_000).encode()


def mutated_report(rng: random.Random) -> bytes:
    lines = []
    for base in rng.sample(BASE, rng.randint(1, len(BASE))):
        rec = copy.deepcopy(base)
        for _ in range(rng.randint(1, 4)):
            path = rng.choice([p for p in _paths(rec) if p])
            parent = _get(rec, path[:-1])
            if rng.random() < 0.15 and isinstance(parent, dict):  # an odd key beside the chosen one
                parent[rng.choice(["", "\x00", "é" * 50, "record", "_from", "__proto__", "k" * 10_000])] = \
                    _hostile(rng)
            else:
                _set(rec, path, _hostile(rng))
        line = _line(rec)
        damage = rng.random()
        if damage < 0.1:
            at = rng.randrange(len(line))
            line = line[:at] + bytes([rng.choice([0xFF, 0xC3, 0x80, 0xED, 0x00, 0x0A])]) + line[at + 1 :]
        elif damage < 0.15:
            line = line[: rng.randrange(len(line))]
        lines.append(line)
    return b"\n".join(lines) + b"\n"


def summarize_like_report(path: str, tmp) -> None:
    """What `vhdtool report --json --html` does in-process: any exception but a VhdtoolError is a bug."""
    try:
        summary = summarize(read_reports([path]))
    except VhdtoolError as e:
        assert e.message and "\n" not in e.message and path in e.message, e.message
        return
    doc = summary.to_dict()
    text = json.dumps(doc, indent=2)

    def refuse(name):
        raise AssertionError(f"--json printed {name}, which is not JSON")

    json.loads(text, parse_constant=refuse)
    render_summary(doc)
    render_html(summary, doc, [path])


@pytest.mark.parametrize("sweep", SWEEPS)
def test_mutated_records_give_a_summary_or_a_one_line_error(tmp_path, sweep):
    rng = random.Random("records")
    path = tmp_path / "report.jsonl"
    for n in range(sweep_count(EXAMPLES, sweep, EXAMPLES // 10)):
        data = mutated_report(rng)
        path.write_bytes(data)
        try:
            summarize_like_report(str(path), tmp_path)
        except Exception as e:
            (tmp_path / f"case{n}.jsonl").write_bytes(data)
            raise AssertionError(f"case {n} ({tmp_path}/case{n}.jsonl): {type(e).__name__}: {e}") from e


def vhdtool(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vhdtool.cli.main", *map(str, args)], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60)


@pytest.mark.parametrize("case", ["nan", "nesting", "utf8", "bigint", "types"])
def test_the_report_command_exits_with_a_documented_code(tmp_path, case):
    good = dict(BASE[0])
    lines = {
        "nan": json.dumps(dict(good, seconds=float("nan"))) + "\n" + json.dumps(dict(BASE[3], seconds=float("inf"))),
        "nesting": _line(dict(good, result={"guest": DEEP})).decode(),
        "utf8": json.dumps(good)[:-2] + '"\udcff"}',
        "bigint": json.dumps(dict(BASE[3], seconds=10**400, error=dict(BASE[3]["error"], code=10**40))),
        "types": json.dumps(dict(good, result=[1], machine={"a": 1}, started=5)),
    }[case]
    report = tmp_path / "r.jsonl"
    report.write_bytes(lines.encode("utf-8", "surrogateescape") + b"\n")
    for extra in ((), ("--json",), ("--html", tmp_path / "out.html")):
        res = vhdtool("report", report, *extra)
        assert res.returncode in (0, 21, 25), (case, extra, res.returncode, res.stderr)
        assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) <= 1, res.stderr
        if "--json" in extra and res.returncode != 25:
            json.loads(res.stdout, parse_constant=lambda name: pytest.fail(f"--json printed {name}"))
