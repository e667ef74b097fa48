"""The library behind ``pymachine volume``: list, inspect, remove, export
and import volumes.

A volume is used by every machine whose record names it (what was last
applied, running or not); it cannot be removed while one does.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from pymachined import volumes
from pymachined.core.layout import Layout
from pymachined.errors import PymachineError
from pymachined.execute import now
from pymachined.state import StateStore


def users(state: StateStore, name: str) -> list[str]:
    """The machines whose record names the volume."""
    return sorted(
        machine
        for machine, record in state.all().items()
        if record.spec is not None and any(v.name == name for v in record.spec.volumes)
    )


def listing(layout: Layout) -> list[dict[str, Any]]:
    """Every recorded volume, as plain data: its spec, size, limit, users and seed."""
    state = StateStore(layout)
    found, bad = state.scan_volumes()
    out = []
    for name, record in found.items():
        spec = record.spec
        out.append(
            {
                "name": name,
                "labels": dict(spec.labels),
                "owner": spec.owner or "0:0",
                "size": volumes.size(layout, name),
                "limit": spec.size,  # its quota (bytes), None without one
                "used_by": users(state, name),
                "created": record.created,
                "seeded": record.seeded or None,
                "path": str(layout.volume_data(name)),
            }
        )
    for name, error in bad.items():
        out.append({"name": name, "size": None, "used_by": [], "problem": error.message})
    return out


def document(layout: Layout, name: str) -> dict[str, Any]:
    """One recorded volume's document, or an error saying there is none."""
    for doc in listing(layout):
        if doc["name"] == name:
            if "problem" in doc:
                raise PymachineError(doc["problem"], hint="pymachine never removes it")
            return doc
    raise PymachineError(f"no volume named {name!r}", hint="see pymachine volume ls")


def prunable(layout: Layout, declared: Collection[str]) -> list[str]:
    """The recorded volumes no spec declares and no machine's record names:
    what ``volume prune`` removes (decided from the records; nothing else)."""
    state = StateStore(layout)
    found, _ = state.scan_volumes()
    named = {
        v.name
        for record in state.all().values()
        if record.spec is not None
        for v in record.spec.volumes
    }
    return sorted(set(found) - set(declared) - named)


def remove(layout: Layout, name: str) -> None:
    """Remove a volume and its data; refused while a machine's record names it."""
    state = StateStore(layout)
    if state.volume(name) is None:
        raise PymachineError(f"no volume named {name!r}", hint="see pymachine volume ls")
    using = users(state, name)
    if using:
        raise PymachineError(
            f"volume {name} is used by {', '.join(using)}",
            hint="remove it from their specs and apply, or destroy them, first",
        )
    volumes.remove(layout, name)


def _known(state: StateStore, name: str) -> None:
    if state.volume(name) is None:
        raise PymachineError(f"no volume named {name!r}", hint="see pymachine volume ls")


def export(layout: Layout, name: str, file: str) -> None:
    """Write a volume's data as a tar to file ("-": stdout). A machine using
    it may write meanwhile; stop it first for a copy of one moment."""
    _known(StateStore(layout), name)
    volumes.export(layout, name, file)


def import_archive(layout: Layout, name: str, file: str, running: Collection[str]) -> None:
    """Fill an empty volume (made if it has no record) from a tar file
    ("-": stdin); refused while a machine in running uses it."""
    state = StateStore(layout)
    busy = sorted(set(users(state, name)) & set(running))
    if busy:
        raise PymachineError(
            f"volume {name} is used by running machines: {', '.join(busy)}",
            hint=f"stop them first (pymachine stop {busy[0]})",
        )
    volumes.import_archive(layout, state, name, file, now())
