"""The state store: one record per machine in ``<state>/machines/<name>/state.json``,
written atomically. Only a machine with a readable record that says
``owner: pymachine`` is ever pruned.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from pymachined import files
from pymachined.core.layout import Layout
from pymachined.core.records import (
    MachineRecord,
    NetworkRecord,
    VolumeRecord,
    parse_network_record,
    parse_record,
    parse_volume_record,
    stored,
)
from pymachined.errors import StateError

RECORD = "state.json"
VOLUME_RECORD = "volume.json"
R = TypeVar("R")


class StateStore:
    """Machine records under ``<state>/machines/<name>/state.json``."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    def path(self, name: str) -> Path:
        """Where a machine's record lives."""
        return Path(self.layout.machine_dir(name)) / RECORD

    def get(self, name: str) -> MachineRecord | None:
        """A machine's record, None if it has none; StateError if it is unreadable."""
        path = self.path(name)
        text = _read(path)
        return None if text is None else parse_record(text, path)

    def names(self) -> list[str]:
        """Machines that have a record (the inventory)."""
        machines = Path(self.layout.machines_dir)
        if not machines.is_dir():
            return []
        return sorted(p.parent.name for p in machines.glob(f"*/{RECORD}"))

    def all(self) -> dict[str, MachineRecord]:
        """Every readable record, by machine name (see ``unreadable``)."""
        return self.scan()[0]

    def unreadable(self) -> dict[str, StateError]:
        """The machines whose records cannot be read, and why."""
        return self.scan()[1]

    def scan(self) -> tuple[dict[str, MachineRecord], dict[str, StateError]]:
        """Every record by machine name, and apart the records that cannot be
        read: one bad record is its machine's problem, not every machine's."""
        return _scan(self.names(), self.get)

    def put(self, record: MachineRecord, *, durable: bool = True) -> None:
        """Write a record atomically (and durably, unless the caller syncs later)."""
        files.atomic_write_json(self.path(record.name), stored(record), durable=durable)

    def delete(self, name: str) -> None:
        """Forget a machine (its directory is removed separately)."""
        self.path(name).unlink(missing_ok=True)

    # -- networks ------------------------------------------------------------

    def network_path(self, name: str) -> Path:
        """Where a network's record lives."""
        return Path(self.layout.networks_dir) / f"{name}.json"

    def network(self, name: str) -> NetworkRecord | None:
        """A network's record, None if it has none; StateError if it is unreadable."""
        path = self.network_path(name)
        text = _read(path)
        return None if text is None else parse_network_record(text, path)

    def networks(self) -> dict[str, NetworkRecord]:
        """Every readable network record, by name."""
        return self.scan_networks()[0]

    def scan_networks(self) -> tuple[dict[str, NetworkRecord], dict[str, StateError]]:
        """Every network record by name, and apart those that cannot be read."""
        directory = Path(self.layout.networks_dir)
        names = [p.stem for p in sorted(directory.glob("*.json"))] if directory.is_dir() else []
        return _scan(names, self.network)

    def put_network(self, record: NetworkRecord) -> None:
        """Write a network's record atomically."""
        files.atomic_write_json(self.network_path(record.name), stored(record))

    def delete_network(self, name: str) -> None:
        """Forget a network (after its bridge is gone)."""
        self.network_path(name).unlink(missing_ok=True)

    # Volumes: volumes/NAME/volume.json, beside the volume's data.

    def volume_path(self, name: str) -> Path:
        """Where a volume's record is kept."""
        return Path(self.layout.volume_dir(name)) / VOLUME_RECORD

    def volume(self, name: str) -> VolumeRecord | None:
        """A volume's record, None if it has none; StateError if it is unreadable."""
        path = self.volume_path(name)
        text = _read(path)
        return None if text is None else parse_volume_record(text, path)

    def scan_volumes(self) -> tuple[dict[str, VolumeRecord], dict[str, StateError]]:
        """Every volume record by name, and apart those that cannot be read."""
        directory = Path(self.layout.volumes_dir)
        names = [p.name for p in sorted(directory.iterdir())] if directory.is_dir() else []
        return _scan(names, self.volume)

    def put_volume(self, record: VolumeRecord) -> None:
        """Write a volume's record atomically."""
        files.atomic_write_json(self.volume_path(record.name), stored(record))


def _scan(
    names: Iterable[str], read: Callable[[str], R | None]
) -> tuple[dict[str, R], dict[str, StateError]]:
    """The records read by name, and apart the names whose record cannot be
    read (a name with no record is left out)."""
    out: dict[str, R] = {}
    bad: dict[str, StateError] = {}
    for name in names:
        try:
            record = read(name)
        except StateError as exc:
            bad[name] = exc
            continue
        if record is not None:
            out[name] = record
    return out, bad


def _read(path: Path) -> str | None:
    """A record's text, None if there is none; StateError if it cannot be read."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StateError(
            f"state record {path} is not valid UTF-8 (at byte {exc.start})",
            hint=f"inspect {path}; if the machine is gone, remove the file, then apply again",
        ) from exc
