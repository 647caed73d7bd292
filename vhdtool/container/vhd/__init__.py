"""Legacy VHD (Virtual Hard Disk Image Format Specification, 2006), split as vhdtool.container.vhdx is.

``structs`` the on-disk layouts and constants (footer, dynamic header, parent
locators, BAT entry); ``reader`` the virtual disk as a stream (pyvhdi for fixed
and dynamic disks, differencing blocks read here); ``layout`` the file's
structures bounded for writing; ``temps`` the temp copy beside the image;
``writer`` the commit through that copy.
"""

from vhdtool.container.vhd.reader import VhdDisk, looks_like_vhd

__all__ = ["VhdDisk", "looks_like_vhd"]
