"""The operator's verbs on one machine by name: start, stop, restart, destroy.

They take the steps apply's executor takes for the same change (ready the root,
attach the network, let the supervisor act; detach again if a start fails),
from the machine's record rather than a spec, and each holds the host lock, so
a verb never interleaves with an apply or another verb. Edge.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pymachined import files, rootfs
from pymachined.core.layout import Layout
from pymachined.core.records import MachineRecord
from pymachined.errors import PymachineError
from pymachined.execute import (
    attach_recorded,
    detach_recorded,
    ready_root,
    remove_machine,
    resume_run_spec,
)
from pymachined.images import ImageStore
from pymachined.state import StateStore
from pymachined.supervise.base import Status, Supervisor

LOCK = "apply.lock"


def host_lock(
    layout: Layout,
    timeout: float | None = None,
    waiting: Callable[[str], None] | None = None,
) -> contextlib.AbstractContextManager[None]:
    """The host-wide lock every change of machines takes (apply, and the verbs)."""
    return files.locked(Path(layout.run_dir) / LOCK, timeout=timeout, waiting=waiting)


def needed_by(records: dict[str, MachineRecord], name: str) -> list[str]:
    """The recorded machines that need name (``depends_on``), directly or
    through others, sorted. Pure."""
    needs = {n: set(r.spec.depends_on if r.spec else ()) for n, r in records.items() if n != name}
    found: set[str] = set()
    frontier = {name}
    while frontier:
        frontier = {n for n, deps in needs.items() if deps & frontier and n not in found}
        found |= frontier
    return sorted(found)


def known(layout: Layout, name: str) -> MachineRecord:
    """A machine's record, or an error saying there is no such machine."""
    record = StateStore(layout).get(name)
    if record is None:
        raise PymachineError(f"no machine named {name!r}", hint="see pymachine ls")
    return record


@dataclass
class Verbs:
    """The verbs against one host."""

    layout: Layout
    images: ImageStore
    supervisor: Supervisor
    waiting: Callable[[str], None] | None = None
    lock_timeout: float | None = None

    @property
    def state(self) -> StateStore:
        """The host's state store."""
        return StateStore(self.layout)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with host_lock(self.layout, self.lock_timeout, self.waiting):
            yield

    def record(self, name: str) -> MachineRecord:
        """A machine's record, or an error naming what exists."""
        return known(self.layout, name)

    def written(self, name: str) -> int | None:
        """The bytes a machine wrote in its root (``rootfs.written``)."""
        return rootfs.written(self.layout, name)

    def running_dependents(self, name: str) -> list[str]:
        """Running machines that need name."""
        statuses = self.supervisor.status()
        return [
            n
            for n in needed_by(self.state.all(), name)
            if (s := statuses.get(n)) is not None and s.pid is not None
        ]

    def start(self, name: str) -> bool:
        """Start a machine with the configuration it was last applied with;
        False if it was running already (it is left as it is)."""
        with self._locked():
            record = self.record(name)
            status = self.supervisor.status().get(name)
            if status is not None and status.pid is not None:
                return False
            ready_root(self.layout, self.images, name, record.spec)
            spec = resume_run_spec(record)
            try:
                attach_recorded(self.layout, self.state, record)
                self.supervisor.start(spec)
            except BaseException:
                # No namespace, forwarder or rule outlives a failed start.
                detach_recorded(self.layout, self.state, record)
                raise
            return True

    def restart(self, name: str) -> Status:
        """Restart a machine in place, as apply does: its network is kept (or
        made again if it is broken), and under systemd the machines that need
        it (Requires=) restart with it."""
        with self._locked():
            record = self.record(name)
            ready_root(self.layout, self.images, name, record.spec)
            spec = resume_run_spec(record)
            attach_recorded(self.layout, self.state, record)
            return self.supervisor.restart(spec)

    def stop(self, name: str) -> Status:
        """Stop a machine and take its network down."""
        with self._locked():
            record = self.record(name)
            status = self.supervisor.stop(name)
            detach_recorded(self.layout, self.state, record)
            return status

    def destroy(self, name: str) -> None:
        """Stop a machine and remove its root, files and record."""
        with self._locked():
            self.record(name)
            remove_machine(self.layout, self.state, self.supervisor, name)
            self.supervisor.commit({}, reload=True)  # systemd forgets the removed unit

    def pause(self, name: str, paused: bool) -> Status:
        """Freeze or thaw every process of a running machine."""
        with self._locked():
            self.record(name)
            return self.supervisor.pause(name, paused)


def prepare(layout: Layout, images: ImageStore, name: str) -> None:
    """What a machine's unit runs before systemd-nspawn: its root and network
    assembled where the host lacks them (after a boot, or a start by
    systemctl alone), and a stale registration with machined cleared."""
    from pymachined.supervise.systemd import clear_registration

    state = StateStore(layout)
    record = known(layout, name)
    ready_root(layout, images, name, record.spec)
    # Forwarders started here would not outlive this step: forward-ports.
    attach_recorded(layout, state, record, forwarders=False)
    clear_registration(name)
