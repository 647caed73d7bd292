"""The libntfs-3g calls vhdtool makes (ctypes signatures), for vhdtool.filesystem.ntfs3g."""

from __future__ import annotations

import ctypes

from vhdtool.filesystem.ntfsdevice import s64

FILLDIR = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, s64,
                           ctypes.c_uint64, ctypes.c_uint)  # dir.h ntfs_filldir_t


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """``lib`` with the argument and result types of each function vhdtool calls."""
    c = ctypes.c_void_p
    for name, restype, argtypes in (
        ("ntfs_device_alloc", c, [ctypes.c_char_p, ctypes.c_long, c, c]),
        ("ntfs_device_free", ctypes.c_int, [c]),
        ("ntfs_device_mount", c, [c, ctypes.c_ulong]),
        ("ntfs_umount", ctypes.c_int, [c, ctypes.c_int]),
        ("ntfs_set_ignore_case", None, [c]),
        ("ntfs_open_secure", ctypes.c_int, [c]),
        ("ntfs_close_secure", ctypes.c_int, [c]),
        ("ntfs_pathname_to_inode", c, [c, c, ctypes.c_char_p]),
        ("ntfs_inode_close", ctypes.c_int, [c]),
        ("ntfs_mbstoucs", ctypes.c_int, [ctypes.c_char_p, ctypes.POINTER(c)]),
        ("ntfs_create", c, [c, ctypes.c_uint32, c, ctypes.c_uint8, ctypes.c_uint32]),
        ("ntfs_inherited_id", ctypes.c_uint32, [c, c, ctypes.c_int]),
        ("ntfs_attr_open", c, [c, ctypes.c_uint32, c, ctypes.c_uint32]),
        ("ntfs_attr_close", None, [c]),
        ("ntfs_attr_truncate", ctypes.c_int, [c, s64]),
        ("ntfs_attr_truncate_solid", ctypes.c_int, [c, s64]),
        ("ntfs_attr_pwrite", s64, [c, s64, s64, c]),
        ("ntfs_inode_open", c, [c, ctypes.c_uint64]),
        ("ntfs_readdir", ctypes.c_int, [c, ctypes.POINTER(s64), c, FILLDIR]),
        ("ntfs_delete", ctypes.c_int, [c, ctypes.c_char_p, c, c, ctypes.c_char_p, ctypes.c_uint8]),
        ("ntfs_link", ctypes.c_int, [c, c, c, ctypes.c_uint8]),
        ("ntfs_get_ntfs_acl", ctypes.c_int, [c, c, c, ctypes.c_size_t]),
        ("ntfs_set_ntfs_acl", ctypes.c_int, [c, c, c, ctypes.c_size_t, ctypes.c_int]),
    ):
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
    return lib
