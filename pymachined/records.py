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
            "run": self.run,
            "spec": self.spec,
            "created": self.created,
            "history": list(self.history),
        }


def parse_record(text: str, where: Path) -> MachineRecord:
    """A record from its JSON text. Pure."""
    hint = f"inspect {where}; if the machine is gone, remove the file, then apply again"
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
    try:
        return MachineRecord(
            name=str(data["name"]),
            config_hash=str(data["config_hash"]),
            layers=tuple(data["layers"]),
            files=dict(data.get("files", {})),
            address=data.get("address"),
            run=data.get("run"),
            spec=data.get("spec"),
            created=str(data.get("created", "")),
            history=tuple(data.get("history", ())),
        )
    except (KeyError, TypeError) as exc:
        raise StateError(f"state record {where} lacks {exc}", hint=hint) from exc
