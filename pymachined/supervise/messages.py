"""What the builtin client and pymachined say to each other: one request per
connection, one reply, each a JSON line. Pure.

Requests are a closed union told apart by ``op``; pymachined answers each with
its reply type, or with ``Failed``. Both ends read through ``core.wire``, so a
request whose fields do not fit is refused whole, naming the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Literal, TypeVar

from pydantic import Field

from pymachined.core import wire
from pymachined.core.limits import Limits
from pymachined.supervise.base import RunSpec, Status

R = TypeVar("R")


@dataclass(frozen=True)
class Ping:
    """Whether pymachined answers, and its pid."""

    op: Literal["ping"] = "ping"


@dataclass(frozen=True)
class ListStatus:
    """Every supervised machine's status, or only those of ``names`` (a start
    waiting for its machine asks for one: the reply stays small however many
    machines run; a pymachined from before ignores the field and sends all)."""

    op: Literal["status"] = "status"
    names: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Start:
    """Start a machine from its run spec."""

    spec: RunSpec
    op: Literal["start"] = "start"


@dataclass(frozen=True)
class Stop:
    """Stop a machine (SIGTERM, SIGKILL after its stop timeout); with op
    ``forget``, drop it from pymachined too."""

    name: str
    op: Literal["stop", "forget"] = "stop"

    @property
    def forget(self) -> bool:
        """Whether pymachined drops the machine once it is stopped."""
        return self.op == "forget"


@dataclass(frozen=True)
class Pause:
    """Freeze a running machine, or thaw it (op ``unpause``)."""

    name: str
    op: Literal["pause", "unpause"] = "pause"

    @property
    def paused(self) -> bool:
        """Whether the machine is to be frozen."""
        return self.op == "pause"


@dataclass(frozen=True)
class SetLimits:
    """Write a machine's limits into its cgroups, and keep them for its restarts."""

    name: str
    limits: Limits
    op: Literal["limits"] = "limits"


Request = Annotated[Ping | ListStatus | Start | Stop | Pause | SetLimits, Field(discriminator="op")]
"""Every request pymachined takes."""


@dataclass(frozen=True)
class Pong:
    """pymachined's pid."""

    pid: int


@dataclass(frozen=True)
class Statuses:
    """Every supervised machine, and those whose records cannot be read (unknown)."""

    machines: tuple[Status, ...]


@dataclass(frozen=True)
class Changed:
    """A machine's status after a request changed it; for a stop, how long
    pymachined waits before SIGKILL; for limits, what the host cannot limit."""

    status: Status
    stop_timeout: float = 0.0
    skipped: tuple[str, ...] = ()


@dataclass(frozen=True)
class Failed:
    """A request pymachined refused, and what to do about it."""

    error: str
    hint: str | None = None


Reply = Pong | Statuses | Changed | Failed


def encode(message: object) -> bytes:
    """A request or reply as the JSON line sent."""
    return json.dumps(wire.dump(message)).encode() + b"\n"


def decode_request(line: bytes) -> Request:
    """A request from its JSON line; ValueError naming what does not fit."""
    request: Request = wire.load_union(Request, json.loads(line))
    return request


def decode_reply(line: bytes, expected: type[R]) -> R | Failed:
    """The reply to a request that expects a reply of type expected, or the
    refusal pymachined sent instead; ValueError if it is neither."""
    data = json.loads(line)
    if isinstance(data, dict) and "error" in data:
        return wire.load(Failed, data)
    return wire.load(expected, data)
