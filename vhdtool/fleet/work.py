"""One image of a batch: the command's own work, returning the document its ``--json`` prints.

Runs in a worker process. What is costly to set up and the same for many images
(the matrix, the cab catalog of a source, which verifies every cab in it) is made
once and kept: the batch-wide ones in the batch process before the workers are
forked from it (``warm``), a manifest's own cab sources once per worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vhdtool.errors import UnknownKey

WRITES = ("stage", "services")  # the commands that take a per-image output


@dataclass
class Options:
    """A batch's own options of its command (the per-image manifest columns override host and cabs)."""

    command: str
    host: str | None = None
    cabs: tuple[str, ...] = ()
    revision: str | None = None
    dry_run: bool = False
    enable: tuple[str, ...] = ()
    disable: tuple[str, ...] = ()
    require_signed: bool = False
    trust_roots: tuple[str, ...] = ()


@dataclass
class ImageCommand:
    """The batch's command, run on one image at a time (``run``): made and warmed in the batch process,
    then inherited by every worker process forked from it."""

    options: Options
    _matrix: object = None
    _catalogs: dict = field(default_factory=dict)

    def matrix(self):
        if self._matrix is None:
            from vhdtool.plan.matrix import load_matrix

            self._matrix = load_matrix(self.options.revision)
        return self._matrix

    def catalog(self, cabs: tuple[str, ...]):
        if cabs not in self._catalogs:
            from vhdtool.plan.sources import load_sources

            self._catalogs[cabs] = load_sources(cabs, self.options.trust_roots, self.options.require_signed)
        return self._catalogs[cabs]

    def warm(self) -> None:
        """Import the command's code and load the batch-wide inputs, before the workers are forked from this one."""
        o = self.options
        if o.command == "inspect":
            import vhdtool.guest.discover  # noqa: F401
        elif o.command == "status":
            import vhdtool.stage.status  # noqa: F401
        elif o.command == "services":
            import vhdtool.editor.services  # noqa: F401
            import vhdtool.filesystem.ntfs3g  # noqa: F401
        else:
            import vhdtool.guest.discover  # noqa: F401
            import vhdtool.plan.decide  # noqa: F401

            if o.host and o.host.strip().lower() != "auto":
                self.matrix().resolve_host(o.host)  # an unknown host fails the batch, not each image
            self.matrix()
            if o.cabs:
                self.catalog(o.cabs)
            if o.command == "stage":
                import vhdtool.filesystem.ntfs3g  # noqa: F401
                import vhdtool.stage.session  # noqa: F401

    def host_key(self, job) -> str | None:
        host = job.host or self.options.host
        if not host:
            raise UnknownKey(job.image, "no host for this image", "give --host, or a host column in the manifest")
        return None if host.strip().lower() == "auto" else self.matrix().resolve_host(host)

    def run(self, job) -> dict:
        o = self.options
        output = job.output if o.command in WRITES else None
        if o.command == "inspect":
            from vhdtool.guest.discover import inspect

            return inspect(job.image).to_dict()
        if o.command == "status":
            from vhdtool.stage.status import status

            return status(job.image).to_dict()
        if o.command == "plan":
            from vhdtool.guest.discover import inspect
            from vhdtool.plan.decide import plan_for_host

            host = self.host_key(job)
            return plan_for_host(inspect(job.image), host, self.catalog(job.cabs or o.cabs), self.matrix()).to_dict()
        if o.command == "stage":
            from vhdtool.stage.session import stage

            host = self.host_key(job)
            return stage(job.image, host, self.catalog(job.cabs or o.cabs), self.matrix(), dry_run=o.dry_run,
                         output=output).to_dict()
        if o.command == "services":
            from vhdtool.editor.services import list_services, set_services, wanted_starts

            wanted = wanted_starts(o.enable, o.disable)
            if not wanted:
                return list_services(job.image)
            return set_services(job.image, wanted, dry_run=o.dry_run, output=output).to_dict()
        raise ValueError(f"unknown command {o.command!r}")
