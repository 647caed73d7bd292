"""The report of a batch: JSON lines, one record per image, written and flushed as each image finishes.

A record::

    {"schema": 1, "record": "vhdtool-batch", "command": "stage", "key": "vm1.vhdx",
     "image": "/share/vm1.vhdx", "outcome": "ok" | "failed", "exit_code": 0,
     "result": {...the command's own JSON document...}          (when ok)
     "error": {"code": 18, "message": "..."}                    (when failed)
     "started": "2026-11-30T18:00:00.123Z", "seconds": 0.41,
     "shard": "2/4" | null, "machine": "node7", "pid": 1234}

Each record is one ``write`` of one line to a file opened for appending, then
``fsync``: a crash of vhdtool (or of the machine) loses no finished record, and at
worst leaves a torn last line, which readers skip and the next writer ends with a
newline before it appends. The report is locked while a batch writes it.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import socket
import stat
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from vhdtool.errors import BadReport, WriteFailed

SCHEMA = 1
KIND = "vhdtool-batch"
OK, FAILED = "ok", "failed"
MAX_LINE = 64 * 1024 * 1024
REPORT_HINT = "give --report a writable file on a disk with free space"


def now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def record(command: str, job, outcome: str, started: str, seconds: float, shard, result: dict | None = None,
           error: dict | None = None) -> dict:
    r = {"schema": SCHEMA, "record": KIND, "command": command, "key": job.key, "image": job.image, "outcome": outcome,
         "exit_code": 0 if outcome == OK else error["code"]}
    if outcome == OK:
        r["result"] = result
    else:
        r["error"] = error
    r.update({"started": started, "seconds": round(seconds, 3), "shard": str(shard) if shard else None,
              "machine": socket.gethostname(), "pid": os.getpid()})
    return r


class ReportWriter:
    """Appends records to ``path`` (``-``: stdout), one line, one write, one fsync each."""

    def __init__(self, path: str):
        self.path = path
        self.regular = False
        if path == "-":
            self.fd = os.dup(1)
            return
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise WriteFailed(path, f"the report cannot be opened for appending ({e.strerror})",
                              REPORT_HINT) from None
        st = os.fstat(self.fd)
        self.regular = stat.S_ISREG(st.st_mode)  # else a pipe or a device (/dev/null): no lock, no fsync
        if not self.regular:
            return
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            raise WriteFailed(path, "another batch is writing this report",
                              "wait for it, or give each batch its own --report") from None
        size = st.st_size
        if size:
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    self._write(b"\n")  # a torn last line (a crash mid-write) stays alone on its line

    def _write(self, data: bytes) -> None:
        try:
            view = memoryview(data)
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
            if self.regular:
                os.fsync(self.fd)
        except OSError as e:
            raise WriteFailed(self.path, f"writing the report failed ({e.strerror})", REPORT_HINT) from None

    def write(self, rec: dict) -> None:
        self._write((json.dumps(rec, separators=(",", ":"), ensure_ascii=False) + "\n").encode("utf-8"))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class Loaded:
    records: list[dict] = field(default_factory=list)
    skipped_lines: list[str] = field(default_factory=list)  # "file:line: why"


def read_reports(paths: Iterable[str], missing_ok: bool = False, strict: bool = True) -> Loaded:
    """Every well-formed record of ``paths``, in file order; lines that are not records are listed, not fatal.

    ``strict``: a file whose lines hold no record at all is not a report (BadReport).
    """
    loaded = Loaded()
    for path in paths:
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            if missing_ok:
                continue
            raise BadReport(path, "no such report") from None
        except OSError as e:
            raise BadReport(path, f"cannot be read ({e.strerror})") from None
        with f:
            found, lines = len(loaded.records), 0
            for n, raw in enumerate(_lines(f, path), 1):
                if not raw.strip():
                    continue
                lines += 1
                why = None
                try:
                    rec = json.loads(raw, parse_constant=_not_json, parse_float=_finite)
                except (ValueError, UnicodeDecodeError):
                    why = "not JSON (a line cut short by a crash?)"
                except RecursionError:
                    why = "JSON nested too deeply"
                else:
                    why = _check(rec)
                if why:
                    loaded.skipped_lines.append(f"{path}:{n}: {why}")
                else:
                    rec["_from"] = f"{path}:{n}"
                    loaded.records.append(rec)
            if strict and lines and len(loaded.records) == found:
                raise BadReport(path, f"none of its {lines} lines is a batch record")
    return loaded


def _not_json(name: str):
    raise ValueError(f"{name} is not JSON")  # Python's json reads NaN and Infinity; --json must not print them


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


def _lines(f, path: str) -> Iterator[bytes]:
    while True:
        line = f.readline(MAX_LINE + 1)
        if not line:
            return
        if len(line) > MAX_LINE:
            raise BadReport(path, f"a line longer than {MAX_LINE >> 20} MiB")
        yield line


def _check(rec) -> str | None:
    if not isinstance(rec, dict) or rec.get("record") != KIND:
        return "not a vhdtool batch record"
    if rec.get("schema") != SCHEMA:
        return f"record schema {rec.get('schema')!r}, this vhdtool reads {SCHEMA}"
    for name in ("command", "key", "image", "outcome"):
        if not isinstance(rec.get(name), str):
            return f"no {name}"
    if rec["outcome"] not in (OK, FAILED):
        return f"unknown outcome {rec['outcome']!r}"
    if rec["outcome"] == FAILED and not isinstance(rec.get("error"), dict):
        return "a failure without its error"
    return None


def is_record(rec) -> bool:
    """Whether a parsed line is a batch record this vhdtool reads."""
    return _check(rec) is None


def latest(records: Iterable[dict]) -> dict[tuple[str, str], dict]:
    """The last record of each (command, key): by start time, then by place in the files."""
    out: dict[tuple[str, str], dict] = {}
    for rec in records:
        k = (rec["command"], rec["key"])
        old = out.get(k)
        if old is None or str(rec.get("started") or "") >= str(old.get("started") or ""):
            out[k] = rec
    return out


# -- what a record says, for the progress lines and the summary ---------------------------

def facets(rec: dict) -> dict[str, str | None]:
    """host, guest and method of a record's result, where its command says them."""
    res = rec.get("result") if rec.get("outcome") == OK else None
    if not isinstance(res, dict):
        return {"host": None, "guest": None, "method": None}
    host = res.get("host") if isinstance(res.get("host"), str) else None
    guest = None
    if isinstance(res.get("guest_key"), str):
        guest = res["guest_key"] + (f" {res['arch']}" if isinstance(res.get("arch"), str) else "")
    g = res.get("guest")
    if isinstance(g, dict):
        w, lx = g.get("windows"), g.get("linux")
        if isinstance(w, dict):
            guest = " ".join(str(x) for x in (w.get("product_name"), w.get("arch")) if x)
            ic = g.get("integration_services")
            lh = ic.get("last_host") if isinstance(ic, dict) else None
            if host is None and isinstance(lh, dict) and isinstance(lh.get("host_key"), str):
                host = f"{lh['host_key']} (last)"
        elif isinstance(lx, dict):
            guest = next((x for x in (lx.get("pretty_name"), lx.get("distribution")) if isinstance(x, str) and x),
                         None)
        elif g.get("os") is None:
            guest = "none found"
    method = None
    if isinstance(res.get("method"), str):
        method = res["method"]
        if rec["command"] == "stage":
            changes = res.get("changes") if isinstance(res.get("changes"), dict) else {}
            written = bool(changes.get("files") or changes.get("registry"))
            if res.get("action") != "stage":
                method += f" ({res.get('action')})"
            elif res.get("dry_run") and written:
                method += " (would stage)"
            else:
                method += " (staged)" if written else " (already staged)"
    elif isinstance(res.get("state"), str):
        method = f"status {res['state']}"
    elif isinstance(res.get("changes"), dict):
        n = sum(len(v) for v in (res["changes"].get("registry"), res["changes"].get("files")) if isinstance(v, list))
        method = f"{n} change{'s' * (n != 1)}" + (" (dry run)" if res.get("dry_run") else "")
    return {"host": host, "guest": guest, "method": method}


def one_line(rec: dict) -> str:
    if rec["outcome"] != OK:
        return f"exit {rec['error'].get('code')}: {rec['error'].get('message')}"
    f = facets(rec)
    return ", ".join(x for x in (f["guest"], f["host"] and f"host {f['host']}", f["method"]) if x) or "done"


@dataclass
class Summary:
    records: int
    images: dict[tuple[str, str], dict]
    skipped_lines: list[str]
    duplicates: list[str]  # keys with records from more than one shard or machine

    def to_dict(self) -> dict:
        recs = list(self.images.values())
        outcomes = Counter(r["outcome"] for r in recs)
        by = {name: Counter() for name in ("command", "host", "guest", "method", "shard", "status")}
        for r in recs:
            f = facets(r)
            by["command"][r["command"]] += 1
            if r["command"] == "status" and r["outcome"] == OK and isinstance(r.get("result"), dict):
                # The image's state (stage/status.py: none, pending, running, installed, reboot-pending,
                # failed, inconsistent); "status <state>" in by_method says the same for people.
                by["status"][str(r["result"].get("state"))] += 1
            by["shard"][_text(r.get("shard")) or "none"] += 1
            for name in ("host", "guest", "method"):
                if f[name]:
                    by[name][f[name]] += 1
        failures = [{"command": r["command"], "image": r["image"], "exit_code": r["error"].get("code"),
                     "message": r["error"].get("message"), "record": r["_from"] if "_from" in r else None}
                    for r in recs if r["outcome"] == FAILED]
        return {
            "schema": SCHEMA,
            "records": self.records,
            "images": len(recs),  # (command, image) results: an image checked by three commands counts three times
            "distinct_images": len({r["key"] for r in recs}),
            "outcomes": {OK: outcomes.get(OK, 0), FAILED: outcomes.get(FAILED, 0)},
            "by_command": dict(sorted(by["command"].items())),
            "by_host": dict(sorted(by["host"].items())),
            "by_guest": dict(sorted(by["guest"].items())),
            "by_method": dict(sorted(by["method"].items())),
            "by_shard": dict(sorted(by["shard"].items())),
            "by_status": dict(sorted(by["status"].items())),
            "failures": sorted(failures, key=lambda f: (_code_order(f["exit_code"]), f["image"])),
            "seconds": round(sum(r["seconds"] for r in recs if _number(r.get("seconds"))), 3),
            "duplicates": self.duplicates,
            "unreadable_lines": self.skipped_lines,
        }


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _text(value) -> str | None:
    """A shard or machine as text: a foreign report may hold any JSON value there (a list is no dict key)."""
    return value if value is None or isinstance(value, str) else json.dumps(value, sort_keys=True)


def _code_order(code) -> tuple[int, str]:
    """Exit codes sort as numbers; what a foreign report holds instead sorts first, as text."""
    return (code, "") if isinstance(code, int) else (-1, str(code))


def summarize(loaded: Loaded) -> Summary:
    images = latest(loaded.records)
    where: dict[tuple[str, str], set] = {}
    for r in loaded.records:
        where.setdefault((r["command"], r["key"]), set()).add((_text(r.get("shard")), _text(r.get("machine"))))
    dups = sorted(f"{k[0]} {k[1]}" for k, w in where.items() if len({s for s, _ in w}) > 1)
    return Summary(len(loaded.records), images, loaded.skipped_lines, dups)


def render_summary(doc: dict, title: str = "report") -> str:
    o = doc["outcomes"]
    n, distinct = doc["images"], doc.get("distinct_images", doc["images"])
    # One command's report counts images; several commands' count results, and say of how many images.
    counted = (f"{n} image{'s' * (n != 1)}" if n == distinct
               else f"{n} results of {len(doc['by_command'])} commands for {distinct} image{'s' * (distinct != 1)}")
    lines = [f"{title}: {counted}: {o[OK]} ok, {o[FAILED]} failed"
             + (f" ({doc['records']} records)" if doc["records"] != n else "")]
    sections = [(label, doc[name]) for name, label in (("by_command", "command"), ("by_host", "host"),
                                                         ("by_guest", "guest"), ("by_method", "method"),
                                                         ("by_shard", "shard"))
                if doc[name] and not (name == "by_shard" and list(doc[name]) == ["none"])]
    width = max((len(k) for _, counts in sections for k in counts), default=0)
    for label, counts in sections:
        lines.append(f"  {label}")
        for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"    {k:<{width}}  {v:>6}")
    if doc["failures"]:
        lines.append("  failed")
        for f in doc["failures"]:
            lines.append(f"    exit {str(f['exit_code']):>3}  {f['message']}")
    for d in doc["duplicates"]:
        lines.append(f"  warning: {d} has records from more than one shard")
    for u in doc["unreadable_lines"]:
        lines.append(f"  warning: skipped {u}")
    return "\n".join(lines)
