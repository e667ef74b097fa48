"""Sizes and durations: table of input -> value or error."""

from __future__ import annotations

import pytest

from pymachined.sizes import format_size, parse_duration, parse_size


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
