"""``vhdtool report --html``: the summary as one self-contained HTML page, to keep or attach to a ticket.

The page loads nothing: its style, its script and its two bar charts (inline SVG) are in
the file, and a Content-Security-Policy allows only that style and that script, by their
SHA-256, and nothing from anywhere (``default-src 'none'``). Every string from the reports
(paths, guest names, error messages) is hostile: it reaches the page only through
``html.escape`` as element text or a quoted attribute value, never inside the style or
the script, which are constants. The table is plain HTML in the order the page is meant
to be read (failures first), complete without the script; the script only adds sorting
(click a column heading) and filtering, and reads its starting state from the address's
fragment (``#q=TEXT&outcome=failed&sort=image&desc=1``), so that a link opens a view.
"""

from __future__ import annotations

import base64
import hashlib
import os
from html import escape

from vhdtool.errors import WriteFailed
from vhdtool.fleet.overview import NOTHING, OUTCOMES, Counts, ImageRow, counts, image_rows
from vhdtool.fleet.records import FAILED, Summary

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1b1b1b;background:#fff}
h1{font-size:1.4em;margin:0 0 .3em}h2{font-size:1.1em;margin:1.4em 0 .4em}
.meta{color:#555;margin:0}.meta code{word-break:break-all}
.counts{display:flex;flex-wrap:wrap;gap:2em;align-items:flex-start}
table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#eee}td.n{text-align:right;font-variant-numeric:tabular-nums}
#images th{cursor:pointer;user-select:none;white-space:nowrap}
#images th[aria-sort=ascending]::after{content:" \\25B2"}#images th[aria-sort=descending]::after{content:" \\25BC"}
#images td.image,#images td.msg{overflow-wrap:anywhere}#images td.msg{max-width:40em;white-space:pre-line}
tr.failed td{background:#fdecea}tr.nothing td{background:#f3f3f3}
.bar-ok{fill:#2e7d32}.bar-nothing{fill:#9e9e9e}.bar-failed{fill:#c62828}.bar-state{fill:#1565c0}
svg text{font:12px system-ui,sans-serif;fill:#1b1b1b}
#controls{margin:.5em 0}#controls input{width:20em}
.warn{color:#8a4b00}
"""

SCRIPT = """
(function () {
  var table = document.getElementById("images"), body = table.tBodies[0];
  var heads = [].slice.call(table.tHead.rows[0].cells), rows = [].slice.call(body.rows);
  var q = document.getElementById("q"), pick = document.getElementById("outcome");
  var shown = document.getElementById("shown"), state = {sort: "", desc: false};
  document.getElementById("controls").hidden = false;
  function value(row, i) {
    var cell = row.cells[i];
    return cell.hasAttribute("data-sort") ? cell.getAttribute("data-sort") : cell.textContent;
  }
  function remember() {
    var p = new URLSearchParams();
    if (q.value) p.set("q", q.value);
    if (pick.value) p.set("outcome", pick.value);
    if (state.sort) p.set("sort", state.sort);
    if (state.desc) p.set("desc", "1");
    history.replaceState(null, "", "#" + p.toString());
  }
  function filter() {
    var text = q.value.toLowerCase(), want = pick.value, n = 0;
    rows.forEach(function (row) {
      var on = (!want || row.getAttribute("data-outcome") === want) &&
               (!text || row.textContent.toLowerCase().indexOf(text) >= 0);
      row.hidden = !on;
      if (on) n++;
    });
    shown.textContent = n + " of " + rows.length + " images shown";
  }
  function sort() {
    var i = heads.findIndex(function (h) { return h.getAttribute("data-key") === state.sort; });
    heads.forEach(function (h) { h.removeAttribute("aria-sort"); });
    if (i < 0) return;
    var numeric = heads[i].getAttribute("data-type") === "number", sign = state.desc ? -1 : 1;
    heads[i].setAttribute("aria-sort", state.desc ? "descending" : "ascending");
    var keyed = rows.map(function (row, n) { return {row: row, n: n, v: value(row, i)}; });
    keyed.sort(function (a, b) {  // ties keep the page's first order
      var c = numeric ? (parseFloat(a.v) || 0) - (parseFloat(b.v) || 0) : a.v.localeCompare(b.v);
      return c * sign || a.n - b.n;
    });
    keyed.forEach(function (k) { body.appendChild(k.row); });
  }
  heads.forEach(function (h) {
    h.addEventListener("click", function () {
      var key = h.getAttribute("data-key");
      state.desc = state.sort === key ? !state.desc : false;
      state.sort = key;
      sort(); remember();
    });
  });
  q.addEventListener("input", function () { filter(); remember(); });
  pick.addEventListener("change", function () { filter(); remember(); });
  var start = new URLSearchParams(location.hash.slice(1));
  q.value = start.get("q") || "";
  pick.value = start.get("outcome") || "";
  state.sort = start.get("sort") || "";
  state.desc = start.get("desc") === "1";
  sort(); filter();
})();
"""

COLUMNS = (("image", "Image", "text"), ("guest", "Guest", "text"), ("ic", "IC version", "text"),
           ("action", "Plan action", "text"), ("staged", "Staged id", "text"), ("status", "Status", "text"),
           ("exit", "Exit code", "number"), ("error", "Error message", "text"))
OUTCOME_CLASS = {FAILED: "failed", NOTHING: "nothing", "ok": "ok"}


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


CSP = (f"default-src 'none'; style-src {_sha256(STYLE)}; script-src {_sha256(SCRIPT)}; "
       "img-src 'none'; font-src 'none'; connect-src 'none'; base-uri 'none'; form-action 'none'")


def _e(value) -> str:
    return escape("" if value is None else str(value), quote=True)


def bar_chart(title: str, bars: list[tuple[str, int, str]]) -> str:
    """A horizontal bar chart as inline SVG: (label, count, css class) per bar."""
    label_w, bar_w, row_h = 260, 320, 24
    top = max((n for _, n, _ in bars), default=0) or 1
    height = row_h * len(bars) + 8
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" role="img" width="{label_w + bar_w + 60}" '
             f'height="{height}" viewBox="0 0 {label_w + bar_w + 60} {height}"><title>{_e(title)}</title>']
    for i, (label, n, cls) in enumerate(bars):
        y = 4 + i * row_h
        shown = label if len(label) <= 40 else label[:39] + "\u2026"
        width = max(1, round(bar_w * n / top)) if n else 0
        parts.append(f'<g><title>{_e(label)}: {n}</title>'
                     f'<text x="{label_w - 6}" y="{y + 16}" text-anchor="end">{_e(shown)}</text>'
                     f'<rect class="{_e(cls)}" x="{label_w}" y="{y + 3}" width="{width}" height="{row_h - 6}"/>'
                     f'<text x="{label_w + width + 6}" y="{y + 16}">{n}</text></g>')
    parts.append("</svg>")
    return "".join(parts)


def _outcome_class(label: str) -> str:
    return "bar-failed" if label.startswith(FAILED) else "bar-nothing" if label == NOTHING else "bar-ok"


def _counts_section(c: Counts) -> str:
    head = "".join(f"<th>{_e(cmd)}</th>" for cmd in c.commands) if len(c.commands) > 1 else ""
    lines = [f'<table id="outcomes"><thead><tr><th>Outcome</th>{head}<th>Total</th></tr></thead><tbody>']
    for label, per in c.outcomes.items():
        cells = "".join(f'<td class="n">{per.get(cmd, 0)}</td>' for cmd in c.commands) if head else ""
        lines.append(f'<tr data-outcome="{_e(label)}"><td>{_e(label)}</td>{cells}'
                     f'<td class="n">{c.total(label)}</td></tr>')
    lines.append("</tbody></table>")
    chart = bar_chart("Outcomes", [(label, c.total(label), _outcome_class(label)) for label in c.outcomes])
    out = ['<h2>Outcomes</h2><div class="counts">', "".join(lines), chart, "</div>"]
    out.append("<h2>Status</h2>")
    if c.states:
        states = sorted(c.states.items(), key=lambda kv: (-kv[1], kv[0]))
        rows = "".join(f'<tr data-state="{_e(s)}"><td>{_e(s)}</td><td class="n">{n}</td></tr>' for s, n in states)
        out += ['<div class="counts"><table id="states"><thead><tr><th>State</th><th>Images</th></tr></thead>',
                f"<tbody>{rows}</tbody></table>",
                bar_chart("Status states", [(s, n, "bar-state") for s, n in states]), "</div>"]
    else:
        out.append('<p class="meta">No status records in these reports (<code>vhdtool batch status</code> '
                   "makes them).</p>")
    return "".join(out)


def _row(r: ImageRow) -> str:
    cells = [("image", r.image, None), ("", r.guest, None), ("", r.ic_version, None), ("", r.action, None),
             ("", r.staged_id, None), ("", r.status, None),
             ("n", r.exit_code, -1 if r.exit_code is None else r.exit_code), ("msg", "\n".join(r.messages), None)]
    tds = []
    for cls, text, sort in cells:
        attrs = (f' class="{cls}"' if cls else "") + (f' data-sort="{sort}"' if sort is not None else "")
        tds.append(f"<td{attrs}>{_e(text)}</td>")
    title = f"{r.key} ({', '.join(r.commands)})"
    return (f'<tr class="{OUTCOME_CLASS[r.outcome]}" data-outcome="{OUTCOME_CLASS[r.outcome]}" '
            f'title="{_e(title)}">{"".join(tds)}</tr>')


def _table(rows: list[ImageRow]) -> str:
    heads = "".join(f'<th data-key="{key}" data-type="{kind}" scope="col">{_e(label)}</th>'
                    for key, label, kind in COLUMNS)
    options = "".join(f'<option value="{OUTCOME_CLASS[o]}">{_e(o)}</option>' for o in OUTCOMES)
    return ('<h2>Images</h2>'
            '<div id="controls" hidden><label>Filter <input id="q" type="search" '
            'placeholder="any text in the row"></label> <label>Outcome <select id="outcome">'
            f'<option value="">all</option>{options}</select></label> <span id="shown"></span></div>'
            f'<table id="images"><thead><tr>{heads}</tr></thead>'
            f'<tbody>{"".join(_row(r) for r in rows)}</tbody></table>')


def render_html(summary: Summary, doc: dict, sources: list[str]) -> str:
    """The page for ``summary`` (``doc``: its ``to_dict()``, the counts ``report --json`` prints)."""
    rows = image_rows(summary)
    o = doc["outcomes"]
    latest = max((str(r.get("started") or "") for r in summary.images.values()), default="")
    failed = sum(r.outcome == FAILED for r in rows)
    title = f"vhdtool report: {len(rows)} image{'s' * (len(rows) != 1)}, {failed} failed"
    warnings = [f"{d} has records from more than one shard" for d in doc["duplicates"]]
    warnings += [f"skipped {u}" for u in doc["unreadable_lines"]]
    return "".join([
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="meta" id="totals">{len(rows)} images; {doc["images"]} command records counted '
        f'(the latest per command and image, of {doc["records"]} read): {o["ok"]} ok, {o[FAILED]} failed.',
        f" Latest record started {_e(latest)}." if latest else "", "</p>",
        '<p class="meta">From ', ", ".join(f"<code>{_e(s)}</code>" for s in sources), ".</p>",
        "".join(f'<p class="warn">warning: {_e(w)}</p>' for w in warnings),
        _counts_section(counts(summary)),
        _table(rows),
        f"<script>{SCRIPT}</script></body></html>\n",
    ])


def refuse_a_report(path: str, sources: list[str]) -> None:
    """Refuse to write the page over a batch report: one of those read, or one left out of them
    (`report --html a.jsonl b.jsonl`, its OUT.html forgotten, would replace a.jsonl)."""
    import json

    from vhdtool.fleet.records import is_record

    try:
        with open(path, "rb") as f:
            first = f.readline(1 << 20)
        same = any(os.path.exists(s) and os.path.samefile(path, s) for s in sources)
    except OSError:
        return  # not there (or not readable): writing it says what is wrong, if anything
    try:
        report = same or is_record(json.loads(first))
    except (ValueError, UnicodeDecodeError):
        report = False
    if report:
        raise WriteFailed(path, "is a batch report; the HTML page would replace it",
                          "give --html the name of the page to write, such as fleet.html, before the reports")


def write_html(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically: a temporary file beside it, flushed, then renamed over it."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    hint = "give --html a writable path on a disk with free space"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise WriteFailed(path, f"the HTML report cannot be created ({e.strerror})", hint) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise WriteFailed(path, f"writing the HTML report failed ({e.strerror})", hint) from None
