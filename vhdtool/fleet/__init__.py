"""The fleet: one command over many images, in parallel worker processes, resumable, shardable.

- ``manifest``: the images of a batch, from paths, globs and CSV / JSON-lines manifests.
- ``shard``: a deterministic 1/N of them (``--shard K/N``, or Kubernetes' and Slurm's
  array environments), so that N machines split a fleet with no coordinator of ours.
- ``records``: the report, one JSON line per image, flushed as each finishes; reading
  reports back (``--resume``, ``vhdtool report``) and summarising them.
- ``work`` and ``worker``: what a worker process does with one image.
- ``pool``: the worker processes, a per-image time limit, and the stop on a signal.
- ``batch``: all of it together.
"""
