"""Native code, kept at arm's length: lazy loading of system libraries, and a sandbox to run them in.

libmspack (cabinets), libntfs-3g, libhivex and libext2fs (the write path) are C that
parses bytes vhdtool did not make. ``load_library`` opens one (an entry of the table in
vhdtool.native.libraries) on first use and names its packages when it is missing;
``bind_library`` types a library's entry points once per process, and ``load_libc``
opens the C library beside it. ``run_isolated`` runs a job that calls one in a forked,
confined child and returns what the child answered. They raise ``NativeError``
(``MissingLibrary``), which a layer translates into its own error.
"""

from vhdtool.errors import MissingLibrary, NativeError
from vhdtool.native.library import bind_library, load_libc, load_library
from vhdtool.native.sandbox import Refusal, run_isolated

__all__ = ["MissingLibrary", "NativeError", "Refusal", "bind_library", "load_libc", "load_library", "run_isolated"]
