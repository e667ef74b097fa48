"""Moving IDs and stored POSIX ACLs between user-namespace ranges."""

from __future__ import annotations

import struct

import pytest

from pymachined.core.idshift import RANGE, shift_acl, shift_caps, shifted

BASE = 325386240


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (BASE, 0),
        (BASE + 100, 100),
        (BASE + RANGE - 1, RANGE - 1),
        (BASE + RANGE, BASE + RANGE),  # past the range: not the machine's
        (BASE - 1, BASE - 1),
        (0, 0),
        (65534, 65534),
    ],
)
def test_an_id_moves_only_when_it_is_in_the_range(value: int, expected: int) -> None:
    assert shifted(value, BASE, 0) == expected


def acl(*entries: tuple[int, int, int], version: int = 2) -> bytes:
    return struct.pack("<I", version) + b"".join(struct.pack("<HHI", *e) for e in entries)


USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
UNDEFINED = 0xFFFFFFFF


def test_named_users_and_groups_of_an_acl_move_and_nothing_else_does() -> None:
    stored = acl(
        (USER_OBJ, 7, UNDEFINED),
        (USER, 4, BASE + 1234),
        (USER, 4, 77),  # a host ID outside the range stays
        (GROUP_OBJ, 5, UNDEFINED),
        (GROUP, 6, BASE + 102),
        (MASK, 7, UNDEFINED),
        (OTHER, 0, UNDEFINED),
    )
    assert shift_acl(stored, BASE, 0) == acl(
        (USER_OBJ, 7, UNDEFINED),
        (USER, 4, 1234),
        (USER, 4, 77),
        (GROUP_OBJ, 5, UNDEFINED),
        (GROUP, 6, 102),
        (MASK, 7, UNDEFINED),
        (OTHER, 0, UNDEFINED),
    )


@pytest.mark.parametrize(
    "blob",
    [b"", b"\x02\x00", acl((USER, 4, BASE), version=1), acl((USER, 4, BASE))[:-1]],
    ids=["empty", "short", "another-version", "torn-entry"],
)
def test_what_is_not_a_stored_acl_is_left_as_it_is(blob: bytes) -> None:
    assert shift_acl(blob, BASE, 0) == blob


def caps(magic: int, *words: int) -> bytes:
    return struct.pack(f"<I{len(words)}I", magic, *words)


def test_file_capabilities_keep_their_sets_and_move_their_root_id() -> None:
    v3 = caps(0x03000001, 1 << 13, 0, 0, 0, BASE)  # cap_net_raw, effective, of the machine's root
    assert shift_caps(v3, BASE, 0) == caps(0x03000001, 1 << 13, 0, 0, 0, 0)
    v2 = caps(0x02000001, 1 << 13, 0, 0, 0)  # no root ID: anyone's
    assert shift_caps(v2, BASE, 0) == v2
    assert shift_caps(b"\x03", BASE, 0) == b"\x03"
