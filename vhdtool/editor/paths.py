"""Guest paths as the editor takes them, and the ones it never deletes."""

from __future__ import annotations

from vhdtool.errors import UnsupportedLayout

CONFIG_DIR = "/Windows/System32/config"
HIVES = ("SYSTEM", "SOFTWARE", "SAM", "SECURITY", "DEFAULT")
LINUX_FILESYSTEMS = ("ext2", "ext3", "ext4", "xfs", "btrfs", "lvm2")

# The root folder's metadata files (records 0-11 of the MFT), never deleted.
NTFS_METADATA = ("$mft", "$mftmirr", "$logfile", "$volume", "$attrdef", "$bitmap", "$boot", "$badclus", "$secure",
                 "$upcase", "$extend")


def guest_path(path: str, drive_letter: str | None = None) -> str:
    """``C:\\Windows\\Temp`` or ``/Windows/Temp`` as the volume path ``/Windows/Temp``."""
    p = path.strip().replace("\\", "/")
    if len(p) >= 2 and p[1] == ":":
        if drive_letter and p[0].upper() != drive_letter.upper():
            raise UnsupportedLayout(None, f"{path} is not on the guest's system drive {drive_letter}:",
                                    "give a path on the system drive, or --partition N with a path inside that volume")
        p = p[2:]
    parts = [x for x in p.split("/") if x]
    if any(x in (".", "..") for x in parts):
        raise UnsupportedLayout(None, f"{path}: '.' and '..' are not allowed in guest paths", "give an absolute path")
    return "/" + "/".join(parts)


# What Windows does not allow in a file name (Naming Files, Paths, and Namespaces): libntfs-3g writes such a
# name (in the POSIX namespace), and Windows then cannot open, rename or delete the file.
WINDOWS_FORBIDDEN = frozenset('"*:<>?|' + "".join(map(chr, range(32))))
# Device names Windows' path parsing takes for the device, in any case and with any extension (NUL.txt is NUL).
WINDOWS_DEVICES = frozenset(["con", "prn", "aux", "nul"] + [f"{d}{n}" for d in ("com", "lpt") for n in range(1, 10)])


def ntfs_name_problem(target: str) -> str | None:
    """Why a name in the volume path ``target`` cannot be an NTFS name Windows opens; None when each can."""
    for name in target.split("/")[1:]:
        try:
            units = len(name.encode("utf-16-le")) // 2
        except UnicodeEncodeError:  # a local file name that is not UTF-8 (os.fsdecode's surrogates)
            return f"the name {name!r} is not valid Unicode"
        if units > 255:
            return f"the name '{name[:40]}...' is {units} UTF-16 characters long; NTFS takes at most 255"
        if WINDOWS_FORBIDDEN.intersection(name) or name.endswith((" ", ".")):
            return (f"the name {name!r} is one Windows cannot open (it holds one of \" * : < > ? | or a control "
                    "character, or ends in a dot or space)")
        if name.split(".", 1)[0].rstrip(" ").casefold() in WINDOWS_DEVICES:
            return f"the name {name!r} is one Windows cannot open (it names a device: CON, PRN, AUX, NUL, COM1-9, LPT1-9)"
    return None


def protected(target: str) -> bool:
    """Whether deleting the volume path ``target`` would take the root, NTFS metadata or a registry hive
    (SYSTEM, its .LOG1/.LOG2, and the folders that hold them) with it. NTFS names compare without case."""
    parts = target.casefold().split("/")[1:]
    config = CONFIG_DIR.casefold().split("/")[1:]
    if target == "/" or parts[0] in NTFS_METADATA or parts == config[: len(parts)]:
        return True
    return parts[:-1] == config and any(parts[-1] == h.casefold() or parts[-1].startswith(h.casefold() + ".")
                                        for h in HIVES)
