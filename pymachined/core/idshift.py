"""User-namespace ranges: choosing a machine's, and moving a root's owners
from one range to another (the arithmetic of IDs, of POSIX ACLs as the kernel
stores them in the ``system.posix_acl_access`` and ``system.posix_acl_default``
xattrs, and of file capabilities). Pure."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Collection

RANGE = 65536  # the IDs a machine's user namespace maps (nspawn's pick)
BASE_MIN = 0x00080000
BASE_MAX = 0x6FFF0000
"""The bases systemd gives containers (its CONTAINER_UID_BASE_MIN and _MAX,
which nspawn's ``pick`` draws from): far above any user of the host."""
_SLOTS = (BASE_MAX - BASE_MIN) // RANGE + 1
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


def pick(seed: str, taken: Collection[int]) -> int:
    """The range base for a machine: the slot a hash of seed (the state root
    and the machine's name) falls on, or the next one no other machine holds
    (``taken``), as nspawn's ``pick`` does with its lock files."""
    start = int.from_bytes(hashlib.sha256(seed.encode()).digest()[:8], "big") % _SLOTS
    for step in range(_SLOTS):
        base = BASE_MIN + (start + step) % _SLOTS * RANGE
        if base not in taken:
            return base
    raise ValueError("every user-namespace range is taken")


def range_of(value: int) -> int | None:
    """The base of the machine range an owner falls in (a multiple of RANGE in
    systemd's container bases), or None for the host's own IDs and others."""
    base = value - value % RANGE
    return base if BASE_MIN <= base <= BASE_MAX else None


def sources(top: int, lowers: int, target: int) -> tuple[int, ...]:
    """The ranges whose owners a walk of a root moves to ``target``: the range
    its top directory is owned by (where its last walk, or nspawn's shift,
    left it; 0 for the host's), and the range its image layers show in
    (``lowers``: the base they are mounted ID-mapped to, 0 when they are
    not). None when the top already is in ``target``: the top is moved last,
    so a root whose top is in a range was moved whole (nspawn's own shift
    takes a root's top as its word the same way)."""
    found = range_of(top)
    here = 0 if found is None else found
    if here == target:
        return ()
    return tuple(sorted({here, lowers} - {target}))
