"""Parsers of host facts and logs: text in, values out."""

from __future__ import annotations

import pytest

from pymachined.parsers import parse_log_line


@pytest.mark.parametrize(
    ("line", "parsed"),
    [
        ("2026-11-28T10:00:00Z hello\n", ("2026-11-28T10:00:00Z", "hello\n")),
        ("2026-11-28T10:00:00Z \n", ("2026-11-28T10:00:00Z", "\n")),
        ("2026-11-28T10:00:00Z  indented\n", ("2026-11-28T10:00:00Z", " indented\n")),
        ("hello\n", (None, "hello\n")),
        ("2026-11-28 10:00:00 not ours\n", (None, "2026-11-28 10:00:00 not ours\n")),
    ],
)
def test_log_lines(line: str, parsed: tuple[str | None, str]) -> None:
    assert parse_log_line(line) == parsed
