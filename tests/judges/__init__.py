"""Independent judges of the fixture images: real tools and small parsers, nothing of vhdtool's.

Each module reads one kind of thing out of an image with tools that are not vhdtool
and do not share the builder's code (qemu-img, sfdisk, blkid, ntfsls/ntfscat/ntfsinfo,
hivexget/hivexsh, debugfs, xfs_db, the LVM tools read-only), so that a fact the builder
recorded is only believed once it has been read back this way:

    tools.py     running a tool (sh)
    disks.py     byte ranges of a raw disk, blkid, VHDX block states
    hives.py     hivexget/hivexsh output parsed, base block sequences, a new-format log replay
    pe.py        the file version of a PE version resource
    windows.py   the facts of a Windows guest, derived again
    linux.py     ext4 (debugfs), XFS (xfs_db), LVM (read-only), the facts of a Linux guest

tests/test_fixtures.py checks that none of them imports vhdtool or the builder.
"""
