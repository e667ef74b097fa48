"""The restart policy: what becomes of a machine whose nspawn has exited (pure).

Policies ``no``, ``on-failure`` (a non-zero or unknown exit code) and
``always``, with backoff from 0.2 s doubling to 10 s, reset by 10 s of
running. A machine that exits more than five times in a row without running
10 s is ``dead``: no more restarts until it is started again, as systemd's
start limit. A stop asked for (``wanted`` is ``stopped``) never restarts.
No clock, no cgroups, no I/O: the caller passes how long the machine ran.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

BACKOFF_FIRST = 0.2
BACKOFF_MAX = 10.0
HEALTHY_AFTER = 10.0  # seconds of running that reset the count of quick exits
START_LIMIT = 5  # quick exits in a row before a machine is dead, as systemd's StartLimitBurst


class Outcome(StrEnum):
    """What the supervisor does with a machine that has exited."""

    RESTART = "restart"  # again after the decision's delay
    DEAD = "dead"  # it would restart, but hit the start limit
    EXITED = "exited"  # it stays down: its policy, or a stop asked for


@dataclass(frozen=True)
class Decision:
    """The outcome of an exit, the event that records the exit (``stop`` for a
    stop asked for, ``die`` for any other end), the count of quick exits in a
    row, and for a restart its delay in seconds."""

    outcome: Outcome
    event: str
    failures: int
    delay: float | None = None


def wants_restart(restart: str, exit_code: int | None) -> bool:
    """Whether a policy restarts after this exit code (None: unknown, a failure)."""
    return restart == "always" or (restart == "on-failure" and exit_code != 0)


def backoff(failures: int) -> float:
    """Seconds before a restart after ``failures`` quick exits in a row."""
    return min(BACKOFF_MAX, BACKOFF_FIRST * 2.0 ** max(0, failures - 1))


def decide(restart: str, wanted: str, exit_code: int | None, ran: float, failures: int) -> Decision:
    """What to do with a machine that exited with ``exit_code`` after running
    ``ran`` seconds, ``failures`` quick exits in a row before this one (pure)."""
    failures = 0 if ran > HEALTHY_AFTER else failures + 1
    stopped = wanted == "stopped"
    event = "stop" if stopped else "die"
    if wanted != "running" or not wants_restart(restart, exit_code):
        return Decision(Outcome.EXITED, event, failures)
    if failures > START_LIMIT:
        return Decision(Outcome.DEAD, event, failures)
    return Decision(Outcome.RESTART, event, failures, backoff(failures))


def exit_code(returncode: int, killed_by: int | None) -> int:
    """A machine's exit code from its nspawn's: 128+N for a signal N, whether it
    killed nspawn (a negative returncode) or the payload (nspawn exits 1, and
    ``killed_by`` is the signal its log names), as Docker reports it (pure)."""
    if returncode == 1 and killed_by is not None:
        return 128 + killed_by
    return returncode if returncode >= 0 else 128 - returncode
