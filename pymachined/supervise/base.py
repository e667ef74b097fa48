"""The supervisor interface: what runs machines and restarts them by policy.

Two backends stand behind it: systemd where it is PID 1, and pymachined (the
builtin supervisor) everywhere else. Both keep the same states and restart
semantics.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from pymachined.core.limits import DEFAULT_LOG_MAX, Limits
from pymachined.core.spec import Machine

SOCKET = "pymachined.sock"
"""pymachined's socket, in the run directory."""


class Connection(Protocol):
    """What read_line needs of a socket."""

    def recv(self, size: int, /) -> bytes:
        """Up to size bytes."""
        ...


def read_line(connection: Connection) -> bytes:
    """One newline-terminated message (pymachined's requests and replies)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = connection.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


class RunState(StrEnum):
    """A supervised machine's state."""

    CREATED = "created"
    STARTING = "starting"  # its nspawn is setting it up: the payload does not run yet
    RUNNING = "running"
    PAUSED = "paused"
    RESTARTING = "restarting"
    EXITED = "exited"
    DEAD = "dead"
    UNKNOWN = "unknown"  # the supervisor's own record of it cannot be read


LIVE = frozenset({RunState.STARTING, RunState.RUNNING, RunState.PAUSED, RunState.RESTARTING})
"""The states of a machine its supervisor runs, or is about to run again."""


@dataclass(frozen=True)
class BindSource:
    """A host path bound into a machine, as the spec names it: mounted afresh
    at its staging path (``Layout.bind_staging``) before every start."""

    source: str
    read_only: bool = False


@dataclass(frozen=True)
class RunSpec:
    """How to run one machine: its command line, restart policy and log, and
    the bind sources to mount at their staging paths before each start."""

    name: str
    argv: tuple[str, ...]
    restart: str
    log: str
    stop_timeout: float
    limits: Limits = field(default_factory=Limits)
    binds: tuple[BindSource, ...] = ()
    log_max: int = DEFAULT_LOG_MAX  # bytes of log before it is rotated to LOG.1


@dataclass(frozen=True)
class Status:
    """What the supervisor says of one machine."""

    name: str
    state: RunState
    pid: int | None = None
    started: float | None = None
    exit_code: int | None = None
    restarts: int = 0
    enabled: bool | None = None  # starts at boot; None where the supervisor has no such notion
    detail: str | None = None  # why the state is unknown


@dataclass(frozen=True)
class LogLine:
    """One line of a machine's output: its UTC time stamp (``LOG_TIME_FORMAT``;
    None where the line has none) and its text, with the line's newline."""

    stamp: str | None
    text: str


class Supervisor(Protocol):
    """Runs machines, restarts them by policy, and says how they are."""

    #: Whether a start reads the rendered files (systemd: the unit and the
    #: .nspawn file), so that starts wait for the commit that takes them in;
    #: pymachined starts a machine from its run spec alone.
    starts_from_files: bool

    def prepare(self) -> None:
        """Get ready to start machines soon (pymachined starts in the background)."""
        ...

    def status(self) -> dict[str, Status]:
        """Every machine the supervisor knows, by name."""
        ...

    def run_view(self, name: str, run: RunSpec, spec: Machine | None) -> dict[str, Any]:
        """How a machine runs under this supervisor, for ``inspect``: its
        recorded run spec with the command line and log source actually used."""
        ...

    def cgroup(self, name: str) -> str:
        """A machine's control group, relative to each hierarchy's root."""
        ...

    def output(
        self, name: str, lines: int | None, since: float | None, follow: bool
    ) -> Iterator[LogLine] | None:
        """A machine's output, oldest first (the last ``lines`` of it; from
        ``since``, in seconds since the epoch, on), then, with ``follow``, what
        it prints next, until interrupted; None if it has printed nothing yet
        (pymachined: its console log; systemd: its unit's journal)."""
        ...

    def events(self, since: float | None) -> list[dict[str, Any]]:
        """Lifecycle events this supervisor logs itself, beyond pymachine's own
        event log, oldest first (systemd: its journal's word of each machine
        unit; pymachined: none, it writes them to pymachine's log)."""
        ...

    def settled(self) -> None:
        """An apply has converged the host (systemd: a boot apply that failed
        earlier no longer leaves its unit failed, the host degraded)."""
        ...

    def commit(self, autostart: Mapping[str, bool], reload: bool) -> None:
        """Take in rendered files written or removed since the last commit:
        ``autostart`` by machine name for those whose files were written,
        ``reload`` when any file changed (systemd: enable/disable, then one
        daemon-reload; pymachined reads nothing from them)."""
        ...

    def ready(self) -> None:
        """An apply's files are in place and committed; it starts machines next
        (systemd: the boot apply's unit says READY=1, which lets the machine
        units ordered after it start). Said once; the later calls do nothing."""
        ...

    def start(self, spec: RunSpec) -> Status:
        """Start a machine (replacing any earlier spec of the same name)."""
        ...

    def restart(self, spec: RunSpec) -> Status:
        """Stop a machine and start it with spec."""
        ...

    def stop(self, name: str) -> Status:
        """Stop a machine and keep it stopped."""
        ...

    def forget(self, name: str) -> None:
        """Stop a machine if it runs, and drop it."""
        ...

    def pause(self, name: str, paused: bool) -> Status:
        """Freeze or thaw every process of a running machine."""
        ...

    def set_limits(self, name: str, limits: Limits) -> list[str]:
        """Change a machine's resource limits, live if it runs, and for its next
        starts; what this host cannot limit, as messages."""
        ...
