"""Machine records: pymachine's inventory entry and owner marker for a machine. Pure.

A record is versioned JSON; one that cannot be read is an error with a repair
hint, never "nothing exists".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pymachined.errors import StateError

VERSION = 1
OWNER = "pymachine"
HISTORY = 20


@dataclass(frozen=True)
class MachineRecord:
    """What pymachine last did to a machine and what it was made from."""

    name: str
    config_hash: str
    layers: tuple[str, ...]
    files: dict[str, str] = field(default_factory=dict)
    address: str | None = None
    network: str | None = None
    run: dict[str, Any] | None = None
    spec: dict[str, Any] | None = None
    created: str = ""
    history: tuple[str, ...] = ()

    def with_event(self, event: str) -> MachineRecord:
        """The record with one more history line (the last HISTORY are kept)."""
        return replace(self, history=(*self.history, event)[-HISTORY:])

    def as_json(self) -> dict[str, Any]:
        """The record as stored."""
        return {
            "version": VERSION,
            "owner": OWNER,
            "name": self.name,
            "config_hash": self.config_hash,
            "layers": list(self.layers),
            "files": dict(sorted(self.files.items())),
            "address": self.address,
            "network": self.network,
            "run": self.run,
            "spec": self.spec,
            "created": self.created,
            "history": list(self.history),
        }


def _parse_owned(text: str, where: Path, hint: str) -> dict[str, Any]:
    """The JSON object of a record of this version that pymachine owns."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise StateError(f"state record {where} is not valid JSON: {exc}", hint=hint) from exc
    if not isinstance(data, dict):
        raise StateError(f"state record {where} is not a JSON object", hint=hint)
    version = data.get("version")
    if version != VERSION:
        raise StateError(
            f"state record {where} has version {version!r}; this pymachine reads version {VERSION}",
            hint="use the pymachine that wrote it, or " + hint,
        )
    if data.get("owner") != OWNER:
        raise StateError(f"state record {where} is not owned by pymachine", hint=hint)
    return data


def parse_record(text: str, where: Path) -> MachineRecord:
    """A machine's record from its JSON text. Pure."""
    hint = f"inspect {where}; if the machine is gone, remove the file, then apply again"
    data = _parse_owned(text, where, hint)
    try:
        return MachineRecord(
            name=str(data["name"]),
            config_hash=str(data["config_hash"]),
            layers=tuple(data["layers"]),
            files=dict(data.get("files", {})),
            address=data.get("address"),
            network=data.get("network"),
            run=data.get("run"),
            spec=data.get("spec"),
            created=str(data.get("created", "")),
            history=tuple(data.get("history", ())),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise StateError(f"state record {where} lacks {exc}", hint=hint) from exc


@dataclass(frozen=True)
class NetworkRecord:
    """A network pymachine made: its bridge and the spec it was made from."""

    name: str
    bridge: str
    config_hash: str
    spec: dict[str, Any]
    created: str = ""
    history: tuple[str, ...] = ()

    def with_event(self, event: str) -> NetworkRecord:
        """The record with one more history line (the last HISTORY are kept)."""
        return replace(self, history=(*self.history, event)[-HISTORY:])

    def as_json(self) -> dict[str, Any]:
        """The record as stored."""
        return {
            "version": VERSION,
            "owner": OWNER,
            "kind": "network",
            "name": self.name,
            "bridge": self.bridge,
            "config_hash": self.config_hash,
            "spec": self.spec,
            "created": self.created,
            "history": list(self.history),
        }


def parse_network_record(text: str, where: Path) -> NetworkRecord:
    """A network's record from its JSON text. Pure."""
    hint = f"inspect {where}; if the network is gone, remove the file, then apply again"
    data = _parse_owned(text, where, hint)
    try:
        return NetworkRecord(
            name=str(data["name"]),
            bridge=str(data["bridge"]),
            config_hash=str(data["config_hash"]),
            spec=dict(data["spec"]),
            created=str(data.get("created", "")),
            history=tuple(data.get("history", ())),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise StateError(f"state record {where} lacks {exc}", hint=hint) from exc
