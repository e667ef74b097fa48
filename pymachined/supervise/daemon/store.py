"""pymachined's records: each machine's spec and state in
``<run>/supervisor/<name>.json``, atomically rewritten on every change, so a
new pymachined adopts the machines an earlier one started. Writes files.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pymachined import files
from pymachined.supervise.base import RunSpec, RunState
from pymachined.supervise.daemon.launcher import Process

log = logging.getLogger("pymachined")


@dataclass
class Machine:
    """One supervised machine: its spec and what became of it."""

    spec: RunSpec
    wanted: str = "running"
    state: RunState = RunState.CREATED
    pid: int | None = None
    pid_start: int | None = None
    started: float | None = None
    exit_code: int | None = None
    restarts: int = 0
    failures: int = 0
    forgotten: bool = False
    restart_at: float | None = None
    kill_at: float | None = None
    oom_kills: int = 0
    payload_up: bool = False  # its PID 1 was seen to have become its payload
    process: Process | None = field(default=None, repr=False)

    def as_json(self) -> dict[str, Any]:
        """What is kept on disk."""
        return {
            "spec": self.spec.as_json(),
            "wanted": self.wanted,
            "state": self.state.value,
            "pid": self.pid,
            "pid_start": self.pid_start,
            "started": self.started,
            "exit_code": self.exit_code,
            "restarts": self.restarts,
            "forgotten": self.forgotten,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Machine:
        """A machine as kept on disk."""
        return cls(
            spec=RunSpec.from_json(data["spec"]),
            wanted=data.get("wanted", "running"),
            state=RunState(data.get("state", "created")),
            pid=data.get("pid"),
            pid_start=data.get("pid_start"),
            started=data.get("started"),
            exit_code=data.get("exit_code"),
            restarts=int(data.get("restarts", 0)),
            forgotten=bool(data.get("forgotten", False)),
        )


class Store:
    """The records directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def save(self, machine: Machine) -> None:
        """Write a machine's record."""
        files.atomic_write_json(self.directory / f"{machine.spec.name}.json", machine.as_json())

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
                machines.append(Machine.from_json(json.loads(path.read_text())))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                # Kept, and reported as unknown: the machine may still run,
                # and starting it again over its record would run it twice.
                log.error("unreadable supervisor record %s: %s", path, exc)
                broken[path.stem] = f"{path}: {exc}"
        return machines, broken
