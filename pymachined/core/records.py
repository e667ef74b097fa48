"""Machine records: pymachine's inventory entry and owner marker for a machine. Pure.

A record is versioned JSON; one that cannot be read is an error with a repair
hint, never "nothing exists".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from pymachined.core import wire
from pymachined.core.spec import Machine, Network, Volume
from pymachined.errors import StateError
from pymachined.supervise.base import RunSpec

VERSION = 1
OWNER = "pymachine"
HISTORY = 20
T = TypeVar("T")


@dataclass(frozen=True)
class MachineRecord:
    """What pymachine last did to a machine and what it was made from: the spec
    and the run spec it was last started with."""

    name: str
    config_hash: str
    layers: tuple[str, ...]
    files: dict[str, str] = field(default_factory=dict)
    address: str | None = None
    network: str | None = None
    run: RunSpec | None = None
    spec: Machine | None = None
    created: str = ""
    history: tuple[str, ...] = ()

    def with_event(self, event: str) -> MachineRecord:
        """The record with one more history line (the last HISTORY are kept)."""
        return replace(self, history=(*self.history, event)[-HISTORY:])


@dataclass(frozen=True)
class NetworkRecord:
    """A network pymachine made: its bridge and the spec it was made from."""

    name: str
    bridge: str
    config_hash: str
    spec: Network
    created: str = ""
    history: tuple[str, ...] = ()

    def with_event(self, event: str) -> NetworkRecord:
        """The record with one more history line (the last HISTORY are kept)."""
        return replace(self, history=(*self.history, event)[-HISTORY:])


@dataclass(frozen=True)
class VolumeRecord:
    """A volume pymachine made: the spec it was made from (its ``size`` as
    last applied), when, what was first copied into it (``seeded``:
    "MACHINE:/path" of the image content it took at its first use, "" while
    it has taken none) and the project id its data carries for a quota (0:
    none; records written before quotas read as 0)."""

    name: str
    spec: Volume
    created: str = ""
    seeded: str = ""
    project: int = 0


def stored(record: MachineRecord | NetworkRecord | VolumeRecord) -> dict[str, Any]:
    """A record as it is kept: versioned, owner-marked JSON. Pure."""
    head: dict[str, Any] = {"version": VERSION, "owner": OWNER}
    if isinstance(record, NetworkRecord):
        head["kind"] = "network"
    elif isinstance(record, VolumeRecord):
        head["kind"] = "volume"
    return {**head, **wire.dump(record)}


def _parse_owned(text: str, where: Path, hint: str) -> dict[str, Any]:
    """The fields of a record of this version that pymachine owns."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise StateError(f"state record {where} is not valid JSON: {exc}", hint=hint) from exc
    if not isinstance(data, dict):
        raise StateError(f"state record {where} is not a JSON object", hint=hint)
    version = data.pop("version", None)
    if version != VERSION:
        raise StateError(
            f"state record {where} has version {version!r}; this pymachine reads version {VERSION}",
            hint="use the pymachine that wrote it, or " + hint,
        )
    if data.pop("owner", None) != OWNER:
        raise StateError(f"state record {where} is not owned by pymachine", hint=hint)
    data.pop("kind", None)
    return data


def _parse_as(kind: type[T], text: str, where: Path, hint: str) -> T:
    data = _parse_owned(text, where, hint)
    try:
        return wire.load(kind, data)
    except ValueError as exc:
        raise StateError(f"state record {where} is broken: {exc}", hint=hint) from exc


def parse_record(text: str, where: Path) -> MachineRecord:
    """A machine's record from its JSON text. Pure."""
    hint = f"inspect {where}; if the machine is gone, remove the file, then apply again"
    return _parse_as(MachineRecord, text, where, hint)


def parse_network_record(text: str, where: Path) -> NetworkRecord:
    """A network's record from its JSON text. Pure."""
    hint = f"inspect {where}; if the network is gone, remove the file, then apply again"
    return _parse_as(NetworkRecord, text, where, hint)


def parse_volume_record(text: str, where: Path) -> VolumeRecord:
    """A volume's record from its JSON text. Pure."""
    hint = f"inspect {where}; pymachine never removes a volume it cannot read"
    return _parse_as(VolumeRecord, text, where, hint)
