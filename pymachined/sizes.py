"""Parsers for sizes ("512M", "2G") and durations ("90s", "1h30m"). Pure."""

from __future__ import annotations

import math
import re

_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_SIZE = re.compile(r"(?P<num>\d+(?:\.\d+)?)\s*(?P<unit>[KMGT]?)(?:I?B)?", re.IGNORECASE)

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|min|s|m|h|d)")


def parse_size(value: object) -> int:
    """Bytes from an int or a string with a binary suffix: 512M, 2G, 1.5GiB, 4096."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 512M or 2G, got a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size {value} is negative")
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a size such as 512M or 2G, got {type(value).__name__}")
    match = _SIZE.fullmatch(value.strip())
    if match is None:
        raise ValueError(
            f"{value!r} is not a size: use a number with an optional K, M, G or T suffix "
            "(powers of 1024), such as 512M or 2G"
        )
    number = float(match["num"]) * _SIZE_UNITS[match["unit"].upper()]
    if number != int(number):
        raise ValueError(f"{value!r} is not a whole number of bytes")
    return int(number)


def parse_duration(value: object) -> float:
    """Seconds from a number or a string such as 500ms, 90s, 5m, 1h30m (bare: seconds)."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s or 5m, got a boolean")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError(f"duration {value} is not a finite number of seconds")
        if value < 0:
            raise ValueError(f"duration {value} is negative")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a duration such as 30s or 5m, got {type(value).__name__}")
    text = value.replace(" ", "")
    if not text:
        raise ValueError("empty duration")
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)  # seconds, as systemd reads a bare number
    total = 0.0
    position = 0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            break
        total += float(match[1]) * _DURATION_UNITS[match[2]]
        position = match.end()
    if position != len(text):
        raise ValueError(
            f"{value!r} is not a duration: use numbers with units ms, s, m, h or d, "
            "such as 30s, 5m or 1h30m"
        )
    return total


def format_size(size: int) -> str:
    """The shortest exact binary form of a size: 536870912 -> 512M."""
    for unit in ("T", "G", "M", "K"):
        factor = _SIZE_UNITS[unit]
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)
