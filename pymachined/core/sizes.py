"""Parsers for sizes ("512M", "2G") and durations ("90s", "1h30m"). Pure."""

from __future__ import annotations

import math
import re
from fractions import Fraction

_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_SIZE = re.compile(r"(?P<num>\d+(?:\.\d+)?)\s*(?P<unit>[KMGT]?)(?:I?B)?", re.IGNORECASE)

_DURATION_UNITS = {
    "ms": Fraction(1, 1000),
    "s": Fraction(1),
    "m": Fraction(60),
    "min": Fraction(60),
    "h": Fraction(3600),
    "d": Fraction(86400),
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|min|s|m|h|d)")

MAX_SIZE = 1024**6
"""1 EiB: far above any machine's memory or disk, and well inside the 64-bit
counters the kernel keeps (16777216T is 2**64 bytes, which wraps to 0)."""
MAX_DURATION = 365 * 86400.0
"""A year: a longer timeout is a typo, and systemd's and Python's clocks both
take it without overflowing."""
_MAX_DIGITS = 40  # longer numbers are refused before they are converted


def _shown(value: object) -> str:
    """A value for a message, cut short (and never a 5,000-digit conversion)."""
    if isinstance(value, int) and value.bit_length() > 128:
        return f"(a number of {value.bit_length()} bits)"
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= _MAX_DIGITS else text[:_MAX_DIGITS] + "..."


def _check_size(size: int | Fraction, value: object) -> None:
    if size > MAX_SIZE:
        raise ValueError(
            f"size {_shown(value)} is larger than {format_size(MAX_SIZE)}, the largest size"
        )


def _check_duration(seconds: float | Fraction, value: object) -> None:
    if seconds > MAX_DURATION:
        raise ValueError(f"duration {_shown(value)} is longer than 365d, the longest duration")


def parse_size(value: object) -> int:
    """Bytes from an int or a string with a binary suffix: 512M, 2G, 1.5GiB, 4096."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 512M or 2G, got a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size {value} is negative")
        _check_size(value, value)
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a size such as 512M or 2G, got {type(value).__name__}")
    match = _SIZE.fullmatch(value.strip())
    if match is None:
        raise ValueError(
            f"{value!r} is not a size: use a number with an optional K, M, G or T suffix "
            "(powers of 1024), such as 512M or 2G"
        )
    if len(match["num"]) > _MAX_DIGITS:
        _check_size(MAX_SIZE + 1, value)
    number = Fraction(match["num"]) * _SIZE_UNITS[match["unit"].upper()]
    _check_size(number, value)
    if number.denominator != 1:
        raise ValueError(f"{value!r} is not a whole number of bytes")
    return int(number)


def parse_duration(value: object) -> float:
    """Seconds from a number or a string such as 500ms, 90s, 5m, 1h30m (bare: seconds)."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s or 5m, got a boolean")
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"duration {value} is not a finite number of seconds")
        if value < 0:
            raise ValueError(f"duration {value} is negative")
        _check_duration(value, value)
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a duration such as 30s or 5m, got {type(value).__name__}")
    text = value.replace(" ", "")
    if not text:
        raise ValueError("empty duration")
    if any(len(n) > _MAX_DIGITS for n in re.findall(r"[\d.]+", text)):
        _check_duration(MAX_DURATION + 1, value)
    if re.fullmatch(r"\d+(\.\d+)?", text):
        _check_duration(Fraction(text), value)
        return float(text)  # seconds, as systemd reads a bare number
    total = Fraction(0)
    position = 0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            break
        total += Fraction(match[1]) * _DURATION_UNITS[match[2]]
        position = match.end()
    if position != len(text):
        raise ValueError(
            f"{value!r} is not a duration: use numbers with units ms, s, m, h or d, "
            "such as 30s, 5m or 1h30m"
        )
    _check_duration(total, value)
    return float(total)


def format_size(size: int) -> str:
    """The shortest exact binary form of a size: 536870912 -> 512M."""
    for unit in ("T", "G", "M", "K"):
        factor = _SIZE_UNITS[unit]
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def human_size(size: int) -> str:
    """A size for people, in the largest binary unit it reaches: 12582912 -> 12 MiB."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" or value >= 10 else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"  # pragma: no cover - the loop returns at TiB
