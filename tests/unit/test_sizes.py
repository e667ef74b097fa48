"""Sizes and durations: table of input -> value or error."""

from __future__ import annotations

import pytest

from pymachined.core.sizes import (
    MAX_DURATION,
    MAX_SIZE,
    format_size,
    human_size,
    parse_duration,
    parse_size,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512M", 512 * 1024**2),
        ("2G", 2 * 1024**3),
        ("2g", 2 * 1024**3),
        ("1.5G", 3 * 1024**3 // 2),
        ("64KiB", 64 * 1024),
        ("10MB", 10 * 1024**2),
        ("1T", 1024**4),
        ("4096", 4096),
        (4096, 4096),
        (0, 0),
    ],
)
def test_sizes(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("12Q", "is not a size"),
        ("", "is not a size"),
        ("M", "is not a size"),
        ("-1", "is not a size"),
        (-1, "negative"),
        (True, "boolean"),
        (1.5, "got float"),
        ("1.0000001K", "whole number"),
    ],
)
def test_bad_sizes(text: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("500ms", 0.5),
        ("90s", 90.0),
        ("5m", 300.0),
        ("5min", 300.0),
        ("1h30m", 5400.0),
        ("1h 30m", 5400.0),
        ("1d", 86400.0),
        ("10", 10.0),
        (10, 10.0),
        (2.5, 2.5),
    ],
)
def test_durations(text: object, expected: float) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["5 parsecs", "s", "", "1h30", "m5", "-5s", False])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("size", "text"), [(512 * 1024**2, "512M"), (1024**3, "1G"), (1000, "1000"), (0, "0")]
)
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("16777216T", "'16777216T' is larger than 1048576T, the largest size"),
        ("1048577T", "larger than 1048576T"),
        (2**64, "larger than 1048576T"),
        ("9" * 5000, "larger than 1048576T"),
        (10**5000, "a number of 16610 bits"),
    ],
    ids=lambda v: f"{v}"[:20] if not isinstance(v, int) else f"int of {v.bit_length()} bits",
)
def test_sizes_have_an_upper_bound(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_size(value)


def test_the_largest_size_is_accepted() -> None:
    assert parse_size("1048576T") == 1024**6 == MAX_SIZE


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("366d", "'366d' is longer than 365d"),
        ("365d1s", "longer than 365d"),
        (1e300, "longer than 365d"),
        (10**400, "a number of 1329 bits"),
        ("9" * 5000, "longer than 365d"),
        ("9" * 5000 + "s", "longer than 365d"),
    ],
    ids=lambda v: f"{v}"[:20] if not isinstance(v, int) else f"int of {v.bit_length()} bits",
)
def test_durations_have_an_upper_bound(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_duration(value)


def test_the_longest_duration_is_accepted() -> None:
    assert parse_duration("365d") == MAX_DURATION == 365 * 86400


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1536, "1.5 KiB"),
        (12 * 1024**2, "12 MiB"),
        (3 * 1024**5, "3072 TiB"),
    ],
)
def test_human_sizes(size: int, text: str) -> None:
    assert human_size(size) == text
