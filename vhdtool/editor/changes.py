"""What an edit session did: the files and registry values it changed, and the commit's outcome (its --json form)."""

from __future__ import annotations

from dataclasses import dataclass

SCHEMA = 1


@dataclass(frozen=True)
class FileChange:
    path: str
    action: str  # "add" | "replace" | "mkdir" | "delete" | "symlink" | "rmdir"
    size: int | None
    sha256: str | None
    partition: int
    target: str | None = None  # a symlink's target text

    def to_dict(self) -> dict:
        out = {"path": self.path, "action": self.action, "size": self.size, "sha256": self.sha256,
               "partition": self.partition}
        if self.target is not None:
            out["target"] = self.target
        return out


@dataclass(frozen=True)
class RegistryChange:
    hive: str
    key: str
    name: str
    type: str
    old: object
    new: object

    def to_dict(self) -> dict:
        return {"hive": self.hive, "key": self.key, "name": self.name, "type": self.type, "old": self.old, "new": self.new}


@dataclass(frozen=True)
class ChangeSet:
    image: str
    output: str | None
    dry_run: bool
    committed: bool
    files: tuple[FileChange, ...]
    registry: tuple[RegistryChange, ...]
    bytes_written: int
    log_replayed: bool
    changed_bytes: int  # of the virtual disk
    notes: tuple[str, ...] = ()  # what was asked for and needed nothing, and why (e.g. a udev-started daemon)

    def to_dict(self) -> dict:
        out = {
            "schema": SCHEMA,
            "image": self.image,
            "output": self.output,
            "dry_run": self.dry_run,
            "committed": self.committed,
            "changes": {"files": [f.to_dict() for f in self.files], "registry": [r.to_dict() for r in self.registry]},
            "bytes_written": self.bytes_written,
            "log_replayed": self.log_replayed,
        }
        if self.notes:
            out["notes"] = list(self.notes)
        return out
