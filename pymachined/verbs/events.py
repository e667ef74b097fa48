"""``events``: pymachine's event log, merged with the events the supervisor
logs itself (systemd's journal of machine units). Edge."""

from __future__ import annotations

from typing import Any

from pymachined import events as event_log
from pymachined.core.layout import Layout
from pymachined.supervise.base import Supervisor
from pymachined.verbs.logs import since


def events(
    layout: Layout, supervisor: Supervisor, window: str | None, skipped: list[str]
) -> list[dict[str, Any]]:
    """Lifecycle events from the --since window on, oldest first; lines of the
    log that are no events are said in skipped."""
    start = since(window)
    found = list(event_log.read(layout, start, skipped))
    extra = supervisor.events(start.timestamp() if start is not None else None)
    if extra:
        found = sorted(found + extra, key=lambda e: str(e["time"]))
    return found
