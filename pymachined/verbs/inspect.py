"""``ls``, ``inspect``, ``network ls`` and ``network inspect``: what the
records, the roots and the supervisor say of machines and networks, as plain
data. Edge; ``uptime`` is pure."""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass, field
from typing import Any

from pymachined import network, rootfs
from pymachined.core import netplan, wire
from pymachined.core.layout import Layout
from pymachined.errors import PymachineError, StateError
from pymachined.images import ImageStore
from pymachined.state import StateStore
from pymachined.supervise.base import Supervisor
from pymachined.verbs.lifecycle import known


def uptime(started: float | None, now: float) -> str | None:
    """How long since started (seconds since the epoch), in its largest whole
    unit: 3d, 2h, 5m, 40s. Pure."""
    if started is None:
        return None
    seconds = int(now - started)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@dataclass
class Listing:
    """Every machine as a row, and the records that cannot be read, by name."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    unreadable: dict[str, StateError] = field(default_factory=dict)


def machines(layout: Layout, images: ImageStore, supervisor: Supervisor) -> Listing:
    """Every recorded machine: name, state, image, address, uptime, restarts,
    exit code and pid, sorted by name."""
    statuses = supervisor.status()
    names = {r.key: r.name for r in images.records()}
    records, unreadable = StateStore(layout).scan()
    now = time.time()
    listing = Listing(unreadable=dict(unreadable))
    for name in unreadable:
        listing.rows.append(
            {
                "name": name,
                "state": "unreadable",
                "image": None,
                "address": None,
                "uptime": None,
                "restarts": 0,
                "exit_code": None,
                "pid": None,
            }
        )
    for name, record in records.items():
        status = statuses.get(name)
        state = status.state.value if status else ("created" if record.run is None else "exited")
        running = status is not None and status.pid is not None
        listing.rows.append(
            {
                "name": name,
                "state": state,
                "image": (record.spec.image if record.spec else None)
                or (names.get(record.layers[0], record.layers[0]) if record.layers else None),
                "address": record.address,
                "uptime": uptime(status.started, now) if running and status else None,
                "restarts": status.restarts if status else 0,
                "exit_code": status.exit_code if status else None,
                "pid": status.pid if status else None,
            }
        )
    listing.rows.sort(key=lambda row: str(row["name"]))
    return listing


def machine(layout: Layout, supervisor: Supervisor, name: str) -> dict[str, Any]:
    """One machine's document: the spec as applied, the command line it runs
    with, its state, root layers, address, volumes, files, history, limits
    and user namespace."""
    record = known(layout, name)
    status = supervisor.status().get(name)
    root = rootfs.read(layout, name)
    return {
        "name": name,
        "spec": wire.dump(record.spec) if record.spec else None,
        "state": wire.dump(status) if status else None,
        "run": supervisor.run_view(name, record.run, record.spec) if record.run else None,
        "root": {
            "mode": root.mode.value if root else None,
            "path": str(layout.rootfs(name)),
            "layers": list(root.layers) if root else [],
        },
        "network": record.network or (record.spec.network if record.spec else None),
        "address": record.address,
        "volumes": [
            {
                "name": v.name,
                "target": v.target,
                "read_only": v.read_only,
                "source": str(layout.volume_data(v.name)),
            }
            for v in (record.spec.volumes if record.spec else [])
        ],
        "files": sorted(record.files),
        "created": record.created,
        "history": list(record.history),
        "resources": wire.dump(record.spec.resources) if record.spec else None,
        "limits": wire.dump(record.run.limits) if record.run else None,
        "user_namespace": rootfs.user_namespace(layout, name),
    }


def networks(layout: Layout) -> list[dict[str, Any]]:
    """Every recorded network with its machines, as plain data."""
    store = StateStore(layout)
    recorded = store.all()
    out = []
    for name, record in store.networks().items():
        spec = record.spec
        members = [
            {
                "name": m.name,
                "address": m.address,
                "interface": netplan.veth_name(layout, m.name),
                "attached": network.netns_exists(layout, m.name),
            }
            for m in recorded.values()
            if m.network == name and m.address is not None
        ]
        out.append(
            {
                "name": name,
                "bridge": record.bridge,
                "bridge_up": network.link_exists(record.bridge),
                "subnet": str(spec.subnet),
                "subnet6": str(spec.subnet6) if spec.subnet6 else None,
                "gateway": str(spec.gateway or first_host(str(spec.subnet))),
                "nat": spec.nat,
                "machines": sorted(members, key=lambda m: str(m["name"])),
                "created": record.created,
                "history": list(record.history),
            }
        )
    return out


def first_host(subnet: str) -> str:
    """The first host address of a subnet (a network's default gateway). Pure."""
    return str(next(ipaddress.ip_network(subnet).hosts()))


def network_document(layout: Layout, name: str) -> dict[str, Any]:
    """One recorded network's document, or an error saying there is none."""
    for doc in networks(layout):
        if doc["name"] == name:
            return doc
    raise PymachineError(f"no network named {name!r}", hint="see pymachine network ls")
