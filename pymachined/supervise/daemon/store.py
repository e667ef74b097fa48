"""pymachined's records: each machine's spec and state in
``<run>/supervisor/<name>.json``, atomically rewritten on every change, so a
new pymachined adopts the machines an earlier one started. Writes files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from pymachined import files
from pymachined.core import wire
from pymachined.supervise.base import RunSpec, RunState
from pymachined.supervise.daemon.launcher import Process

log = logging.getLogger("pymachined")


@dataclass
class Entry:
    """What is kept on disk of a supervised machine."""

    spec: RunSpec
    wanted: str = "running"
    state: RunState = RunState.CREATED
    pid: int | None = None
    pid_start: int | None = None
    started: float | None = None
    exit_code: int | None = None
    restarts: int = 0
    forgotten: bool = False


@dataclass
class Machine(Entry):
    """One supervised machine: what is kept of it, and what only the running
    loop holds (timers, counters, its pidfd)."""

    failures: int = 0
    restart_at: float | None = None
    kill_at: float | None = None
    oom_kills: int = 0
    payload_up: bool = False  # its PID 1 was seen to have become its payload
    process: Process | None = field(default=None, repr=False)

    def entry(self) -> Entry:
        """What is kept on disk of it."""
        return Entry(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Entry)})

    @classmethod
    def from_entry(cls, entry: Entry) -> Machine:
        """A machine as kept on disk."""
        return cls(**vars(entry))


class Store:
    """The records directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def save(self, machine: Machine) -> None:
        """Write a machine's record: atomically (a pymachined killed meanwhile
        leaves the old record or the new one), not durably. A record describes
        processes, which do not outlive the host either, and it lives in the run
        directory (/run, a tmpfs, on a real host): two fsyncs per start and stop
        would buy nothing a power loss leaves to adopt."""
        files.atomic_write_json(
            self.directory / f"{machine.spec.name}.json", wire.dump(machine.entry()), durable=False
        )

    def drop(self, name: str) -> None:
        """Remove a machine's record."""
        (self.directory / f"{name}.json").unlink(missing_ok=True)

    def load(self) -> tuple[list[Machine], dict[str, str]]:
        """The recorded machines, and the names of records that cannot be read,
        with why."""
        self.directory.mkdir(parents=True, exist_ok=True)
        machines: list[Machine] = []
        broken: dict[str, str] = {}
        for path in sorted(self.directory.glob("*.json")):
            try:
                entry = wire.load(Entry, json.loads(path.read_text()))
                machines.append(Machine.from_entry(entry))
            except (OSError, ValueError) as exc:
                # Kept, and reported as unknown: the machine may still run,
                # and starting it again over its record would run it twice.
                log.error("unreadable supervisor record %s: %s", path, exc)
                broken[path.stem] = f"{path}: {exc}"
        return machines, broken
