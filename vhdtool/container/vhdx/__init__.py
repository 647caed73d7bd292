"""VHDX (MS-VHDX v1.0), split as QEMU splits vhdx.c and vhdx-log.c.

``structs`` the on-disk layouts and constants; ``header`` headers, region tables and
metadata; ``bat`` the block allocation table; ``log`` the log (2.3); ``reader`` the
virtual disk as a stream. A writer sits beside the reader and shares the rest.
"""

from vhdtool.container.vhdx.reader import VhdxDisk

__all__ = ["VhdxDisk"]
