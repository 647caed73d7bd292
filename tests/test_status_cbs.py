"""`vhdtool status` cross-checked with Windows' own record of its packages (Component Based Servicing).

A fixture image is staged by vhdtool; each simulated boot is then written into a copy by other
tools (tests/offline_boot.py: ntfscp for install.cmd's files, hivexsh for the cleared hook, the
package's CBS key and CurrentState, the RebootPending/PackagesPending keys and the KVP IC version);
`status --json` must read the state the README's table gives. What stage recorded (package.txt) is
read back with ntfscat. The pure rules (stage/crosscheck.py) are tested on their own too.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import os
from pathlib import Path

import pytest

from conftest import ROOT, run_cli, work_copy
from fixtures.build.hives import Raw
from fixtures.cabs import CabSpec, build_cab
from judges.hives import hive_subkeys, hive_typed_values
from judges.volumes import ntfscat, partition_volume
from regf_judge import judge_replay
from offline_boot import CBS, KVP_AUTO, BootEffects, install_cmd_finished, write_boot
from vhdtool.guest.cbs import CbsPackage, ServicingState
from vhdtool.stage.crosscheck import crosscheck, ic_covers

WIN8_IC = "6.2.9200.16384"
STAGED_ID = f"{WIN8_IC}-x64"
FOLDER = f"/Windows/vhdtool/{STAGED_ID}"
IDENTITY = f"Microsoft-Hyper-V-Guest-Integration-Drivers-Package~31bf3856ad364e35~amd64~~{WIN8_IC}"
SYSTEM_PARTITION = 2  # of ws2008r2-x64
NEWER_IC = "6.3.9600.18080"


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vhdtool.cli.main", *map(str, args)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)


def status(image: Path) -> dict:
    code, out, err = run_cli("status", "--json", image)
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> dict[str, Path]:
    """ws2008r2-x64 staged from a test cab by vhdtool, and the same with no package.txt (an older stage's)."""
    root = tmp_path_factory.mktemp("staged")
    cabs = root / "cabs"
    build_cab(CabSpec("6.1", "x64", WIN8_IC), cabs)
    image = work_copy("ws2008r2-x64", root)
    res = run("stage", "--json", image, "--host", "win8", "--cabs", cabs)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["id"] == STAGED_ID and doc["cab"]["cbs_identity"] == IDENTITY
    assert f"{FOLDER}/package.txt" in [f["path"] for f in doc["files"]]
    legacy = root / "legacy" / image.name
    legacy.parent.mkdir()
    shutil.copyfile(image, legacy)
    import vhdtool

    with vhdtool.edit(legacy) as ed:  # the image an older vhdtool staged: no package.txt
        ed.delete(f"{FOLDER}/package.txt")
    return {"staged": image, "legacy": legacy}


def test_stage_records_the_package_identity(staged, tmp_path):
    part = partition_volume(staged["staged"], tmp_path, SYSTEM_PARTITION)
    assert ntfscat(part, f"{FOLDER}/package.txt") == f"identity={IDENTITY}\r\n".encode()
    doc = status(staged["staged"])
    assert doc["state"] == "pending" and doc["cbs"] == {"reboot_pending": False, "packages_pending": False}
    assert doc["staged"][0]["cbs"] == {"identity": IDENTITY, "current_state": None, "state": "absent"}
    legacy = status(staged["legacy"])
    assert legacy["state"] == "pending"
    assert legacy["staged"][0]["cbs"] == {"identity": None, "current_state": None, "state": "unknown"}


def boot(staged: dict, tmp_path: Path, exit_code: int | None, cbs_state: int | None = None, *,
         legacy: bool = False, key_name: str = IDENTITY, pending_keys: tuple[str, ...] = (),
         ic: str | None = None, dirty: bool = False) -> Path:
    """A copy of the staged image after a boot that left ``exit_code`` (None: the installer did not finish)
    and CBS's record: the package's key with CurrentState ``cbs_state`` (None: no key)."""
    image = tmp_path / "booted.vhdx"
    shutil.copyfile(staged["legacy" if legacy else "staged"], image)
    if exit_code is None:
        effects = BootEffects(files={f"{FOLDER}/attempts.txt": b"1\r\n"})
    else:
        effects = install_cmd_finished(FOLDER, exit_code)
    software = effects.hive("SOFTWARE")
    if cbs_state is not None:
        software.set(f"{CBS}\\Packages\\{key_name}", {"CurrentState": cbs_state, "InstallClient": "DISM Package Manager Provider"})
    for key in pending_keys:
        software.set(f"{CBS}\\{key}")
    if ic is not None:
        software.set(KVP_AUTO, {"IntegrationServicesVersion": ic})
    if dirty:
        effects.dirty.add("SOFTWARE")
    write_boot(image, SYSTEM_PARTITION, effects, tmp_path / "boot")
    return image


SLOW = pytest.mark.slow  # rules the unit tests below cover too; the images add little


def case(name, kwargs, state, cbs_state, current, *marks):
    return pytest.param(name, kwargs, state, cbs_state, current, id=name, marks=marks)


# (case, boot arguments, image state, the package's cbs state, its CurrentState)
CASES = [
    # Key names are case-insensitive: CBS's spelling need not be the manifest's.
    case("installed", dict(exit_code=0, cbs_state=0x70, key_name=IDENTITY.upper()), "installed", "installed", 0x70),
    case("permanent", dict(exit_code=0, cbs_state=0x80), "installed", "permanent", 0x80),
    case("install-pending", dict(exit_code=3010, cbs_state=0x60), "reboot-pending", "install-pending", 0x60),
    case("install-pending-exit-0", dict(exit_code=0, cbs_state=0x60), "reboot-pending", "install-pending", 0x60,
         SLOW),
    case("reboot-pending-key", dict(exit_code=0, cbs_state=0x70, pending_keys=("RebootPending",)),
         "reboot-pending", "installed", 0x70),
    case("packages-pending-key", dict(exit_code=0, cbs_state=0x70, pending_keys=("PackagesPending",)),
         "reboot-pending", "installed", 0x70, SLOW),
    case("exit-3010-partially-installed", dict(exit_code=3010, cbs_state=0x65), "reboot-pending",
         "partially-installed", 0x65),
    case("exit-3010-restarted", dict(exit_code=3010, cbs_state=0x70), "installed", "installed", 0x70),
    case("success-but-absent", dict(exit_code=0), "inconsistent", "absent", None),
    case("success-but-staged-only", dict(exit_code=0, cbs_state=0x40), "inconsistent", "staged", 0x40, SLOW),
    case("failed-but-installed", dict(exit_code=1603, cbs_state=0x70), "inconsistent", "installed", 0x70),
    case("running-but-installed", dict(exit_code=None, cbs_state=0x70), "inconsistent", "installed", 0x70, SLOW),
    case("failed", dict(exit_code=1603), "failed", "absent", None, SLOW),
    case("newer-ic-installed", dict(exit_code=0, ic=NEWER_IC), "installed", "absent", None),
    case("superseded", dict(exit_code=0, cbs_state=0x50), "installed", "superseded", 0x50, SLOW),
    # Only a four-byte REG_DWORD is a state: a short one is no damage, a QWORD 0x70 no "installed".
    case("current-state-short-dword", dict(exit_code=0, cbs_state=Raw(4, b"\x70\x00")), "inconsistent", "other",
         None),
    case("current-state-qword", dict(exit_code=0, cbs_state=Raw(11, (0x70).to_bytes(8, "little"))), "inconsistent",
         "other", None),
    # Read as Windows will at boot: the package's key is only in SOFTWARE.LOG1.
    case("installed-in-a-dirty-hive", dict(exit_code=0, cbs_state=0x70, dirty=True), "installed", "installed", 0x70),
]


@pytest.mark.parametrize("name,kwargs,state,cbs_state,current", CASES)
def test_status_crosschecks_cbs(staged, tmp_path, name, kwargs, state, cbs_state, current):
    image = boot(staged, tmp_path, **kwargs)
    doc = status(image)
    (entry,) = doc["staged"]
    assert (doc["state"], entry["state"]) == (state, state), doc
    assert entry["cbs"] == {"identity": IDENTITY, "current_state": current, "state": cbs_state}
    keys = kwargs.get("pending_keys", ())
    assert doc["cbs"] == {"reboot_pending": "RebootPending" in keys, "packages_pending": "PackagesPending" in keys}
    if kwargs.get("exit_code") is not None:
        assert entry["exit_code"] == kwargs["exit_code"]
    if kwargs.get("dirty"):
        # The judges: the primary file alone has no such package; replayed from its log, it has.
        part = partition_volume(image, tmp_path, SYSTEM_PARTITION)
        primary = ntfscat(part, "/Windows/System32/config/SOFTWARE")
        (tmp_path / "SOFTWARE.primary").write_bytes(primary)
        assert hive_typed_values(tmp_path / "SOFTWARE.primary", f"{CBS}\\Packages\\{IDENTITY}") is None
        replayed = judge_replay(primary, ntfscat(part, "/Windows/System32/config/SOFTWARE.LOG1"), None)
        assert replayed is not None and replayed[1]
        (tmp_path / "SOFTWARE.boot").write_bytes(replayed[0])
        assert hive_typed_values(tmp_path / "SOFTWARE.boot", f"{CBS}\\Packages\\{IDENTITY}")["CurrentState"] == (4, 0x70)
    code, text, err = run_cli("status", image)
    assert code == 0 and f"{STAGED_ID:<24} {state} " in text and f"CBS {cbs_state}" in text, text


@pytest.mark.parametrize("exit_code,ic,state", [(0, None, "installed"), (3010, None, "reboot-pending"),
                                                pytest.param(3010, NEWER_IC, "installed", marks=SLOW),
                                                pytest.param(1603, None, "failed", marks=SLOW)])
def test_an_older_staging_without_package_txt(staged, tmp_path, exit_code, ic, state):
    """A staging from before stage recorded the identity: result.txt alone, a restart after 3010 shown by the IC version."""
    doc = status(boot(staged, tmp_path, exit_code, 0x70, legacy=True, ic=ic))
    (entry,) = doc["staged"]
    assert (doc["state"], entry["state"]) == (state, state)
    assert entry["cbs"] == {"identity": None, "current_state": None, "state": "unknown"}


def test_the_hook_and_hive_writes_are_what_windows_would_see(staged, tmp_path):
    """The simulated boot itself, judged by hivexget: the hook cleared, the key and its DWORD where CBS keeps them."""
    image = boot(staged, tmp_path, 0, 0x70, pending_keys=("RebootPending",))
    part = partition_volume(image, tmp_path, SYSTEM_PARTITION)
    system, software = tmp_path / "SYSTEM.after", tmp_path / "SOFTWARE.after"
    system.write_bytes(ntfscat(part, "/Windows/System32/config/SYSTEM"))
    software.write_bytes(ntfscat(part, "/Windows/System32/config/SOFTWARE"))
    setup = hive_typed_values(system, "Setup")
    assert setup["SetupType"] == (4, 0) and setup["CmdLine"] == (1, "")
    assert hive_typed_values(software, f"{CBS}\\Packages\\{IDENTITY}")["CurrentState"] == (4, 0x70)
    assert "RebootPending" in hive_subkeys(software, CBS)


def test_batch_status_and_report_count_the_states(staged, tmp_path):
    fleet = tmp_path / "fleet"
    fleet.mkdir()
    for name, kwargs in (("done", dict(exit_code=0, cbs_state=0x70)), ("restart", dict(exit_code=3010, cbs_state=0x60)),
                         ("odd", dict(exit_code=0)), ("newer", dict(exit_code=0, ic=NEWER_IC))):
        (tmp_path / name).mkdir()
        shutil.move(boot(staged, tmp_path / name, **kwargs), fleet / f"{name}.vhdx")
    shutil.copyfile(staged["staged"], fleet / "waiting.vhdx")
    report = tmp_path / "status.jsonl"
    res = run("batch", "status", *sorted(fleet.iterdir()), "--report", report)
    assert res.returncode == 0, res.stderr
    states = {Path(r["image"]).stem: r["result"]["state"] for r in map(json.loads, report.read_text().splitlines())}
    assert states == {"done": "installed", "restart": "reboot-pending", "odd": "inconsistent", "newer": "installed",
                      "waiting": "pending"}
    res = run("report", report, "--json")
    doc = json.loads(res.stdout)
    assert doc["by_status"] == {"inconsistent": 1, "installed": 2, "pending": 1, "reboot-pending": 1}
    assert doc["by_method"] == {"status inconsistent": 1, "status installed": 2, "status pending": 1,
                                "status reboot-pending": 1}
    text = run("report", report).stdout
    assert "status reboot-pending" in text and "status inconsistent" in text


# -- the rules alone (stage/crosscheck.py), every combination the images above do not reach -----

PKG = CbsPackage(IDENTITY, True, 0x70)
NO_KEY = CbsPackage(IDENTITY, False, None)
UNKNOWN = CbsPackage(None, False, None)
QUIET, REBOOT = ServicingState(False, False), ServicingState(True, False)


@pytest.mark.parametrize("result,code,package,servicing,covered,expected", [
    ("pending", None, NO_KEY, QUIET, False, "pending"),
    ("pending", None, PKG, QUIET, False, "inconsistent"),
    ("running", None, NO_KEY, REBOOT, False, "running"),
    ("failed", 1603, CbsPackage(IDENTITY, True, 0x60), QUIET, False, "failed"),
    ("failed", 1603, NO_KEY, QUIET, True, "failed"),  # a newer IC later: this one still failed
    ("installed", 0, PKG, QUIET, False, "installed"),
    ("installed", 0, PKG, REBOOT, False, "reboot-pending"),
    ("installed", 0, CbsPackage(IDENTITY, True, None), QUIET, False, "inconsistent"),  # a key without CurrentState
    ("installed", 3010, CbsPackage(IDENTITY, True, None), QUIET, False, "reboot-pending"),
    ("installed", 3010, NO_KEY, QUIET, False, "inconsistent"),
    ("installed", 0, CbsPackage(IDENTITY, True, 0x05), QUIET, False, "inconsistent"),  # uninstall pending
    ("installed", 0, UNKNOWN, QUIET, False, "installed"),
    ("installed", 3010, UNKNOWN, QUIET, False, "reboot-pending"),
    ("installed", 3010, UNKNOWN, QUIET, True, "installed"),
    ("installed", 0, UNKNOWN, REBOOT, True, "reboot-pending"),
])
def test_crosscheck_rules(result, code, package, servicing, covered, expected):
    assert crosscheck(result, code, package, servicing, covered) == expected


def test_ic_covers_only_integration_services_packages():
    assert ic_covers(NO_KEY, WIN8_IC, WIN8_IC) and ic_covers(NO_KEY, WIN8_IC, NEWER_IC)
    assert not ic_covers(NO_KEY, WIN8_IC, "6.1.7601.17514") and not ic_covers(NO_KEY, WIN8_IC, None)
    kb = CbsPackage("Package_for_KB3071740~31bf3856ad364e35~amd64~~6.1.1.2", False, None)
    assert not ic_covers(kb, "6.1.1.2", NEWER_IC)  # its version is no IC version
    assert ic_covers(UNKNOWN, WIN8_IC, NEWER_IC) and not ic_covers(UNKNOWN, NEWER_IC, WIN8_IC)


def test_cbs_identity_of_a_real_manifest(real):
    from vhdtool.cabinet.mum import parse_identity

    ident = parse_identity(real("servicing/Package_1_for_KB4601060.mum").read_bytes(), "test.mum")
    assert ident.language == "neutral"
    assert ident.cbs_identity == "Package_1_for_KB4601060~31bf3856ad364e35~amd64~~10.0.3770.4"


@pytest.mark.parametrize("name,language,expected", [
    ("Package_for_KB1", "en-US", "Package_for_KB1~31bf3856ad364e35~amd64~en-US~1.2.3.4"),
    ("Package_for_KB1", None, "Package_for_KB1~31bf3856ad364e35~amd64~~1.2.3.4"),
    ("Package\\..\\Other", None, None),  # a backslash would be a registry path
    ("Package for KB1", None, None),
])
def test_cbs_identity_is_a_safe_key_name(name, language, expected):
    from vhdtool.cabinet.format import PackageIdentity

    ident = PackageIdentity(name, "1.2.3.4", "amd64", "31bf3856ad364e35", None, (), language)
    assert ident.cbs_identity == expected


@pytest.mark.parametrize("content,expected", [
    (f"identity={IDENTITY}\r\n".encode(), IDENTITY),
    (f"\r\nidentity={IDENTITY}".encode(), IDENTITY),
    (None, None),
    (b"", None),
    (b"identity=Package\\..\\Other~31bf3856ad364e35~amd64~~1.0\r\n", None),  # a registry path
    (b"identity=" + b"A" * 5000, None),
    (b"\xff\xfe\x00garbage\r\n", None),
])
def test_package_txt_is_read_as_hostile(content, expected):
    from vhdtool.stage.status import parse_identity

    assert parse_identity(content) == expected
