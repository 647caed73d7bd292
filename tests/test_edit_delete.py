"""`vhdtool.edit().delete` on fixture images, judged by tools other than vhdtool.

After each delete: ntfs-3g's ntfsls no longer lists the path, ntfsinfo finds its MFT
records free, ntfsfix -n finds the volume consistent, qemu-img check finds no errors,
and dissect.ntfs hashes every other file of the volume as it was (the system files a
delete changes excepted). A missing path writes nothing; a refused one leaves the image
byte-identical.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from fixtures import build as fb
from judges.tools import sh
from judges.volumes import mft_record as record_of
from judges.volumes import ntfs_names as ntfsls
from judges.volumes import ntfs_tree, ntfscat, partition_volume, record_in_use

pytestmark = pytest.mark.fixtures
IMAGE, PART = "ws2008r2-x64", 2
# What a delete changes besides the deleted entries: the MFT (and its mirror), the cluster bitmap,
# and the folders that lose entries (whose hashes are "dir" in the tree anyway).
CHANGING_SYSTEM_FILES = {"/$MFT", "/$MFTMirr", "/$Bitmap"}
TREE = {"/Data/a.txt": b"a" * 5000, "/Data/sub/b.txt": b"b" * 100, "/Data/sub/deeper/c.bin": bytes(range(256)) * 400,
        "/Data/keep.txt": b"keep"}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()










def judged_sound(image: Path, part: Path) -> None:
    res = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
    assert res.returncode == 0 and "No errors were found" in res.stdout, res.stdout + res.stderr
    fix = subprocess.run(["ntfsfix", "-n", str(part)], capture_output=True, text=True)
    assert fix.returncode == 0 and "processed successfully" in fix.stdout, fix.stdout + fix.stderr


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """The fixture with a small tree under /Data (written by vhdtool, judged by ntfscat), and its volume."""
    import vhdtool

    tmp = tmp_path_factory.mktemp("seeded")
    image = tmp / "seeded.vhdx"
    shutil.copyfile(fb.build(IMAGE), image)
    with vhdtool.edit(image) as ed:
        for path, data in TREE.items():
            ed.write_file(path, data)
    part = partition_volume(image, tmp, PART)
    for path, data in TREE.items():
        assert ntfscat(part, path) == data
    return image, part


def copy_of(seeded, tmp: Path) -> tuple[Path, dict, Path]:
    image = tmp / "victim.vhdx"
    shutil.copyfile(seeded[0], image)
    return image, ntfs_tree(seeded[1]), seeded[1]


def unchanged_but(before: dict, after: dict, gone: set[str]) -> None:
    expected = {k: v for k, v in before.items() if k not in gone and k not in CHANGING_SYSTEM_FILES}
    assert {k: v for k, v in after.items() if k not in CHANGING_SYSTEM_FILES} == expected


def test_delete_a_file(seeded, tmp_path):
    image, before, old_part = copy_of(seeded, tmp_path)
    record = record_of(old_part, "/Data/a.txt")
    import vhdtool

    with vhdtool.edit(image) as ed:
        change = ed.delete("/data/A.TXT")  # NTFS names compare without case
    assert change is not None and (change.path, change.action, change.partition) == ("/data/A.TXT", "delete", PART)
    assert ed.result.committed and ed.result.bytes_written > 0
    assert ed.result.to_dict()["changes"]["files"] == [{"path": "/data/A.TXT", "action": "delete", "size": None,
                                                       "sha256": None, "partition": PART}]
    part = partition_volume(image, tmp_path, PART)
    judged_sound(image, part)
    assert ntfsls(part, "/Data") == ["keep.txt", "sub"]
    assert not record_in_use(part, record)
    unchanged_but(before, ntfs_tree(part), {"/Data/a.txt"})
    assert ntfscat(part, "/Data/sub/deeper/c.bin") == TREE["/Data/sub/deeper/c.bin"]


def test_delete_a_nested_folder_with_everything_under_it(seeded, tmp_path):
    import vhdtool

    image, before, old_part = copy_of(seeded, tmp_path)
    records = [record_of(old_part, p) for p in ("/Data/sub", "/Data/sub/deeper", "/Data/sub/deeper/c.bin",
                                                "/Data/sub/b.txt")]
    with vhdtool.edit(image) as ed:
        assert ed.delete("C:\\Data\\sub").action == "delete"
    part = partition_volume(image, tmp_path, PART)
    judged_sound(image, part)
    assert ntfsls(part, "/Data") == ["a.txt", "keep.txt"]
    assert not any(record_in_use(part, r) for r in records)
    unchanged_but(before, ntfs_tree(part), {p for p in before if p.startswith("/Data/sub")})
    # The clusters c.bin held are free again: ntfsinfo's free count grows by at least its size.
    free = [int(sh("ntfsinfo", "-f", "-m", p).stdout.decode().split("Free Clusters:", 1)[1].split()[0])
            for p in (old_part, part)]
    assert free[1] > free[0]


def test_a_missing_path_is_no_change(seeded, tmp_path):
    import vhdtool

    image, _before, _part = copy_of(seeded, tmp_path)
    before = digest(image)
    with vhdtool.edit(image) as ed:
        assert ed.delete("/Data/missing.txt") is None
        assert ed.delete("/NoSuchFolder/x") is None
    assert ed.result.files == () and ed.result.bytes_written == 0 and not ed.result.committed
    assert digest(image) == before


@pytest.mark.parametrize("path", ["/", "C:\\", "/Windows/System32/config/SYSTEM", "/windows/system32/CONFIG",
                                  "/Windows/System32/config/SOFTWARE.LOG1", "/Windows", "/$MFT", "/$Extend/$Quota",
                                  "D:\\Data", "/Data/../Windows"])
def test_refusals_leave_the_image_byte_identical(seeded, tmp_path, path):
    import vhdtool
    from vhdtool.errors import UnsupportedLayout

    image, _before, _part = copy_of(seeded, tmp_path)
    before = digest(image)
    with pytest.raises(UnsupportedLayout) as e:
        with vhdtool.edit(image) as ed:
            ed.delete("/Data/a.txt")  # queued, and dropped with the whole session
            ed.delete(path)
    assert str(image) in str(e.value) and "\n" not in str(e.value)
    assert digest(image) == before


def test_deleted_then_written_and_written_then_deleted_keep_their_order(seeded, tmp_path):
    import vhdtool

    image, before, _part = copy_of(seeded, tmp_path)
    with vhdtool.edit(image) as ed:
        assert ed.delete("/Data/sub").action == "delete"
        # Written again after the delete: a new file in a new folder, even with the same bytes as before.
        assert ed.write_file("/Data/sub/b.txt", TREE["/Data/sub/b.txt"]).action == "add"
        assert ed.mkdir("/Data/sub/deeper").action == "mkdir"
        assert ed.write_file("/Data/new/x.txt", b"x").action == "add"
        assert ed.delete("/Data/new").action == "delete"  # not on disk yet, but written in this session
        assert ed.delete("/Data/new/x.txt") is None  # gone with its folder
        assert ed.write_file("/Data/keep.txt", TREE["/Data/keep.txt"]) is None  # unchanged, untouched
    assert [(f.path, f.action) for f in ed.result.files] == [
        ("/Data/sub", "delete"), ("/Data/sub/b.txt", "add"), ("/Data/sub/deeper", "mkdir"),
        ("/Data/new/x.txt", "add"), ("/Data/new", "delete")]
    part = partition_volume(image, tmp_path, PART)
    judged_sound(image, part)
    assert ntfsls(part, "/Data") == ["a.txt", "keep.txt", "sub"]
    assert ntfsls(part, "/Data/sub") == ["b.txt", "deeper"] and ntfsls(part, "/Data/sub/deeper") == []
    assert ntfscat(part, "/Data/sub/b.txt") == TREE["/Data/sub/b.txt"]
    unchanged_but(before, ntfs_tree(part), {"/Data/sub/deeper/c.bin"})


def test_names_compare_without_case_when_writing_too(seeded, tmp_path):
    """libntfs-3g looks names up as Windows does: no second folder beside one that differs in case only."""
    import vhdtool

    image, before, _part = copy_of(seeded, tmp_path)
    root = [n for n in before if n.count("/") == 1]
    with vhdtool.edit(image) as ed:
        assert ed.write_file("/DATA/SUB/new.txt", b"new").action == "add"
        assert ed.write_file("/windows/temp/x.txt", b"x").action == "add"
    part = partition_volume(image, tmp_path, PART)
    judged_sound(image, part)
    assert [n for n in ntfs_tree(part) if n.count("/") == 1] == root
    assert ntfsls(part, "/Data/sub") == ["b.txt", "deeper", "new.txt"]
    assert ntfscat(part, "/Windows/Temp/x.txt") == b"x"
