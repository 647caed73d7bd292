"""Security descriptors of files libntfs-3g creates, made to look as Windows makes them."""

from __future__ import annotations

import ctypes
import struct

from vhdtool.native import Refusal

# MS-DTYP 2.4.6 SECURITY_DESCRIPTOR (self-relative) and 2.4.5 ACL headers, 2.4.4.1 ACE flags.
SD_HEADER = struct.Struct("<BBHIIII")
ACL_HEADER = struct.Struct("<BBHHH")
SE_DACL_PRESENT = 0x0004
SE_DACL_AUTO_INHERITED = 0x0400
INHERITED_ACE = 0x10


def descriptor(lib, scx, ni) -> bytes | None:
    """The security descriptor of inode ``ni`` (libntfs-3g's ntfs_get_ntfs_acl), or None."""
    size = lib.ntfs_get_ntfs_acl(ctypes.byref(scx), ni, None, 0)
    if size <= 0 or size > 65536:
        return None
    buf = ctypes.create_string_buffer(size)
    got = lib.ntfs_get_ntfs_acl(ctypes.byref(scx), ni, buf, size)
    return buf.raw[:got] if 0 < got <= size else None


def mark_inherited(lib, scx, ni, parent) -> None:
    """Make the inherited ACEs of ``ni`` look as Windows makes them (MS-DTYP 2.4.4.1, 2.4.6).

    libntfs-3g copies the parent's inheritable ACEs with their inheritance flags
    cleared; Windows also sets INHERITED_ACE on each, and SE_DACL_AUTO_INHERITED in
    the descriptor's control when the parent's has it, so that the ACEs are told
    apart from explicit ones and follow later changes of the parent.
    """
    sd = descriptor(lib, scx, ni)
    parent_sd = descriptor(lib, scx, parent)
    if sd is None or parent_sd is None or len(sd) < SD_HEADER.size:
        return
    new = bytearray(sd)
    _rev, _sbz, control, _owner, _group, _sacl, dacl = SD_HEADER.unpack_from(new)
    if not control & SE_DACL_PRESENT or not dacl or dacl + ACL_HEADER.size > len(new):
        return
    _arev, _asbz, acl_size, count, _asbz2 = ACL_HEADER.unpack_from(new, dacl)
    pos, end = dacl + ACL_HEADER.size, min(dacl + acl_size, len(new))
    for _ in range(count):
        if pos + 4 > end:
            return  # not a well-formed ACL: leave the descriptor as libntfs-3g made it
        ace_size = struct.unpack_from("<H", new, pos + 2)[0]
        if ace_size < 4:
            return
        new[pos + 1] |= INHERITED_ACE
        pos += ace_size
    parent_control = struct.unpack_from("<H", parent_sd, 2)[0]
    if parent_control & SE_DACL_AUTO_INHERITED:
        struct.pack_into("<H", new, 2, control | SE_DACL_AUTO_INHERITED)
    if bytes(new) != sd:
        data = bytes(new)
        if lib.ntfs_set_ntfs_acl(ctypes.byref(scx), ni, data, len(data), 0) != 0:
            raise Refusal("libntfs-3g could not set the inherited security descriptor")
