"""`vhdtool report --html` over the reports of a real batch: parsed by html.parser, rendered by chromium.

The reports come from `vhdtool batch inspect`, `plan`, `stage` and `status` run for real over
copies of fixture images: Windows guests (VHDX and VHD), a hibernated one, one already up to date,
a Linux ext4 guest and a damaged image whose folder and file name hold markup (`<script>`, `"`),
so that its path and its error message are hostile text. The page is judged by the standard
library's HTML parser (structure, counts against `report --json`, no outside resources) and by
Debian's chromium in headless mode (`--dump-dom` after the page's script ran, `--screenshot`
decoded here to count the pixels of the failure colour).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import zlib
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import ROOT
from fixtures import build as fb
from fixtures.cabs import CabSpec, build_iso

pytestmark = pytest.mark.fixtures
WIN8_IC = "6.2.9200.16384"
CHROMIUM = "/usr/bin/chromium"
HOSTILE_DIR = "evil\"<script>document.title='pwned'<"
HOSTILE_FILE = "script><b>x\".vhdx"
# image stem -> (row outcome, exit code) after inspect, plan, stage (host win8) and status
EXPECTED = {"ws2008r2-x64": ("ok", 0), "ws2008r2-x64-vhd": ("ok", 0), "ws2012-sysprep": ("nothing", 0),
            "ubuntu-ext4": ("nothing", 0), "ws2008r2-hibernated": ("failed", 18), 'script><b>x"': ("failed", 4)}


def vhdtool(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vhdtool.cli.main", *map(str, args)], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=timeout)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """Copies of 5 fixture images and a damaged one under a hostile name, and the reports of 4 batches."""
    root = tmp_path_factory.mktemp("htmlfleet")
    work = root / "images"
    (work / HOSTILE_DIR).mkdir(parents=True)
    images = []
    for name in ("ws2008r2-x64", "ws2008r2-x64-vhd", "ws2012-sysprep", "ubuntu-ext4", "ws2008r2-hibernated"):
        src = Path(fb.build(name))
        images.append(work / f"{name}{src.suffix}")
        subprocess.run(["cp", "--sparse=always", str(src), str(images[-1])], check=True)
    damaged = work / HOSTILE_DIR / HOSTILE_FILE
    shutil.copyfile(fb.build("ws2008r2-x64"), damaged)
    with open(damaged, "r+b") as f:  # both VHDX headers (64 KiB and 128 KiB) overwritten
        for offset in (64 * 1024, 128 * 1024):
            f.seek(offset)
            f.write(b"\xa5" * 4096)
    images.append(damaged)
    iso = build_iso([CabSpec(nt, "x64", WIN8_IC) for nt in ("6.1", "6.2")], root / "vmguest.iso")
    reports = {}
    for command, extra in (("inspect", []), ("plan", ["--host", "win8", "--cabs", iso]),
                           ("stage", ["--host", "win8", "--cabs", iso]), ("status", [])):
        reports[command] = root / f"{command}.jsonl"
        res = vhdtool("batch", command, *images, *extra, "--jobs", "2", "--report", reports[command])
        assert res.returncode == 21, res.stderr  # the damaged image fails every command
    return root, images, reports


class Page(HTMLParser):
    """Every start tag with its attributes, the text of <style> and <script>, and each table's body rows."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.raw: dict[str, list[str]] = {"style": [], "script": [], "title": []}
        self.tables: dict[str, list[dict]] = {}
        self._stack: list[str] = []
        self._ids: list[tuple[str, str]] = []  # (tag, id) of the open elements that have an id
        self.texts: dict[str, list[str]] = {}
        self._table = self._row = self._cell = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        self._stack.append(tag)
        if a.get("id"):
            self._ids.append((tag, a["id"]))
            self.texts.setdefault(a["id"], [])
        if tag == "table":
            self._table = self.tables.setdefault(a.get("id") or f"#{len(self.tables)}", [])
        elif tag == "tr" and "tbody" in self._stack and self._table is not None:
            self._row = {"attrs": a, "cells": []}
            self._table.append(self._row)
        elif tag == "td" and self._row is not None:
            self._cell = []
            self._row["cells"].append(self._cell)

    def handle_endtag(self, tag):
        if self._ids and self._ids[-1][0] == tag:
            self._ids.pop()
        if tag in self._stack:
            del self._stack[len(self._stack) - 1 - self._stack[::-1].index(tag):]
        if tag == "td":
            if self._cell is not None:
                self._row["cells"][-1] = "".join(self._cell)
            self._cell = None
        elif tag == "tr":
            self._row = None

    def handle_data(self, data):
        for _, name in self._ids:
            self.texts[name].append(data)
        if self._stack and self._stack[-1] in self.raw and "svg" not in self._stack:
            self.raw[self._stack[-1]].append(data)
        if self._cell is not None:
            self._cell.append(data)

    def rows(self, table: str) -> list[dict]:
        return self.tables[table]

    def text(self, element_id: str) -> str:
        return "".join(self.texts[element_id])


def stem(image: str) -> str:
    return Path(image).name.rsplit(".", 1)[0]


def external_resources(page: Page, text: str) -> list[str]:
    found = []
    for tag, attrs in page.tags:
        if tag in ("link", "img", "iframe", "object", "embed", "audio", "video", "source", "base", "frame"):
            found.append(f"<{tag}>")
        for name, value in attrs.items():
            v = (value or "").strip().lower()
            if name in ("src", "href", "xlink:href", "action", "formaction", "srcset", "poster", "data") and \
                    (v.startswith(("http:", "https:", "//", "ftp:")) or "://" in v):
                found.append(f"{tag} {name}={value}")
            if name == "src":
                found.append(f"{tag} src={value}")  # nothing on the page is loaded, not even locally
    found += [w for w in ("@import", "url(", "@font-face") if w in text.lower()]  # in <style> or an attribute
    found += [w for w in ("fetch(", "xmlhttprequest", "import(", "websocket", ".src") if
              w in "".join(page.raw["script"]).lower()]
    return found


def test_the_page_has_one_row_per_image_failures_first_and_the_counts_of_report_json(fleet, tmp_path):
    root, images, reports = fleet
    out = tmp_path / "fleet.html"
    files = list(reports.values())
    res = vhdtool("report", "--html", out, *files)
    assert res.returncode == 21, res.stderr
    assert res.stdout == vhdtool("report", *files).stdout  # the text summary is printed as before
    doc = json.loads(vhdtool("report", "--json", *files).stdout)
    text = out.read_text(encoding="utf-8")
    page = Page(text)

    rows = page.rows("images")
    assert sorted(r["cells"][0] for r in rows) == sorted(map(str, images))  # one row per image, the path whole
    got = {stem(r["cells"][0]): (r["attrs"]["data-outcome"], int(r["cells"][6] or 0)) for r in rows}
    assert got == EXPECTED
    outcomes = [r["attrs"]["data-outcome"] for r in rows]
    assert outcomes == sorted(outcomes, key=["failed", "nothing", "ok"].index)  # failures first
    assert [int(r["cells"][6]) for r in rows[:2]] == [4, 18]
    by = {stem(r["cells"][0]): r["cells"] for r in rows}
    image, guest, ic, action, staged, status, code, message = by["ws2008r2-x64"]
    assert guest == "Windows Server 2008 R2 Standard x64" and ic == "6.1.7601.17514"
    assert action == "stage: integration-services-disk (staged)" and status == "pending" and message == ""
    assert by["ubuntu-ext4"][1] == "Ubuntu 22.04.3 LTS" and by["ubuntu-ext4"][5] == "none"
    assert by["ws2012-sysprep"][3].startswith("none: up-to-date") and by["ws2012-sysprep"][4] == ""
    assert "hibernated" in by["ws2008r2-hibernated"][7] and by["ws2008r2-hibernated"][5] == "none"
    stage_rec = [json.loads(line) for line in reports["stage"].read_text().splitlines()]
    assert staged == next(r["result"]["id"] for r in stage_rec if stem(r["image"]) == "ws2008r2-x64")

    # The counts are report --json's: per command and image, ok + nothing to do = ok, failed by exit code.
    counted = {r["cells"][0]: [int(c) for c in r["cells"][1:]] for r in page.rows("outcomes")}
    assert sum(v[-1] for v in counted.values()) == doc["images"] == 24
    # 24 results are not 24 images: the text and JSON say how many images there are (6).
    assert doc["distinct_images"] == len(images) == 6
    assert res.stdout.startswith(f"report: 24 results of 4 commands for 6 images: {doc['outcomes']['ok']} ok, ")
    assert sum(v[-1] for k, v in counted.items() if k.startswith("failed")) == doc["outcomes"]["failed"]
    assert counted["ok"][-1] + counted["nothing to do"][-1] == doc["outcomes"]["ok"]
    fails = Counter(f["exit_code"] for f in doc["failures"])
    assert {k: v[-1] for k, v in counted.items() if k.startswith("failed")} == {
        "failed: exit 4 (corrupt image)": fails[4], "failed: exit 18 (guest not clean)": fails[18]}
    per_command = [sum(v[i] for v in counted.values()) for i in range(4)]
    assert per_command == [doc["by_command"][c] for c in ("inspect", "plan", "stage", "status")]
    states = {r["cells"][0]: int(r["cells"][1]) for r in page.rows("states")}
    assert states == {k.split(" ", 1)[1]: v for k, v in doc["by_method"].items() if k.startswith("status ")}
    assert states == {"pending": 2, "none": 3}

    # Hostile text stays text: the one script is ours, no <b> from the file name, the path reads whole.
    assert [t for t, _ in page.tags if t in ("script", "b")] == ["script"]
    hostile = next(r for r in rows if HOSTILE_DIR in r["cells"][0])
    assert hostile["cells"][0].endswith(f"{HOSTILE_DIR}/{HOSTILE_FILE}")
    assert hostile["cells"][7].startswith(f"inspect, plan, stage, status: {hostile['cells'][0]}: both VHDX headers")
    assert external_resources(page, text) == []
    csp = next(a["content"] for t, a in page.tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy")
    assert csp.startswith("default-src 'none';") and "unsafe-inline" not in csp
    assert len([t for t, a in page.tags if t == "svg"]) == 2  # outcomes and status states


def test_one_command_report_and_write_errors(fleet, tmp_path):
    root, images, reports = fleet
    out = tmp_path / "stage.html"
    out.write_text("old")
    res = vhdtool("report", "--json", "--html", out, reports["stage"])
    assert res.returncode == 21 and json.loads(res.stdout)["images"] == 6
    page = Page(out.read_text())
    assert len(page.rows("images")) == 6 and [p.name for p in tmp_path.iterdir()] == ["stage.html"]
    assert {r["cells"][0]: int(r["cells"][-1]) for r in page.rows("outcomes")} == {
        "failed: exit 4 (corrupt image)": 1, "failed: exit 18 (guest not clean)": 1, "nothing to do": 2, "ok": 2}
    missing = tmp_path / "no" / "such" / "x.html"
    res = vhdtool("report", "--html", missing, reports["stage"])
    assert res.returncode == 15 and res.stderr.count("\n") == 1 and str(missing) in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_records_with_odd_values_are_shown_not_fatal(tmp_path):
    """Records a batch never writes but a hand-edited or foreign report may hold: odd types everywhere."""
    base = {"schema": 1, "record": "vhdtool-batch", "started": 7, "seconds": "x"}
    recs = [
        dict(base, command="status", key="a", image="a.vhdx", outcome="ok", exit_code=0,
             result={"state": 5, "staged": "not a list", "ic_version": ["6.1"]}),
        dict(base, command="plan", key="a", image="a.vhdx", outcome="ok", exit_code=0,
             result={"action": {"x": 1}, "method": None, "guest_key": 3, "guest": {"linux": {"pretty_name": 1}}}),
        dict(base, command="stage", key="b", image="b.vhdx", outcome="failed", exit_code="9",
             error={"code": "nine", "message": None}),
        dict(base, command="future", key="b", image="b.vhdx", outcome="ok", exit_code=0, result=[1, 2]),
        dict(base, command="stage", key="c", image="c.vhdx", outcome="failed", exit_code=4,
             error={"code": 4, "message": "c.vhdx: <i>bad</i>"}, seconds=1.5),
    ]
    report = tmp_path / "odd.jsonl"
    report.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "odd.html"
    res = vhdtool("report", "--html", out, report)
    assert res.returncode == 21 and "Traceback" not in res.stderr, res.stderr
    page = Page(out.read_text())
    rows = {r["cells"][0]: r for r in page.rows("images")}
    assert list(rows) == ["b.vhdx", "c.vhdx", "a.vhdx"] and rows["b.vhdx"]["attrs"]["data-outcome"] == "failed"
    assert rows["b.vhdx"]["cells"][7] == "stage: None" and rows["a.vhdx"]["cells"][5] == ""
    assert rows["c.vhdx"]["cells"][6:] == ["4", "stage: c.vhdx: <i>bad</i>"] and "i" not in dict(page.tags)
    assert {r["cells"][0]: r["cells"][-1] for r in page.rows("outcomes")} == {
        "failed: exit nine": "1", "failed: exit 4 (corrupt image)": "1", "ok": "3"}
    doc = json.loads(vhdtool("report", "--json", report).stdout)
    assert [f["exit_code"] for f in doc["failures"]] == ["nine", 4] and doc["seconds"] == 1.5
    assert [r["cells"] for r in page.rows("states")] == [["unknown", "1"]]


def test_records_with_a_list_for_shard_or_an_object_for_a_code_are_counted_not_fatal(tmp_path):
    """A shard or machine that is a list (no dict key) and a failure code that is an object (no width
    to format it to) made all three forms of the report exit 70."""
    base = {"schema": 1, "record": "vhdtool-batch", "command": "stage", "started": "2026-12-07T05:00:00.000Z"}
    recs = [dict(base, key="a", image="a.vhdx", outcome="ok", exit_code=0, result={}, shard=[1, 2], machine=["m"]),
            dict(base, key="a", image="a.vhdx", outcome="ok", exit_code=0, result={}, shard="1", machine={"m": 1}),
            dict(base, key="b", image="b.vhdx", outcome="failed", exit_code=4, shard=None,
                 error={"code": {"n": 4}, "message": "b.vhdx: bad"})]
    report = tmp_path / "odd.jsonl"
    report.write_text("".join(json.dumps(r) + "\n" for r in recs))
    text = vhdtool("report", report)
    assert text.returncode == 21 and "    exit {'n': 4}  b.vhdx: bad" in text.stdout, text.stdout + text.stderr
    doc = json.loads(vhdtool("report", "--json", report).stdout)
    assert doc["duplicates"] == ["stage a"] and doc["by_shard"] == {"1": 1, "none": 1}, doc
    out = tmp_path / "odd.html"
    res = vhdtool("report", "--html", out, report)
    assert res.returncode == 21 and res.stderr == "", res.stderr
    assert [r["cells"][0] for r in Page(out.read_text()).rows("images")] == ["b.vhdx", "a.vhdx"]

def test_the_page_is_never_written_over_a_batch_report(tmp_path):
    """`report --html a.jsonl b.jsonl` (OUT.html forgotten) and OUT.html given as one of the reports read
    would have replaced a report with the page: refused, exit 15, the report byte for byte as it was."""
    rec = {"schema": 1, "record": "vhdtool-batch", "command": "status", "outcome": "ok", "exit_code": 0, "result": {}}
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(json.dumps(dict(rec, key="a", image="a.vhdx")) + "\n")
    b.write_text(json.dumps(dict(rec, key="b", image="b.vhdx")) + "\n")
    before = a.read_bytes()
    for args in ((a, b), (a, a), (a, b, a)):
        res = vhdtool("report", "--html", *args)
        assert res.returncode == 15 and res.stdout == "" and res.stderr.count("\n") == 1, res
        assert str(a) in res.stderr and "is a batch report" in res.stderr and "Traceback" not in res.stderr
        assert a.read_bytes() == before
    page = tmp_path / "page.html"
    page.write_text("an older page")
    assert vhdtool("report", "--html", page, a, b).returncode == 0  # any other file is replaced
    assert [r["cells"][0] for r in Page(page.read_text()).rows("images")] == ["a.vhdx", "b.vhdx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl", "page.html"]


# -- chromium ------------------------------------------------------------------------------------

def chromium(url: str, tmp: Path, *mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                           "--no-first-run", "--disable-background-networking", "--disable-component-update",
                           "--disable-sync", "--disable-extensions", "--host-resolver-rules=MAP * ~NOTFOUND",
                           f"--user-data-dir={tmp / 'profile'}",
                           *mode, url], capture_output=True, text=True, timeout=60)


def png_pixels(path: Path) -> tuple[int, int, bytes]:
    """Width, height and the RGBA (or RGB) bytes of a PNG, decoded here (8-bit, non-interlaced)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, head = 8, [], None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IHDR":
            head = struct.unpack(">IIBBBBB", data[pos + 8:pos + 21])
        elif kind == b"IDAT":
            idat.append(data[pos + 8:pos + 8 + n])
        pos += 12 + n
    width, height, depth, color, _, _, interlace = head
    assert depth == 8 and color in (2, 6) and interlace == 0, head
    bpp = 4 if color == 6 else 3
    raw, stride, out, prev = zlib.decompress(b"".join(idat)), width * bpp, bytearray(), bytearray(width * bpp)
    for y in range(height):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        out += line
        prev = line
    return width, height, bytes(out)


@pytest.fixture(scope="module")
def browser():
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium; install.sh lists it)")
    return CHROMIUM


def test_chromium_renders_the_table_and_its_script_sorts_and_filters(fleet, browser, tmp_path):
    root, images, reports = fleet
    out = tmp_path / "fleet.html"
    assert vhdtool("report", "--html", out, *reports.values()).returncode == 21
    url = out.as_uri()
    t0 = time.monotonic()

    def dom(fragment: str = "", *flags: str) -> Page:
        res = chromium(url + fragment, tmp_path, "--dump-dom", *flags)
        assert res.returncode == 0 and "<tbody>" in res.stdout, res.stderr[-2000:]
        return Page(res.stdout)

    def shown(page: Page) -> list[list]:
        return [r["cells"] for r in page.rows("images") if "hidden" not in r["attrs"]]

    page = dom()
    assert len(page.rows("images")) == len(images) == len(shown(page))
    controls = next(a for t, a in page.tags if t == "div" and a.get("id") == "controls")
    assert "hidden" not in controls  # the script ran: the page's CSP let its own script through, by hash
    # The hostile name ran nothing (it would have set the title) and made no element.
    assert "".join(page.raw["title"]) == "vhdtool report: 6 images, 2 failed"
    assert [t for t, _ in page.tags if t in ("script", "b")] == ["script"]
    assert page.text("shown") == "6 of 6 images shown"

    failed = shown(dom("#outcome=failed"))
    assert sorted(stem(c[0]) for c in failed) == sorted(k for k, v in EXPECTED.items() if v[0] == "failed")
    assert [stem(c[0]) for c in shown(dom("#q=ubuntu"))] == ["ubuntu-ext4"]
    by_exit = [int(c[6]) for c in shown(dom("#sort=exit&desc=1"))]
    assert by_exit == sorted((v[1] for v in EXPECTED.values()), reverse=True)
    by_exit = [int(c[6]) for c in shown(dom("#sort=exit"))]
    assert by_exit == sorted(v[1] for v in EXPECTED.values())

    def screenshot(name: str, *flags: str) -> None:
        png = tmp_path / f"{name}.png"
        res = chromium(url, tmp_path, f"--screenshot={png}", "--window-size=1000,900", "--hide-scrollbars", *flags)
        assert res.returncode == 0 and png.exists(), res.stderr[-2000:]
        width, height, px = png_pixels(png)
        bpp = len(px) // (width * height)
        colours = Counter(px[i:i + 3] for i in range(0, len(px), bpp))
        # The failed bar (#c62828) and the failed rows' background (#fdecea) are drawn; the page is not blank.
        assert colours[bytes((0xc6, 0x28, 0x28))] > 500, colours.most_common(8)
        assert colours[bytes((0xfd, 0xec, 0xea))] > 1000, colours.most_common(8)
        assert colours[bytes((255, 255, 255))] < width * height * 0.95
        keep = os.environ.get("VHDTOOL_KEEP_SCREENSHOT")
        if keep:
            shutil.copyfile(png, f"{keep}-{name}.png")

    screenshot("scripted")

    # Without JavaScript: a copy whose Content-Security-Policy lets no script run (chromium's own switch,
    # scriptEnabled=false, also stops --dump-dom). Every row, in the page's first order; the controls,
    # which only the script makes work, stay hidden.
    text = out.read_text()
    policy = re.search(r"script-src 'sha256-[A-Za-z0-9+/=]+'", text).group(0)
    out.write_text(text.replace(policy, "script-src 'none'"))
    plain = dom()
    assert [r["cells"] for r in plain.rows("images")] == [r["cells"] for r in page.rows("images")]
    assert len(shown(plain)) == len(images) and plain.text("shown") == ""
    assert "hidden" in next(a for t, a in plain.tags if t == "div" and a.get("id") == "controls")
    seconds = time.monotonic() - t0
    print(f"chromium: 6 page loads and a screenshot in {seconds:.1f} s")
