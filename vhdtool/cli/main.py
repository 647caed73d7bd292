"""vhdtool command line: one module per command; errors become exit codes here and only here.

A VhdtoolError prints one line ``vhdtool: <file>: <problem>; <what to do>`` on
stderr and exits with its code (vhdtool.errors). Documents go to stdout,
everything else to stderr. Each command imports what it needs when it runs.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import logging
import os
import sys
from collections.abc import MutableMapping

import typer
from typer.core import TyperGroup

from vhdtool.cli.images import fail_line
from vhdtool.errors import EXIT_INTERNAL_ERROR, EXIT_INTERRUPTED, VhdtoolError

# The commands, in the order --help lists them: name -> (module, attribute). A command's module is
# imported, and its parameters made into a click command, only when it runs or a help lists it:
# building all of them cost every start a few milliseconds for nothing.
COMMANDS = {
    "inspect": ("vhdtool.cli.inspect", "inspect"),
    "matrix": ("vhdtool.cli.matrix", "matrix"),
    "plan": ("vhdtool.cli.plan", "plan"),
    "copy-in": ("vhdtool.cli.copy_in", "copy_in"),
    "services": ("vhdtool.cli.services", "services"),
    "stage": ("vhdtool.cli.stage", "stage"),
    "status": ("vhdtool.cli.stage", "status"),
    "report": ("vhdtool.cli.batch", "report"),
    "batch": ("vhdtool.cli.batch", "batch_app"),  # a group of its own
    "doctor": ("vhdtool.cli.doctor", "doctor"),
}


class LazyCommands(TyperGroup):
    """The root group: its commands are COMMANDS, each built when first asked for."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.commands = _Commands()

    def list_commands(self, ctx) -> list[str]:
        return list(COMMANDS)


class _Commands(MutableMapping):
    """COMMANDS by name (what "Did you mean" suggestions are drawn from); a command is built on lookup."""

    def __init__(self) -> None:
        self._built: dict = {}

    def __getitem__(self, name: str):
        if name not in self._built:
            if name not in COMMANDS:
                raise KeyError(name)
            self._built[name] = _build(name)
        return self._built[name]

    def __setitem__(self, name: str, command) -> None:
        self._built[name] = command

    def __delitem__(self, name: str) -> None:
        del self._built[name]

    def __iter__(self):
        return iter(COMMANDS)

    def __len__(self) -> int:
        return len(COMMANDS)


def _build(name: str):
    module, attribute = COMMANDS[name]
    target = getattr(importlib.import_module(module), attribute)
    if isinstance(target, typer.Typer):
        command = typer.main.get_group(target)
    else:
        one = typer.Typer(add_completion=False, rich_markup_mode=None)
        one.command(name)(target)
        command = typer.main.get_command(one)
    command.name = name
    return command


# The interpreter's last act is a full garbage collection of every object still alive (dissect's
# parsed structures, click's commands...): about 20 ms of a 0.3 s copy-in, to free memory the process
# is giving back anyway. Freezing them at exit skips it. atexit runs the other exit handlers first
# (this one is registered early), and vhdtool closes its files in with-blocks, never in finalizers.
atexit.register(gc.freeze)

app = typer.Typer(
    cls=LazyCommands,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Plain help: it reads the same in a pipe, a log and an 80-column terminal.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        from vhdtool import __version__

        typer.echo(f"vhdtool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", is_eager=True, callback=_print_version, help="Print the version and exit."
    ),
) -> None:
    """Service offline Hyper-V disk images (VHDX/VHD) from Linux: inspect guests, plan integration services."""


# dissect's parsers log what they find odd in a volume (log.critical on a directory entry of length 0, which an
# inline_data folder shows them): with no handler Python prints it to stderr, around the one-line error.
logging.getLogger("dissect").addHandler(logging.NullHandler())


def main() -> None:
    # The cyclic garbage collector stays off while a command runs: its passes over the ~300 000
    # objects the imports and the image's structures make took 30-55 ms of a 0.3 s copy-in, and one
    # image's work leaves little cyclic garbage. for_each_image collects between images; batch,
    # which runs for long and forks its workers, turns it back on.
    collecting = gc.isenabled()
    gc.disable()
    try:
        app()
    except VhdtoolError as e:
        fail_line(e.message)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        fail_line("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except Exception as e:  # noqa: BLE001 - the last line of defence: no traceback for users
        if os.environ.get("VHDTOOL_DEBUG"):
            raise
        detail = str(e).splitlines()[0] if str(e) else ""
        fail_line(f"internal error: {type(e).__name__}: {detail} (set VHDTOOL_DEBUG=1 for a traceback and report it)")
        sys.exit(EXIT_INTERNAL_ERROR)
    finally:
        if collecting:
            gc.enable()  # main() called in a process that goes on (tests)


if __name__ == "__main__":
    main()
