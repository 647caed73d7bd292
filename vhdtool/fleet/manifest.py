"""The images of a batch: paths and globs on the command line, and manifest files.

A manifest is CSV or JSON lines, one image per row, with optional per-image
``host``, ``output`` (write a changed copy there) and ``cabs`` (a cab source).

    image,host,output,cabs                    {"image": "vm1.vhdx", "host": "win8"}
    vm1.vhdx,win8,,                           {"image": "vm2.vhdx", "cabs": "iso/vmguest.iso"}

CSV may leave out the header when its first column is the image. Relative paths
in a manifest are relative to the manifest's folder. Blank rows and rows starting
with ``#`` are skipped.

Each image has a key: its path as written (normalised), which sharding and
``--resume`` use, so that the same manifest gives the same keys on every machine.
An image listed twice, under the same key or as the same file under another
path, runs once: two workers must not write one file.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
from dataclasses import dataclass

from vhdtool.errors import BadManifest, ImageNotFound

COLUMNS = ("image", "host", "output", "cabs")
MAX_MANIFEST_BYTES = 64 * 1024 * 1024  # a million images of 64 bytes; more is not a manifest
GLOB_CHARS = "*?["


@dataclass(frozen=True)
class Job:
    key: str  # the path as written: sharding and --resume go by it
    image: str  # the path to open
    host: str | None = None
    output: str | None = None
    cabs: tuple[str, ...] = ()
    source: str = ""  # "argument" or "manifest.csv:12", for messages

    def to_dict(self) -> dict:
        """What a worker is sent (vhdtool.fleet.worker); ``from_dict`` reads it back."""
        return {"key": self.key, "image": self.image, "host": self.host, "output": self.output,
                "cabs": list(self.cabs)}

    @classmethod
    def from_dict(cls, d: dict) -> Job:
        return cls(d["key"], d["image"], d.get("host"), d.get("output"), tuple(d.get("cabs") or ()))


def collect(arguments: list[str], manifests: list[str]) -> tuple[list[Job], list[str]]:
    """The jobs named by ``arguments`` (paths or globs) and ``manifests``, each once; and warnings."""
    jobs: list[Job] = []
    for arg in arguments:
        if any(c in arg for c in GLOB_CHARS) and not os.path.exists(arg):
            matches = sorted(glob.glob(arg, recursive=True))
            if not matches:
                raise ImageNotFound(arg, "the pattern matches no file", "check the pattern (quote it so the shell leaves it)")
            jobs.extend(Job(os.path.normpath(m), m, source="argument") for m in matches)
        else:
            jobs.append(Job(os.path.normpath(arg), arg, source="argument"))
    for m in manifests:
        jobs.extend(read_manifest(m))
    return dedupe(jobs)


def dedupe(jobs: list[Job]) -> tuple[list[Job], list[str]]:
    seen_keys: dict[str, Job] = {}
    seen_files: dict[tuple[int, int], Job] = {}
    out, warnings = [], []
    for job in jobs:
        try:
            st = os.stat(job.image)
        except OSError:
            st = None  # a missing image fails on its own, in its own record
        first = seen_keys.get(job.key)
        if first is not None and st is not None and first.image != job.image:
            try:
                same = os.path.samefile(first.image, job.image)
            except OSError:
                same = False
            if not same:
                raise BadManifest(job.source, f"{job.image} and {first.image} ({first.source}) are two images written "
                                              f"the same way, {job.key!r}: sharding and --resume could not tell them apart",
                                  "name them by paths that differ (say, relative to one manifest's folder)")
        if first is None and st is not None:
            first = seen_files.get((st.st_dev, st.st_ino))
        if first is not None:
            warnings.append(f"{job.image} ({job.source}) is {first.image} ({first.source}) again; it runs once")
            continue
        seen_keys[job.key] = job
        if st is not None:
            seen_files[(st.st_dev, st.st_ino)] = job
        out.append(job)
    return out, warnings


def read_manifest(path: str) -> list[Job]:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise ImageNotFound(path, "no such manifest") from None
    except OSError as e:
        raise BadManifest(path, f"cannot be read ({e.strerror})") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise BadManifest(path, f"is larger than {MAX_MANIFEST_BYTES >> 20} MiB", "split it into several manifests")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise BadManifest(path, f"is not UTF-8 text (byte {e.start})") from None
    base = os.path.dirname(path)
    lower = path.lower()
    first = next((line.lstrip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")), "")
    if lower.endswith((".jsonl", ".ndjson", ".json")) or (not lower.endswith(".csv") and first.startswith("{")):
        rows = _json_rows(path, text)
    else:
        rows = _csv_rows(path, text)
    jobs = []
    for where, row in rows:
        jobs.append(_job(path, base, where, row))
    return jobs


def _json_rows(path: str, text: str):
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise BadManifest(path, f"line {n}: not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise BadManifest(path, f"line {n}: not a JSON object")
        unknown = sorted(set(row) - set(COLUMNS) - {"path"})
        if unknown:
            raise BadManifest(path, f"line {n}: unknown field {unknown[0]!r} (fields: {', '.join(COLUMNS)})")
        if "path" in row and "image" not in row:
            row["image"] = row.pop("path")
        yield n, row


def _csv_rows(path: str, text: str):
    try:
        table = list(csv.reader(io.StringIO(text)))
    except csv.Error as e:
        raise BadManifest(path, f"not CSV ({e})") from None
    columns = list(COLUMNS)
    header_seen = False
    for n, cells in enumerate(table, 1):
        cells = [c.strip() for c in cells]
        if not any(cells) or cells[0].startswith("#"):
            continue
        if not header_seen:
            header_seen = True
            names = [c.lower() for c in cells]
            if names[0] in ("image", "path"):
                unknown = [c for c in names if c and c not in COLUMNS and c != "path"]
                if unknown:
                    raise BadManifest(path, f"line {n}: unknown column {unknown[0]!r} (columns: {', '.join(COLUMNS)})")
                columns = ["image" if c == "path" else c for c in names]
                continue
        if len(cells) > len(columns):
            raise BadManifest(path, f"line {n}: {len(cells)} cells, but only {len(columns)} columns "
                                    f"({', '.join(columns)})")
        yield n, {c: v for c, v in zip(columns, cells) if v}


def _job(path: str, base: str, n: int, row: dict) -> Job:
    where = f"{path}:{n}"

    def text(name: str) -> str | None:
        value = row.get(name)
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise BadManifest(path, f"line {n}: {name} must be a string")
        return value

    image = text("image")
    if image is None:
        raise BadManifest(path, f"line {n}: no image")
    cabs = row.get("cabs")
    if isinstance(cabs, list):
        if not all(isinstance(c, str) and c for c in cabs):
            raise BadManifest(path, f"line {n}: cabs must be a path or a list of paths")
        cabs_t = tuple(cabs)
    else:
        one = text("cabs")
        cabs_t = (one,) if one else ()
    output = text("output")
    host = text("host")

    def resolve(p: str) -> str:
        return p if os.path.isabs(p) else os.path.join(base, p)

    return Job(key=os.path.normpath(image), image=resolve(image), host=host,
               output=resolve(output) if output else None, cabs=tuple(resolve(c) for c in cabs_t), source=where)
