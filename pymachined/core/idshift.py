"""Moving a root's owners from one user-namespace range to another: the
arithmetic of IDs and of POSIX ACLs as the kernel stores them in the
``system.posix_acl_access`` and ``system.posix_acl_default`` xattrs. Pure."""

from __future__ import annotations

import struct

RANGE = 65536  # the IDs a machine's user namespace maps (nspawn's pick)
ACL_XATTRS = ("system.posix_acl_access", "system.posix_acl_default")
_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")
_ACL_VERSION = 2
_NAMED = (0x02, 0x08)  # ACL_USER, ACL_GROUP: the entries that carry an ID


def shifted(value: int, base: int, to: int) -> int:
    """An ID of the range at base moved to the range at to; one outside the
    range is left as it is (the host's own, or nobody)."""
    return value - base + to if base <= value < base + RANGE else value


def shift_acl(blob: bytes, base: int, to: int) -> bytes:
    """A stored POSIX ACL with its named users and groups moved from the range
    at base to the range at to; a blob that is not a version-2 ACL is
    returned unchanged."""
    if len(blob) < _HEADER.size or (len(blob) - _HEADER.size) % _ENTRY.size:
        return blob
    if _HEADER.unpack_from(blob)[0] != _ACL_VERSION:
        return blob
    out = bytearray(blob[: _HEADER.size])
    for tag, perm, ident in _ENTRY.iter_unpack(blob[_HEADER.size :]):
        moved = shifted(ident, base, to) if tag in _NAMED else ident
        out += _ENTRY.pack(tag, perm, moved)
    return bytes(out)


CAPABILITY_XATTR = "security.capability"  # file capabilities, which chown(2) drops
_CAPS_V3 = 0x03000000
_CAPS_V3_SIZE = 24  # magic, two (permitted, inheritable) pairs, then the root ID


def shift_caps(blob: bytes, base: int, to: int) -> bytes:
    """File capabilities with their root ID (version 3: the user namespace
    they belong to) moved from the range at base to the range at to; those of
    another version are returned unchanged."""
    if len(blob) != _CAPS_V3_SIZE or _HEADER.unpack_from(blob)[0] & 0xFF000000 != _CAPS_V3:
        return blob
    rootid = _HEADER.unpack_from(blob, _CAPS_V3_SIZE - 4)[0]
    return blob[:-4] + _HEADER.pack(shifted(rootid, base, to))
