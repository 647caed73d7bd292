"""A deterministic 1/N of a batch's images, so that N machines split a fleet with no coordinator.

Shard K of N holds the images whose rank, in the order of the SHA-256 of their
keys, is K-1 modulo N. The order depends on the keys alone, so every machine
given the same images (in any order) computes the same split; shards differ in
size by at most one image, and hashing mixes large and small images across them.

Without ``--shard``, the shard comes from the scheduler's environment:
- a Kubernetes Indexed Job sets ``JOB_COMPLETION_INDEX`` (0-based) but not the number
  of completions, which is given as ``--shards N`` or ``VHDTOOL_SHARDS=N``;
- a Slurm job array sets ``SLURM_ARRAY_TASK_ID``, ``SLURM_ARRAY_TASK_COUNT``,
  ``SLURM_ARRAY_TASK_MIN`` and ``SLURM_ARRAY_TASK_STEP`` (``--array=0-7`` or ``1-8:1``;
  an array with gaps, such as ``--array=1,4,9``, cannot be numbered and is refused).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from vhdtool.errors import BadManifest

T = TypeVar("T")
SPEC = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")
MAX_SHARDS = 1_000_000


@dataclass(frozen=True)
class Shard:
    index: int  # 1-based, as users write it
    count: int
    source: str  # how it was chosen, said to the user

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def select(self, items: Sequence[T], key=lambda item: item.key) -> list[T]:
        ranked = sorted(items, key=lambda item: (hashlib.sha256(key(item).encode("utf-8", "surrogateescape")).digest(),
                                                 key(item)))
        mine = set(id(item) for item in ranked[self.index - 1::self.count])
        return [item for item in items if id(item) in mine]


def _shard(index: int, count: int, source: str) -> Shard:
    if not 1 <= count <= MAX_SHARDS:
        raise BadManifest(None, f"{source}: the number of shards must be 1 to {MAX_SHARDS}, not {count}",
                          "give --shard K/N with 1 <= K <= N")
    if not 1 <= index <= count:
        raise BadManifest(None, f"{source}: shard {index} of {count} does not exist", "give --shard K/N with 1 <= K <= N")
    return Shard(index, count, source)


def parse(spec: str) -> Shard:
    m = SPEC.fullmatch(spec)
    if not m:
        raise BadManifest(None, f"--shard {spec!r} is not K/N", "give --shard K/N, e.g. --shard 2/8")
    return _shard(int(m.group(1)), int(m.group(2)), f"--shard {spec.strip()}")


def _int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value.strip())
    except ValueError:
        raise BadManifest(None, f"{name}={value!r} is not a number", "check the job's environment") from None


def choose(spec: str | None, shards: int | None, env: Mapping[str, str]) -> Shard | None:
    """The shard of this run: ``--shard``, else the scheduler's environment, else None (all images)."""
    if spec:
        return parse(spec)
    index = _int(env, "JOB_COMPLETION_INDEX")
    if index is not None:
        count = shards if shards is not None else _int(env, "VHDTOOL_SHARDS")
        if count is None:
            raise BadManifest(None, f"JOB_COMPLETION_INDEX={index} is set, but not the number of shards",
                              "give --shards N or VHDTOOL_SHARDS=N (the Job's completions), or --shard K/N")
        return _shard(index + 1, count, f"JOB_COMPLETION_INDEX={index} of {count} (Kubernetes Indexed Job)")
    task = _int(env, "SLURM_ARRAY_TASK_ID")
    if task is not None:
        count = _int(env, "SLURM_ARRAY_TASK_COUNT")
        if count is None:
            raise BadManifest(None, f"SLURM_ARRAY_TASK_ID={task} is set, but not SLURM_ARRAY_TASK_COUNT",
                              "give --shard K/N")
        low = _int(env, "SLURM_ARRAY_TASK_MIN") or 0
        step = _int(env, "SLURM_ARRAY_TASK_STEP") or 1
        high = _int(env, "SLURM_ARRAY_TASK_MAX")
        offset = task - low
        regular = step > 0 and offset >= 0 and offset % step == 0 and (high is None or high == low + step * (count - 1))
        if not regular:
            raise BadManifest(None, f"the Slurm array (tasks {low}..{high}, step {step}, {count} tasks) cannot be "
                                    f"numbered 1..{count}", "use --array=A-B or A-B:S, or give --shard K/N")
        return _shard(offset // step + 1, count,
                      f"SLURM_ARRAY_TASK_ID={task} of {count} (Slurm job array {low}-{high if high is not None else '?'})")
    if shards is not None:
        raise BadManifest(None, "--shards N needs JOB_COMPLETION_INDEX (a Kubernetes Indexed Job)",
                          "give --shard K/N outside Kubernetes")
    return None
