"""Actions: what apply does to the host, as frozen data. Pure.

Each action names its machine (or, for network actions, its network) and why
it is needed; ``describe()`` is the line
``plan`` prints and ``as_json()`` the object ``plan -o json`` prints. A plan
holds ``Step``s, the closed union of the concrete actions; ``phase()`` says
when apply carries each out.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, assert_never

from pymachined.core import wire
from pymachined.core.sizes import human_size
from pymachined.core.spec import Network, RootfsMode, Volume


@dataclass(frozen=True)
class Action:
    """One step of a plan."""

    verb: ClassVar[str] = "act on"
    hidden: ClassVar[tuple[str, ...]] = ()  # fields plan -o json leaves out
    machine: str
    reason: str

    @property
    def kind(self) -> str:
        """The action's type name, as in the JSON form."""
        return type(self).__name__

    def describe(self) -> str:
        """One line for people."""
        return f"{self.verb} {self.machine}: {self.reason}"

    def as_json(self) -> dict[str, Any]:
        """The action as JSON: its type and fields, by ``core.wire``."""
        data = {"action": self.kind, **wire.dump(self)}
        for name in self.hidden:
            del data[name]
        return data


@dataclass(frozen=True)
class BuildImage(Action):
    """Build the image layers a machine needs."""

    verb: ClassVar[str] = "build image for"
    image: str = ""
    key: str = ""

    def describe(self) -> str:
        return f"build image {self.image} ({self.key}) for {self.machine}: {self.reason}"


@dataclass(frozen=True)
class CreateMachine(Action):
    """Make a machine's root and record."""

    verb: ClassVar[str] = "create"


@dataclass(frozen=True)
class AdoptRoot(Action):
    """Keep the writes of a machine whose root record is gone: write the record
    again, over the spec's image, rather than make a new root."""

    verb: ClassVar[str] = "keep the root of"
    mode: RootfsMode = RootfsMode.OVERLAY


@dataclass(frozen=True)
class ReplaceRoot(Action):
    """Make a machine's root again from a different image (its writes are lost)."""

    verb: ClassVar[str] = "replace the root of"
    discards: int | None = 0  # bytes written in the root; None: a copy, not measured

    def describe(self) -> str:
        return super().describe() + _discarding(self.discards)


@dataclass(frozen=True)
class WriteFiles(Action):
    """Write a machine's rendered files."""

    verb: ClassVar[str] = "write files of"
    paths: tuple[str, ...] = ()


@dataclass(frozen=True)
class StartMachine(Action):
    """Start a machine."""

    verb: ClassVar[str] = "start"


@dataclass(frozen=True)
class RestartMachine(Action):
    """Stop and start a machine whose configuration changed."""

    verb: ClassVar[str] = "restart"


@dataclass(frozen=True)
class UpdateLimits(Action):
    """Change a running machine's resource limits in place, without a restart."""

    verb: ClassVar[str] = "change the limits of"


@dataclass(frozen=True)
class UpdatePorts(Action):
    """Publish a running machine's changed ports in place (its nft rules and
    IPv6 forwarders), without a restart."""

    verb: ClassVar[str] = "change the ports of"


@dataclass(frozen=True)
class StartForwarders(Action):
    """Start again the IPv6 port forwarders of a running machine that lost them."""

    verb: ClassVar[str] = "start the port forwarders of"


@dataclass(frozen=True)
class EnableMachine(Action):
    """Make a machine start at boot, or not (under systemd: enable or disable its unit)."""

    verb: ClassVar[str] = "set start at boot of"
    enabled: bool = True

    def describe(self) -> str:
        verb = "enable" if self.enabled else "disable"
        return f"{verb} {self.machine} at boot: {self.reason}"


@dataclass(frozen=True)
class StopMachine(Action):
    """Stop a machine."""

    verb: ClassVar[str] = "stop"


@dataclass(frozen=True)
class RemoveMachine(Action):
    """Stop a machine no spec declares and remove its root, files and record."""

    verb: ClassVar[str] = "remove"
    discards: int | None = 0  # as ReplaceRoot's

    def describe(self) -> str:
        return super().describe() + _discarding(self.discards)


def discarded(discards: int | None) -> str | None:
    """What a step that makes a machine's root again or removes it throws
    away, in words: None for nothing, else the bytes written in its overlay,
    or a whole copied root."""
    if discards == 0:
        return None
    if discards is None:
        return "its copied root and everything written in it"
    return f"{human_size(discards)} written in its root"


def _discarding(discards: int | None) -> str:
    what = discarded(discards)
    return f" (discards {what})" if what else ""


def discards_data(step: Step) -> bool:
    """Whether a step throws away what a machine wrote in its root, so that
    apply takes no silence for consent to it."""
    return isinstance(step, ReplaceRoot | RemoveMachine) and step.discards != 0


@dataclass(frozen=True)
class NetworkAction(Action):
    """A step on a network; ``machine`` holds the network's name."""

    @property
    def network(self) -> str:
        """The network's name."""
        return self.machine

    def describe(self) -> str:
        return f"{self.verb} network {self.machine}: {self.reason}"

    def as_json(self) -> dict[str, Any]:
        data = super().as_json()
        return {"action": data.pop("action"), "network": data.pop("machine"), **data}


@dataclass(frozen=True)
class CreateNetwork(NetworkAction):
    """Make a network's bridge, and record it."""

    verb: ClassVar[str] = "create"
    hidden: ClassVar[tuple[str, ...]] = ("spec", "config_hash")
    spec: Network | None = None
    bridge: str = ""
    config_hash: str = ""


@dataclass(frozen=True)
class ReplaceNetwork(CreateNetwork):
    """Make a network's bridge again with changed settings (machines on it restart)."""

    verb: ClassVar[str] = "replace"


@dataclass(frozen=True)
class RemoveNetwork(NetworkAction):
    """Remove a network no spec declares: its bridge, rules and record."""

    verb: ClassVar[str] = "remove"


@dataclass(frozen=True)
class VolumeAction(Action):
    """A step on a volume; ``machine`` holds the volume's name."""

    hidden: ClassVar[tuple[str, ...]] = ("spec",)
    spec: Volume | None = None

    def describe(self) -> str:
        return f"{self.verb} volume {self.machine}: {self.reason}"

    def as_json(self) -> dict[str, Any]:
        data = super().as_json()
        return {"action": data.pop("action"), "volume": data.pop("machine"), **data}


@dataclass(frozen=True)
class CreateVolume(VolumeAction):
    """Make a declared volume's directory and record. (No plan removes a
    volume: ``pymachine volume rm`` does.)"""

    verb: ClassVar[str] = "create"


@dataclass(frozen=True)
class ResizeVolume(VolumeAction):
    """Make a recorded volume's quota its declared ``size`` (or drop its limit)."""

    verb: ClassVar[str] = "resize"


Step = (
    CreateVolume
    | ResizeVolume
    | BuildImage
    | CreateMachine
    | AdoptRoot
    | ReplaceRoot
    | WriteFiles
    | StartMachine
    | RestartMachine
    | UpdateLimits
    | UpdatePorts
    | StartForwarders
    | EnableMachine
    | StopMachine
    | RemoveMachine
    | CreateNetwork
    | ReplaceNetwork
    | RemoveNetwork
)
"""Every concrete action: what a plan holds. A match over it that leaves one
out fails mypy (``assert_never``), so a new action cannot lack a handler."""


class Phase(StrEnum):
    """When apply carries out an action, in this order."""

    NETWORK_FIRST = "network first"  # bridges and volumes, before any machine is touched
    MAKING = "making"  # builds, roots and files, machines in parallel
    ENABLE = "enable"  # taken in with the written files, in one commit
    RUNNING = "running"  # starts and in-place changes, in dependency order
    BACKWARD = "backward"  # stops and removals, in parallel, dependents first
    NETWORK_LAST = "network last"  # bridges go after every machine is gone


def phase(step: Step) -> Phase:
    """The phase an action belongs to. Pure."""
    match step:
        case CreateNetwork() | ReplaceNetwork() | CreateVolume() | ResizeVolume():
            return Phase.NETWORK_FIRST
        case BuildImage() | CreateMachine() | AdoptRoot() | ReplaceRoot() | WriteFiles():
            return Phase.MAKING
        case EnableMachine():
            return Phase.ENABLE
        case StartMachine() | RestartMachine() | UpdateLimits() | UpdatePorts() | StartForwarders():
            return Phase.RUNNING
        case StopMachine() | RemoveMachine():
            return Phase.BACKWARD
        case RemoveNetwork():
            return Phase.NETWORK_LAST
        case _:
            assert_never(step)
