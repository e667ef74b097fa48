"""``logs``: a machine's output as its supervisor keeps it, or a booted
machine's own journal read inside it; and the ``--since`` windows of logs and
events. Edge; ``parse_since`` is pure."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

from pymachined.core import commands
from pymachined.core.layout import Layout
from pymachined.core.sizes import parse_duration
from pymachined.errors import PymachineError, UsageError
from pymachined.supervise.base import LogLine, Supervisor
from pymachined.verbs.enter import enter
from pymachined.verbs.lifecycle import known


def parse_since(value: str | None, now: datetime) -> datetime | None:
    """The start of a --since window, as an aware UTC time: a UTC time
    (2026-11-28T10:00:00, Z or an offset allowed) or a duration back from now
    (10m, 1h30m). Pure."""
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value.removesuffix("Z"))
    except ValueError:
        try:
            return now - timedelta(seconds=parse_duration(value))
        except ValueError as exc:
            raise UsageError(f"--since: {exc}, nor a time such as 2026-11-28T10:00:00") from exc
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def since(value: str | None) -> datetime | None:
    """The start of a --since window, measured from the clock now."""
    return parse_since(value, datetime.now(UTC))


def output(
    layout: Layout,
    supervisor: Supervisor,
    name: str,
    lines: int | None,
    window: str | None,
    follow: bool,
) -> Iterator[LogLine] | None:
    """A machine's output (its unit's journal under systemd, else its console
    as pymachined captured it) from the --since window on; None if it has
    printed nothing yet."""
    known(layout, name)
    start = since(window)
    return supervisor.output(name, lines, start.timestamp() if start is not None else None, follow)


def journal(
    layout: Layout,
    supervisor: Supervisor,
    name: str,
    lines: int | None,
    window: str | None,
    follow: bool,
    timestamps: bool,
) -> int:
    """Print a booted machine's own journal, read by its own journalctl inside
    it, confined as exec's commands are; journalctl's exit code."""
    record = known(layout, name)
    start = since(window)
    if record.spec is None or not record.spec.boot:
        raise PymachineError(
            f"{name} is not booted: its output is all there is",
            hint=f"pymachine logs {name}",
        )
    moment = start.strftime("%Y-%m-%d %H:%M:%S") if start is not None else None
    argv = commands.journal_argv(follow, lines, moment, timestamps)
    return enter(layout, supervisor, name, argv, "root", None, None)
