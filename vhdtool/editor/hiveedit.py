"""The edit session's registry edits: the system volume's hives read as Windows will see them at boot
(their logs replayed), edited by libhivex at the commit, and queued as whole-file writes."""

from __future__ import annotations

import io

from vhdtool.editor.changes import RegistryChange
from vhdtool.editor.paths import CONFIG_DIR, HIVES
from vhdtool.errors import UnsupportedLayout
from vhdtool.filesystem import ntfs3g
from vhdtool.guest.hivefiles import read_hive_files


class HiveEdits:
    """The hive edits of one EditSession (``session``: its system volume and image path)."""

    def __init__(self, session):
        self.session = session
        self.path = session.path
        self._edits: dict[str, list] = {}  # hive name -> HiveEdits, in order
        self._boot: dict[str, tuple] = {}  # hive name -> (Replayed, HiveFiles), read once

    def set_value(self, hive: str, key: str, name: str, value, type: str | int) -> None:
        from vhdtool.registry.values import HiveEdit

        self._hive(hive).append(HiveEdit.set_value(key, name, value, type))

    def delete_value(self, hive: str, key: str, name: str) -> None:
        from vhdtool.registry.values import HiveEdit

        self._hive(hive).append(HiveEdit.delete_value(key, name))

    def boot_hive(self, name: str):
        """The system volume's hive ``name`` as Windows will see it at boot (logs replayed), with its files.

        Read and replayed once a session: the volume does not change before the commit."""
        from vhdtool.registry.logreplay import replay

        if name not in self._boot:
            _part, fs = self.session._volume(None)
            path = f"{CONFIG_DIR}/{name}"
            if not fs.exists(path):
                raise UnsupportedLayout(self.path, f"the guest has no {name} hive", "check the image's Windows")
            files = read_hive_files(fs, path, name, self.path)
            self._boot[name] = (replay(files.primary, files.log1, files.log2, name, self.path), files)
        return self._boot[name]

    def read_value(self, hive: str, key: str, name: str, default=None):
        from vhdtool.registry.hive import Hive

        hive = hive.upper()
        current, _files = self.boot_hive(hive)
        return Hive(io.BytesIO(current.data), hive, self.path).value(key, name, default)

    def _hive(self, hive: str) -> list:
        name = hive.upper()
        if name not in HIVES:
            raise UnsupportedLayout(self.path, f"unknown hive {hive}", f"use one of {', '.join(HIVES)}")
        self.session._volume(None)  # the refusals of the system volume, now rather than at commit
        return self._edits.setdefault(name, [])

    def run(self, registry: list[RegistryChange]) -> list:
        """Each edited hive brought up to date from its logs if dirty, edited by libhivex, made so Windows
        will not replay its old logs over the change; the WriteFile operations that put them back (to go
        before the volume's other operations), and each value changed appended to ``registry``."""
        if not self._edits:
            return []
        from vhdtool.registry.hivex import edit_hive
        from vhdtool.registry.logreplay import retire_logs

        queued = []
        for name, edits in self._edits.items():
            self._not_written_as_files(name)
            current, files = self.boot_hive(name)
            edited = edit_hive(current.data, edits, name, self.path)
            for outcome in edited.outcomes:
                if outcome.changed:
                    e = outcome.edit
                    new = e.value.to_json() if e.value is not None else None
                    old = outcome.old.to_json() if outcome.old is not None else None
                    kind = (e.value or outcome.old).type_name if (e.value or outcome.old) else "-"
                    registry.append(RegistryChange(name, e.key, e.name, kind, old, new))
            if edited.changed:
                data = retire_logs(edited.data, files.log1, files.log2, name, self.path)
                queued.append(ntfs3g.WriteFile(f"{CONFIG_DIR}/{name}", data))
        self._edits.clear()
        return queued

    def _not_written_as_files(self, name: str) -> None:
        """The edited hive is written whole, from the files as they are on disk, and its logs decide its sequence
        number: a write or delete of the hive's primary or logs in the same session would replace the edit or
        bring back logs it was not numbered above."""
        part, _fs = self.session._volume(None)
        for path in (f"{CONFIG_DIR}/{name}", *(f"{CONFIG_DIR}/{name}.{ext}" for ext in ("LOG", "LOG1", "LOG2"))):
            if self.session._pending(part.index, path):
                raise UnsupportedLayout(self.path, f"the {name} hive is edited and {path} is written in the same "
                                                   "session", "make the two changes in separate sessions")
