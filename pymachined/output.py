"""How the command line prints what the verbs return: aligned tables, JSON or
YAML documents, log lines and event lines, on standard output. Edge (it only
writes to the terminal); ``cell``, ``human`` and ``event_line`` are pure."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum
from typing import Any

import typer

from pymachined.supervise.base import LogLine


class Format(StrEnum):
    """How read commands print."""

    TABLE = "table"
    JSON = "json"
    YAML = "yaml"


def data(document: object, fmt: Format) -> None:
    """A document as YAML with fmt yaml, else as JSON."""
    if fmt is Format.YAML:
        import yaml

        typer.echo(yaml.safe_dump(document, sort_keys=False), nl=False)
    else:
        typer.echo(json.dumps(document, indent=2, default=str))


def rows(found: Sequence[Mapping[str, Any]], columns: Sequence[str], fmt: Format) -> None:
    """Rows as JSON or YAML, or as an aligned table of columns."""
    if fmt is not Format.TABLE:
        data(list(found), fmt)
        return
    texts = [[cell(row.get(c)) for c in columns] for row in found]
    widths = [max([len(c), *(len(t[i]) for t in texts)]) for i, c in enumerate(columns)]
    typer.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for text in texts:
        typer.echo("  ".join(t.ljust(w) for t, w in zip(text, widths, strict=True)).rstrip())


def cell(value: object) -> str:
    """A table cell: - for nothing, a list joined by commas. Pure."""
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "-"
    return str(value)


def human(size: int) -> str:
    """Bytes for people: 512 B, 1.5 KiB, 2.0 GiB. Pure."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover


def humanized(
    found: Iterable[Mapping[str, Any]], keys: Sequence[str], fmt: Format
) -> list[dict[str, Any]]:
    """Rows with the byte counts of keys for people in a table, as they are
    for JSON and YAML. Pure."""
    out = [dict(row) for row in found]
    if fmt is Format.TABLE:
        for row in out:
            for key in keys:
                row[key] = human(row[key]) if row[key] is not None else None
    return out


def plural(count: int, noun: str) -> str:
    """count and noun, with an s unless count is 1. Pure."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def log_line(line: LogLine, timestamps: bool) -> None:
    """One line of a machine's output, with its time stamp if asked."""
    typer.echo(f"{line.stamp} {line.text}" if timestamps and line.stamp else line.text, nl=False)


def event_line(event: Mapping[str, Any]) -> str:
    """An event as a table line: time, machine, event, then its other fields
    as key=value. Pure."""
    extra = " ".join(
        f"{k}={v}" for k, v in sorted(event.items()) if k not in ("time", "machine", "event")
    )
    return f"{event['time']}  {event['machine']}  {event['event']}  {extra}".rstrip()


def events(found: Sequence[Mapping[str, Any]], fmt: Format) -> None:
    """Events as YAML, as one JSON object a line, or as table lines."""
    if fmt is Format.YAML:
        data(list(found), fmt)
        return
    for event in found:
        typer.echo(json.dumps(event, sort_keys=True) if fmt is Format.JSON else event_line(event))


def clear_screen() -> None:
    """Clear a terminal before the next screenful (stats refreshing)."""
    typer.echo("\x1b[H\x1b[2J", nl=False)


def warning(text: str) -> None:
    """A warning line on standard error."""
    typer.echo(f"warning: {text}", err=True)


def error(text: str) -> None:
    """An error line on standard error (the command goes on)."""
    typer.echo(f"error: {text}", err=True)


def note(text: str) -> None:
    """A line for the operator on standard error, outside the command's output."""
    typer.echo(text, err=True)


def line(text: str = "") -> None:
    """One line of a command's output."""
    typer.echo(text)
