"""``df``, ``image ls``, ``image rm`` and ``prune``: the disk images,
machines' own layers and volumes use, and removing what nothing uses. Edge; ``totals``,
``resolve`` and ``refusal`` are pure."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pymachined import rootfs
from pymachined.core.layout import Layout
from pymachined.errors import PymachineError
from pymachined.execute import remove_machine
from pymachined.files import tree_usage
from pymachined.images import ImageRecord, ImageStore
from pymachined.state import StateStore
from pymachined.supervise.base import LIVE, Status, Supervisor
from pymachined.verbs import volumes
from pymachined.verbs.lifecycle import host_lock

Say = Callable[[str], None]


def images(layout: Layout, store: ImageStore) -> list[dict[str, Any]]:
    """Every built image: name, key, parent, size in bytes, when built, and
    the machines whose roots use it."""
    users = rootfs.users(layout)
    return [
        {
            "name": record.name,
            "key": record.key,
            "parent": record.parent,
            "size": tree_usage(record.tree),
            "built": record.built,
            "used_by": users.get(record.key, []),
        }
        for record in store.records()
    ]


@dataclass(frozen=True)
class Totals:
    """Bytes of images (all; those some machine uses), of machines' own
    layers and of volumes."""

    images: int
    shared: int
    own: int
    volumes: int = 0

    @property
    def reclaimable(self) -> int:
        """Bytes of images no machine uses (what image prune removes)."""
        return self.images - self.shared


def totals(rows: Sequence[Mapping[str, Any]]) -> Totals:
    """The totals of df's rows (sizes in bytes). Pure."""
    return Totals(
        images=sum(r["size"] for r in rows if r["type"] == "image"),
        shared=sum(r["size"] for r in rows if r["type"] == "image" and r["users"]),
        own=sum(r["size"] for r in rows if r["type"] == "machine"),
        volumes=sum(r["size"] or 0 for r in rows if r["type"] == "volume"),
    )


def usage(layout: Layout, store: ImageStore) -> list[dict[str, Any]]:
    """df's rows: each image with its size and number of users, then each
    machine's own layer (its upper directory, or its copied root), then each
    volume with the number of machines whose records name it."""
    users = rootfs.users(layout)
    rows: list[dict[str, Any]] = [
        {
            "type": "image",
            "name": record.name,
            "key": record.key,
            "size": tree_usage(record.tree),
            "users": len(users.get(record.key, [])),
        }
        for record in store.records()
    ]
    machines = Path(layout.machines_dir)
    for entry in sorted(machines.iterdir()) if machines.is_dir() else []:
        root = rootfs.read(layout, entry.name)
        if root is None:
            continue
        own = entry / ("rootfs" if root.mode.value == "copy" else "upper")
        rows.append(
            {
                "type": "machine",
                "name": entry.name,
                "key": root.layers[0],
                "size": tree_usage(own),
                "users": 1,
            }
        )
    rows += [
        {
            "type": "volume",
            "name": doc["name"],
            "key": None,
            "size": doc["size"],
            "users": len(doc["used_by"]),
        }
        for doc in volumes.listing(layout)
    ]
    return rows


def resolve(records: Sequence[ImageRecord], names: Sequence[str]) -> list[str]:
    """The keys of the images named (by name or key); an error for a name
    that matches none. Pure."""
    keys: list[str] = []
    for name in names:
        found = [r.key for r in records if name in (r.key, r.name)]
        if not found:
            raise PymachineError(f"no image {name!r} in the cache", hint="see pymachine image ls")
        keys += found
    return keys


def refusal(
    keys: Sequence[str], users: Mapping[str, list[str]], records: Sequence[ImageRecord]
) -> PymachineError | None:
    """Why the images of keys cannot go (a machine uses one, or one is the
    parent of an image that stays), or None. Pure."""
    children = {r.parent: r.key for r in records if r.parent}
    for key in keys:
        if users.get(key):
            return PymachineError(
                f"image {key} is used by {', '.join(users[key])}",
                hint="remove those machines first",
            )
        if key in children and children[key] not in keys:
            return PymachineError(
                f"image {key} is the parent of image {children[key]}",
                hint=f"remove {children[key]} too",
            )
    return None


def remove_images(
    layout: Layout, store: ImageStore, names: Sequence[str], say: Say, waiting: Say | None = None
) -> None:
    """Remove the named images, children before parents, if no machine uses
    them; say each one removed."""
    with host_lock(layout, None, waiting):  # an apply may be about to make a root from one
        records = store.records()
        keys = resolve(records, names)
        problem = refusal(keys, rootfs.users(layout), records)
        if problem is not None:
            raise problem
        for key in sorted(keys, key=lambda k: len(store.chain(k)), reverse=True):
            store.remove(key)
            say(f"removed {key}")


def stopped_undeclared(
    layout: Layout, statuses: Mapping[str, Status], declared: Mapping[str, object]
) -> list[str]:
    """The recorded machines no spec declares that do not run."""
    doomed = []
    for name in StateStore(layout).names():
        status = statuses.get(name)
        # A machine between two runs (restarting) is not a stopped one.
        running = status is not None and (status.pid is not None or status.state in LIVE)
        if name not in declared and not running:
            doomed.append(name)
    return doomed


@dataclass
class Prune:
    """What a prune removes: machines by name, and the images that none of
    the machines left uses."""

    machines: list[str] = field(default_factory=list)
    images: list[ImageRecord] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        """Nothing to remove."""
        return not self.machines and not self.images


def prune_plan(layout: Layout, store: ImageStore, machines: Sequence[str]) -> Prune:
    """The images no machine uses once the named machines are gone."""
    users = rootfs.users(layout)
    for name in machines:
        users = {k: [m for m in v if m != name] for k, v in users.items()}
    return Prune(list(machines), [r for r in store.records() if not users.get(r.key)])


def prune(
    layout: Layout,
    store: ImageStore,
    supervisor: Supervisor | None,
    plan: Prune,
    say: Say,
    waiting: Say | None = None,
) -> None:
    """Remove the plan's machines, then its images that still no machine uses
    (an apply may have made a root from one since the plan); say each step."""
    with host_lock(layout, None, waiting):  # an apply may be about to make a root from an image
        if plan.machines:
            if supervisor is None:
                raise ValueError("removing machines needs their supervisor")
            for name in plan.machines:
                remove_machine(layout, StateStore(layout), supervisor, name)
                say(f"removed machine {name}")
            supervisor.commit({}, reload=True)
        users = rootfs.users(layout)
        for record in sorted(plan.images, key=lambda r: len(store.chain(r.key)), reverse=True):
            if users.get(record.key):
                say(f"kept {record.key}: now used by {', '.join(users[record.key])}")
                continue
            store.remove(record.key)
            say(f"removed {record.key}")
