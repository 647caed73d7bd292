"""What the HTML report shows: one row per image (its commands' latest records merged), and the counts.

Pure functions of a ``records.Summary``. A row merges the latest record of each command
run on that image (inspect, plan, stage, services, status: the summary keeps one per
command and image), so a fleet inspected, staged and read back is one row per image. The
counts are the summary's own, one per command and image, so they add up to what
``vhdtool report --json`` says. Every string here comes from a report and stays hostile:
the renderer escapes it.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from vhdtool import errors
from vhdtool.fleet.records import FAILED, OK, Summary, facets

COMMANDS = ("inspect", "plan", "stage", "services", "status")  # merge order: the earliest says the guest
NOTHING = "nothing to do"
OUTCOMES = (FAILED, NOTHING, OK)  # the table's order: failures first
ACTIONS = ("plan", "stage", "services")  # the commands whose outcome can be "nothing to do"


def kind_names() -> dict[int, str]:
    """Exit code -> the name of the first error type with that code ("corrupt image" for 4)."""
    names: dict[int, str] = {}
    for obj in vars(errors).values():  # definition order: the base type of a code comes first
        if isinstance(obj, type) and issubclass(obj, errors.VhdtoolError) and obj is not errors.VhdtoolError:
            words = re.sub(r"(?<!^)(?=[A-Z])", " ", obj.__name__).lower()
            names.setdefault(obj.exit_code, words)
    return names


def failure_label(code, kinds: dict[int, str]) -> str:
    name = kinds.get(code) if isinstance(code, int) else None
    return f"failed: exit {code}" + (f" ({name})" if name else "")


def _str(value) -> str | None:
    return value if isinstance(value, str) and value else None


def _result(rec: dict) -> dict:
    res = rec.get("result") if rec.get("outcome") == OK else None
    return res if isinstance(res, dict) else {}


def outcome(rec: dict) -> str:
    """ok, failed, or nothing to do: a plan or stage whose action is none, a stage that found its
    staging already there, a services change that found every service already as asked."""
    if rec.get("outcome") != OK:
        return FAILED
    res, command = _result(rec), rec.get("command")
    changes = res.get("changes") if isinstance(res.get("changes"), dict) else {}
    wrote = bool(changes.get("files") or changes.get("registry"))
    if command in ("plan", "stage") and res.get("action") == "none":
        return NOTHING
    if (command == "stage" and res.get("action") == "stage" or command == "services" and "changes" in res) and not wrote:
        return NOTHING
    return OK


def _ic_version(rec: dict) -> str | None:
    res = _result(rec)
    g = res.get("guest")
    if isinstance(g, dict) and isinstance(g.get("integration_services"), dict):
        return _str(g["integration_services"].get("version"))
    return _str(res.get("guest_ic_version")) or _str(res.get("ic_version"))


def _action(rec: dict) -> str | None:
    res = _result(rec)
    action, method = _str(res.get("action")), facets(rec)["method"]
    if rec.get("command") not in ("plan", "stage") or not action:
        return None
    return f"{action}: {method}" if method else action


def _staged_id(rec: dict) -> str | None:
    res = _result(rec)
    if rec.get("command") == "status":
        staged = res.get("staged") if isinstance(res.get("staged"), list) else []
        newest = staged[-1] if staged and isinstance(staged[-1], dict) else {}
        return _str(newest.get("id"))
    return _str(res.get("id")) if rec.get("command") == "stage" else None


@dataclass
class ImageRow:
    key: str
    image: str
    outcome: str = OK
    guest: str | None = None
    ic_version: str | None = None
    action: str | None = None
    staged_id: str | None = None
    status: str | None = None
    exit_code: int | None = 0
    messages: list[str] = field(default_factory=list)  # "inspect, plan: message" for each distinct message
    commands: list[str] = field(default_factory=list)


def image_rows(summary: Summary) -> list[ImageRow]:
    """One row per image, failures first (by exit code, then image), then nothing to do, then ok.

    A row has failed when any of its records has; else it is the outcome of its last plan, stage or
    services record (stage after plan: a plan to stage whose stage found it staged has nothing to do).
    """
    by_key: dict[str, dict[str, dict]] = {}
    for (command, key), rec in summary.images.items():
        by_key.setdefault(key, {})[command] = rec
    rows = []
    for key, recs in by_key.items():
        ordered = [recs[c] for c in COMMANDS if c in recs] + [r for c, r in sorted(recs.items()) if c not in COMMANDS]
        row = ImageRow(key, ordered[-1]["image"], commands=[r["command"] for r in ordered])
        outcomes = [outcome(r) for r in ordered]
        acting = [o for r, o in zip(ordered, outcomes) if r["command"] in ACTIONS]  # reads are always ok
        row.outcome = FAILED if FAILED in outcomes else acting[-1] if acting else OK
        failed: dict[str, list[str]] = {}  # message -> the commands that failed with it
        for r in ordered:
            row.guest = row.guest or facets(r)["guest"]
            row.ic_version = row.ic_version or _ic_version(r)
            row.action = _action(r) or row.action  # stage's, after plan's, says whether it was staged
            row.staged_id = _staged_id(r) or row.staged_id  # status, read after the stage, has the last word
            if r["command"] == "status" and r.get("outcome") == OK:
                row.status = _str(_result(r).get("state"))
            if r.get("outcome") == FAILED:
                code = r["error"].get("code")
                if row.exit_code == 0:  # the first failure's code (by command order) sorts the row
                    row.exit_code = code if isinstance(code, int) else None
                failed.setdefault(str(r["error"].get("message")), []).append(r["command"])
        row.messages = [f"{', '.join(cmds)}: {message}" for message, cmds in failed.items()]
        rows.append(row)
    return sorted(rows, key=lambda r: (OUTCOMES.index(r.outcome), r.exit_code or 0, r.image, r.key))


@dataclass
class Counts:
    """The summary's entries (one per command and image) per outcome label, and status states."""

    outcomes: dict[str, Counter]  # label -> command -> n; labels "ok", "nothing to do", "failed: exit 4 (...)"
    states: Counter  # status records: state -> n
    commands: list[str]

    def total(self, label: str) -> int:
        return sum(self.outcomes[label].values())


def counts(summary: Summary) -> Counts:
    kinds = kind_names()
    found: dict[tuple, tuple[str, Counter]] = {}
    states: Counter = Counter()
    commands = set()
    for (command, _), rec in summary.images.items():
        commands.add(command)
        o = outcome(rec)
        code = rec["error"].get("code") if o == FAILED else None
        order = (OUTCOMES.index(o), code if isinstance(code, int) else -1, str(code))
        label = failure_label(code, kinds) if o == FAILED else o
        found.setdefault(order, (label, Counter()))[1][command] += 1
        if command == "status" and o != FAILED:
            states[_str(_result(rec).get("state")) or "unknown"] += 1
    outcomes = {label: c for _, (label, c) in sorted(found.items())}
    order = sorted(commands, key=lambda c: (COMMANDS.index(c) if c in COMMANDS else len(COMMANDS), c))
    return Counts(outcomes, states, order)
