"""Running a judging tool: sh() raises AssertionError with the tool's stderr when it fails."""

from __future__ import annotations

import subprocess


def sh(*cmd: object, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}: {proc.stderr.decode()}")
    return proc
