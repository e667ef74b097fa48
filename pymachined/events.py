"""Lifecycle events: one JSON line each in ``<state>/events.jsonl``.

pymachined records what happens to running machines (start, die with its exit
code, restart, dead, stop); apply records what it does to them (create,
remove). Lines are appended with O_APPEND in one write, so concurrent writers
never interleave within a line; the file is rotated to ``events.jsonl.1`` past
1 MiB.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pymachined import files
from pymachined.core.layout import Layout

MAX_BYTES = 1024 * 1024


def _path(layout: Layout) -> Path:
    return Path(layout.state_dir) / "events.jsonl"


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def record(layout: Layout, machine: str, event: str, **fields: Any) -> None:
    """Append one event."""
    path = _path(layout)
    path.parent.mkdir(parents=True, exist_ok=True)
    if _size(path) > MAX_BYTES:
        # Rotated by one writer: the others find it small again under the lock.
        with files.locked(path.with_name(path.name + ".lock")):
            if _size(path) > MAX_BYTES:
                path.replace(path.with_name(path.name + ".1"))
    line = {
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "machine": machine,
        "event": event,
        **fields,
    }
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, (json.dumps(line, sort_keys=True) + "\n").encode())
    finally:
        os.close(fd)


def parse_event(line: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """One event line as (its event, None), or (None, why it is skipped). Pure."""
    try:
        event = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "not valid UTF-8"
    except ValueError:
        return None, "not valid JSON"
    if not isinstance(event, dict):
        return None, "not a JSON object"
    if not isinstance(event.get("machine"), str) or not isinstance(event.get("event"), str):
        return None, "no machine or event"
    when = event.get("time")
    try:
        moment = datetime.fromisoformat(when) if isinstance(when, str) else None
    except ValueError:
        moment = None
    if moment is None:
        return None, "no valid time"
    if moment.tzinfo is None:
        event["time"] = moment.replace(tzinfo=UTC).isoformat(timespec="milliseconds")
    return event, None


def read(
    layout: Layout, since: datetime | None = None, skipped: list[str] | None = None
) -> Iterator[dict[str, Any]]:
    """Events in order, oldest first, from ``since`` on. A line that is not an
    event is skipped, and said in ``skipped`` as FILE:LINE: why."""
    path = _path(layout)
    for source in (path.with_name(path.name + ".1"), path):
        try:
            lines = source.read_bytes().splitlines()
        except FileNotFoundError:
            continue
        for number, line in enumerate(lines, 1):
            event, problem = parse_event(line)
            if event is None:
                if skipped is not None and line.strip():
                    skipped.append(f"{source}:{number}: {problem}; skipped")
                continue
            if since is None or datetime.fromisoformat(event["time"]) >= since:
                yield event
