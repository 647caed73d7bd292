"""The fleet: one command over many images, in parallel worker processes, resumable, shardable.

- ``manifest``: the images of a batch, from paths, globs and CSV / JSON-lines manifests.
- ``shard``: a deterministic 1/N of them (``--shard K/N``, or Kubernetes' and Slurm's
  array environments), so that N machines split a fleet with no coordinator of ours.
- ``records``: the report, one JSON line per image, flushed as each finishes; reading
  reports back (``--resume``, ``vhdtool report``) and summarising them.
- ``overview`` and ``htmlreport``: ``vhdtool report --html``, one row per image and the
  counts, rendered as one self-contained page (no network, everything from a report escaped).
- ``work``: the batch's command on one image (``ImageCommand``), set up once and inherited
  by every worker process.
- ``worker``: the life of one worker process, forked from the batch: requests in, answers out.
- ``pool``: the worker processes (the parent's ``_WorkerHandle`` on each), a per-image time
  limit, and the stop on a signal.
- ``batch``: all of it together.
"""
