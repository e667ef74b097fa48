"""Moving IDs and stored POSIX ACLs between user-namespace ranges."""

from __future__ import annotations

import struct

import pytest

from pymachined.core.idshift import (
    BASE_MAX,
    BASE_MIN,
    RANGE,
    pick,
    range_of,
    shift_acl,
    shift_caps,
    shifted,
    sources,
)

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


def test_a_pick_is_stable_in_systemds_container_bases_and_skips_taken_ranges() -> None:
    first = pick("/var/lib\0web", set())
    assert first == pick("/var/lib\0web", set())
    assert BASE_MIN <= first <= BASE_MAX and first % RANGE == 0
    assert pick("/var/lib\0web", {first}) == first + RANGE or first == BASE_MAX
    others = {pick(f"/var/lib\0m{i}", set()) for i in range(50)}
    assert len(others) > 45  # a hash spreads names over the ranges


def test_the_last_range_wraps_to_the_first() -> None:
    seed = next(s for s in (f"s{i}" for i in range(200000)) if pick(s, set()) == BASE_MAX)
    assert pick(seed, {BASE_MAX}) == BASE_MIN


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, None),
        (1000, None),
        (65534, None),
        (BASE, BASE),
        (BASE + 65535, BASE),
        (BASE_MIN, BASE_MIN),
    ],
)
def test_the_range_an_owner_is_in(value: int, expected: int | None) -> None:
    assert range_of(value) == expected


OTHER_BASE = BASE + 7 * RANGE


@pytest.mark.parametrize(
    ("top", "lowers", "target", "expected"),
    [
        # ID-mapped layers, a fresh upper directory already given to the range.
        (BASE, BASE, BASE, ()),
        # ID-mapped layers over an upper the host's IDs own (back from
        # private_users: false): only what the machine wrote moves.
        (0, BASE, BASE, (0,)),
        # Out of the user namespace: layers as they are, the writes move back.
        (BASE, 0, 0, (BASE,)),
        (0, 0, 0, ()),
        # Moved to another range: the writes of the old one move.
        (BASE, OTHER_BASE, OTHER_BASE, (BASE,)),
        # Layers that cannot be mapped: the whole root moves, once.
        (0, 0, BASE, (0,)),
        (BASE, 0, BASE, ()),
        (BASE, 0, OTHER_BASE, (0, BASE)),
    ],
)
def test_what_a_walk_moves(top: int, lowers: int, target: int, expected: tuple[int, ...]) -> None:
    assert sources(top, lowers, target) == expected
