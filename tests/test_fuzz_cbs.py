"""Hostile CBS records and package.txt contents: `status` reads a sensible state or a one-line error.

SOFTWARE hives are written by hivexsh (from libguestfs' minimal hive): package keys whose CurrentState has
every registry type, wrong sizes (a 2-byte or 8-byte REG_DWORD, an empty one), huge strings, other cases of
the value and key names, and the RebootPending/PackagesPending keys as values instead of keys. hivexsh
says what each value is; only a REG_DWORD of four bytes is a state. package.txt contents are random bytes,
huge and odd lines around ``identity=`` lines. VHDTOOL_CBS_FUZZ_EXAMPLES sets the package.txt cases of the
full sweep (default 20000, marked slow); the default run makes a tenth of them.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import SWEEPS, sweep_count
from fixtures.build.hives import REAL
from vhdtool.cabinet.format import CBS_IDENTITY
from vhdtool.errors import VhdtoolError
from vhdtool.guest.cbs import CBS, STATE_NAMES, read_package, read_servicing
from vhdtool.registry.hive import Hive
from vhdtool.stage.crosscheck import STATES, crosscheck, ic_covers
from vhdtool.stage.status import parse_identity

EXAMPLES = int(os.environ.get("VHDTOOL_CBS_FUZZ_EXAMPLES", "20000"))
NAME = "Microsoft-Hyper-V-Guest-Integration-Drivers-Package~31bf3856ad364e35~amd64~~6.2.9200.{n}"
# (hivexsh setval type and data, the state a reader must find: an int, or None for "not a state")
CASES = [
    ("dword:0x70", 0x70), ("dword:0x00000005", 5), ("dword:0xffffffff", 0xFFFFFFFF), ("dword:0", 0),
    ("hex:4:70,00", None), ("hex:4:", None), ("hex:4:70,00,00,00,00,00,00,00", None),
    ("hex:5:00,00,00,70", None), ("hex:11:70,00,00,00,00,00,00,00", None), ("string:112", None), ("expandstring:0x70", None),
    ("hex:7:37,00,00,00,00,00", None), ("hex:3:70,00,00,00", None), ("hex:0:70,00,00,00", None),
    ("hex:0xffffffff:70,00,00,00", None), ("hex:4:" + ",".join(["70"] * 2000), None),
    ("string:" + "x" * 3000, None),
]


def hivexsh(hive: Path, lines: list[str]) -> None:
    script = hive.with_suffix(".script")
    script.write_text("\n".join(lines + ["commit"]) + "\n")
    subprocess.run(["hivexsh", "-w", "-f", str(script), str(hive)], check=True, capture_output=True)


def _cd_add(path: str) -> list[str]:
    lines = ["cd \\"]
    for part in path.split("\\"):
        lines += [f"add {part}", f"cd {part}"]
    return lines


@pytest.fixture(scope="module")
def software(tmp_path_factory) -> Path:
    hive = tmp_path_factory.mktemp("cbsfuzz") / "SOFTWARE"
    shutil.copyfile(REAL / "minimal", hive)
    hive.chmod(0o644)
    lines = _cd_add(CBS + "\\Packages")
    for n, (value, _) in enumerate(CASES):
        lines += [f"add {NAME.format(n=n)}", f"cd {NAME.format(n=n)}", "setval 1",
                  "currentSTATE" if n % 3 == 1 else "CurrentState", value, "cd .."]
    # A key name in another case, and a package with two CurrentState-like values of different case.
    lines += [f"add {NAME.format(n=900).upper()}", f"cd {NAME.format(n=900).upper()}", "setval 2",
              "CurrentState", "dword:0x70", "CurrentStateX", "string:x", "cd .."]
    # Siblings with odd names: non-ASCII (a right-to-left override too), the longest a key name may be, tildes.
    for odd in ("\u00e9\u4e2d\u202e" * 20, "k" * 255, "a~b~c~d~1.2.3.4.5.6"):
        lines += [f"add {odd}", f"cd {odd}", "setval 1", "CurrentState", "dword:0x70", "cd .."]
    lines += ["cd ..", "setval 2", "RebootPending", "dword:1", "PackagesPending", "string:yes"]
    hivexsh(hive, lines)
    return hive


def _hivexget(hive: Path, key: str, value: str) -> str:
    return subprocess.run(["hivexget", str(hive), key, value], capture_output=True, text=True).stdout.strip()


def test_current_state_counts_only_as_a_four_byte_dword(software):
    with open(software, "rb") as f:
        hive = Hive(f, "SOFTWARE")
        for n, (value, expected) in enumerate(CASES):
            start = time.perf_counter()
            package = read_package(hive, NAME.format(n=n))
            assert time.perf_counter() - start < 0.5
            assert package.present and package.current_state == expected, (value, package)
            assert package.state in set(STATE_NAMES.values()) | {"other"}, package
            for result, code in (("installed", 0), ("installed", 3010), ("pending", None), ("failed", 1)):
                assert crosscheck(result, code, package, read_servicing(hive), False) in STATES
        upper = read_package(hive, NAME.format(n=900))  # key names are case-insensitive
        assert upper.present and upper.current_state == 0x70
        for odd in ("a~b~c~d~1.2.3.4.5.6", NAME.format(n=999)):
            assert read_package(hive, odd).state in ("absent", "installed")
        # Values, not keys: no restart is pending (CBS makes them keys).
        assert not read_servicing(hive).restart_needed
    # hivexget's reading of the four-byte DWORDs is the same number (the judge of what was written where).
    for n, (value, expected) in enumerate(CASES):
        if expected is not None:
            said = _hivexget(software, f"{CBS}\\Packages\\{NAME.format(n=n)}", "CurrentState")
            assert int(said) & 0xFFFFFFFF == expected, (value, said)  # hivexget prints a DWORD signed


def _package_txt(rng: random.Random) -> bytes:
    good = NAME.format(n=rng.randrange(100)).encode()
    pieces = [b"identity=" + good, b"identity=", b"identity=" + b"A" * rng.choice([199, 200, 301, 5000]),
              b"identity=" + good.replace(b"~amd64", b"\\..\\x"), b"identity=" + good + b"\x00",
              b"identity=" + good.upper(), b" identity=" + good + b" ", b"IDENTITY=" + good,
              b"identity=" + good.replace(b"~", b"~" * 2), rng.randbytes(rng.randrange(64)), b"\r", b"\n",
              b"\r\n", b"\xff\xfe", b"x" * rng.choice([10, 4096, 100_000]), b"=" * 50, b"\x85", "\u2028".encode(),
              "identity=é~".encode("utf-16-le")]
    return b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 8)))


@pytest.mark.parametrize("sweep", SWEEPS)
def test_hostile_package_txt_gives_a_safe_identity_or_none(software, sweep):
    rng = random.Random("package.txt")
    with open(software, "rb") as f:
        hive = Hive(f, "SOFTWARE")
        for _ in range(sweep_count(EXAMPLES, sweep, EXAMPLES // 10)):
            content = _package_txt(rng)[: rng.choice([4096, 1 << 20])]
            start = time.perf_counter()
            identity = parse_identity(content)
            assert time.perf_counter() - start < 0.5
            if identity is not None:
                assert CBS_IDENTITY.fullmatch(identity) and "\\" not in identity, identity
            try:
                package = read_package(hive, identity)
            except VhdtoolError as e:
                assert "\n" not in e.message
                continue
            assert package.state in set(STATE_NAMES.values()) | {"other", "absent", "unknown"}
            ic_covers(package, "6.2.9200.16384", rng.choice([None, "6.2.9200.16384", "x.y", "", "9" * 400]))
