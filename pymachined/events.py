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
from pymachined.layout import Layout

MAX_BYTES = 1024 * 1024


def _path(layout: Layout) -> Path:
    return Path(layout.state_dir) / "events.jsonl"


def record(layout: Layout, machine: str, event: str, **fields: Any) -> None:
    """Append one event."""
    path = _path(layout)
    path.parent.mkdir(parents=True, exist_ok=True)
    with files.locked(path.with_name(path.name + ".lock")):
        if path.exists() and path.stat().st_size > MAX_BYTES:
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


def read(layout: Layout, since: datetime | None = None) -> Iterator[dict[str, Any]]:
    """Events in order, oldest first, from ``since`` on."""
    path = _path(layout)
    for source in (path.with_name(path.name + ".1"), path):
        try:
            lines = source.read_text().splitlines()
        except FileNotFoundError:
            continue
        for line in lines:
            try:
                event: dict[str, Any] = json.loads(line)
            except ValueError:
                continue
            if since is None or datetime.fromisoformat(event["time"]) >= since:
                yield event
