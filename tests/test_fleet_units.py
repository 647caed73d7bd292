"""The fleet's pure parts: shard arithmetic, scheduler environments, manifest parsing, report reading."""

from __future__ import annotations

import json
import random

import pytest

from vhdtool.errors import BadManifest, BadReport
from vhdtool.fleet import manifest, shard
from vhdtool.fleet.records import latest, read_reports


@pytest.mark.parametrize("n", [1, 2, 3, 7, 16])
def test_shards_partition_any_order_evenly(n):
    keys = [f"/share/vm{i:04d}.vhdx" for i in range(1000)]
    jobs = [manifest.Job(k, k) for k in keys]
    parts = [shard.Shard(k, n, "test").select(jobs) for k in range(1, n + 1)]
    got = [j.key for p in parts for j in p]
    assert sorted(got) == sorted(keys)  # every image once
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    shuffled = jobs[:]
    random.Random(n).shuffle(shuffled)
    for k in range(1, n + 1):  # the same split whatever the input order; each shard keeps the input's order
        mine = shard.Shard(k, n, "test").select(shuffled)
        assert sorted(j.key for j in mine) == sorted(j.key for j in parts[k - 1])
        assert mine == [j for j in shuffled if j in mine]


@pytest.mark.parametrize("env, want", [
    ({}, None),
    ({"JOB_COMPLETION_INDEX": "0", "VHDTOOL_SHARDS": "5"}, (1, 5)),
    ({"JOB_COMPLETION_INDEX": "4", "VHDTOOL_SHARDS": "5"}, (5, 5)),
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}, (4, 4)),
    ({"SLURM_ARRAY_TASK_ID": "10", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1",
      "SLURM_ARRAY_TASK_MAX": "10", "SLURM_ARRAY_TASK_STEP": "3"}, (4, 4)),
])
def test_shard_from_the_environment(env, want):
    got = shard.choose(None, None, env)
    if want:
        assert (got.index, got.count) == want
    else:
        assert got is None


@pytest.mark.parametrize("spec, shards, env", [
    ("0/3", None, {}), ("4/3", None, {}), ("1/0", None, {}), ("a/b", None, {}),
    (None, None, {"JOB_COMPLETION_INDEX": "3", "VHDTOOL_SHARDS": "3"}),
    (None, None, {"JOB_COMPLETION_INDEX": "x", "VHDTOOL_SHARDS": "3"}),
    (None, 4, {}),
    (None, None, {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1",
                  "SLURM_ARRAY_TASK_MAX": "9", "SLURM_ARRAY_TASK_STEP": "1"}),  # --array=1,2,9: gaps
])
def test_bad_shards_are_refused(spec, shards, env):
    with pytest.raises(BadManifest):
        shard.choose(spec, shards, env)


def test_explicit_shard_wins_over_the_environment():
    got = shard.choose("2/3", None, {"JOB_COMPLETION_INDEX": "0", "VHDTOOL_SHARDS": "9"})
    assert (got.index, got.count, got.source) == (2, 3, "--shard 2/3")


def test_csv_manifests(tmp_path):
    m = tmp_path / "sub" / "m.csv"
    m.parent.mkdir()
    # A BOM and CRLF, as Excel writes them; a quoted path with a comma; blank and comment rows.
    m.write_bytes("\ufeffImage,Host,Output,Cabs\r\n\"vm, one.vhdx\",win8,,iso/vmguest.iso\r\n\r\n# x\r\n"
                  "/abs/vm2.vhdx,,out/vm2.vhdx,\r\n".encode("utf-8"))
    jobs = manifest.read_manifest(str(m))
    assert [(j.key, j.image, j.host, j.output, j.cabs) for j in jobs] == [
        ("vm, one.vhdx", str(m.parent / "vm, one.vhdx"), "win8", None, (str(m.parent / "iso/vmguest.iso"),)),
        ("/abs/vm2.vhdx", "/abs/vm2.vhdx", None, str(m.parent / "out/vm2.vhdx"), ()),
    ]
    m.write_text("a.vhdx\nb.vhdx,win10\n")  # no header: image first
    assert [(j.key, j.host) for j in manifest.read_manifest(str(m))] == [("a.vhdx", None), ("b.vhdx", "win10")]


def test_jsonl_manifest_and_dedupe(tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"image": "a.vhdx", "cabs": ["x.iso", "y"]}) + "\n" + json.dumps({"path": "./a.vhdx"}) + "\n")
    jobs, warnings = manifest.collect([], [str(m)])
    assert len(jobs) == 1 and jobs[0].cabs == (str(tmp_path / "x.iso"), str(tmp_path / "y")) and warnings


@pytest.mark.parametrize("content", [b"\xff\xfe", b'{"image": ["a"]}\n', b'{"image": "a", "cabs": [1]}\n',
                                     b'["a"]\n', b'{"colour": 1}\n'])
def test_bad_manifest_content(tmp_path, content):
    m = tmp_path / "m.jsonl"
    m.write_bytes(content)
    with pytest.raises(BadManifest) as e:
        manifest.read_manifest(str(m))
    assert str(m) in e.value.message and "\n" not in e.value.message


def test_report_reading_is_tolerant_of_foreign_lines_and_picks_the_last_record(tmp_path):
    r = tmp_path / "r.jsonl"
    base = {"schema": 1, "record": "vhdtool-batch", "command": "stage", "key": "a", "image": "a"}
    lines = [dict(base, outcome="failed", error={"code": 4, "message": "m"}, started="2026-11-30T10:00:00.000Z"),
             dict(base, outcome="ok", result={}, started="2026-11-30T11:00:00.000Z"),
             {"something": "else"}, dict(base, outcome="maybe"), dict(base, schema=2, outcome="ok")]
    r.write_text("\n".join(json.dumps(x) for x in lines) + "\n[1,2\n")
    loaded = read_reports([str(r)])
    assert len(loaded.records) == 2 and len(loaded.skipped_lines) == 4
    assert latest(loaded.records)[("stage", "a")]["outcome"] == "ok"
    with pytest.raises(BadReport):
        read_reports([str(tmp_path / "missing.jsonl")])
    assert read_reports([str(tmp_path / "missing.jsonl")], missing_ok=True).records == []
