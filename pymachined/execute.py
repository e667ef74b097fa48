"""Executing a plan: each action changes the host and then the state store.

The order of writes makes every step safe to interrupt: a root is complete
before its record names it, a record is removed only after everything it
owned is gone, and files are written atomically. A new apply after a crash
observes what is there and plans the rest.

Networks come first and go last: bridges are made before any machine starts
and removed after every machine is gone. A machine on a declared network gets
its namespace, veth pair and address just before it starts, and loses them
just after it stops; the nft table is rewritten after each such change.

Each action's phase comes from ``actions.phase``, and ``Executor._one``
matches it to its handler; both matches are exhaustive over ``actions.Step``,
so mypy fails on an action type without a handler. What touches the network
and the roots goes through ``NetworkEdge`` and ``RootfsEdge`` (the
``network`` and ``rootfs`` modules, unless a test gives others).
"""

from __future__ import annotations

import contextlib
import ipaddress
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from graphlib import TopologicalSorter
from pathlib import Path
from typing import Protocol, assert_never

from pymachined import events, files, names, network, rootfs, volumes
from pymachined.core import netplan
from pymachined.core.actions import (
    AdoptRoot,
    BuildImage,
    CreateMachine,
    CreateNetwork,
    CreateVolume,
    EnableMachine,
    Phase,
    RemoveMachine,
    RemoveNetwork,
    ReplaceNetwork,
    ReplaceRoot,
    ResizeVolume,
    RestartMachine,
    StartForwarders,
    StartMachine,
    Step,
    StopMachine,
    UpdateLimits,
    UpdatePorts,
    WriteFiles,
    phase,
)
from pymachined.core.desired import Desired, file_hash
from pymachined.core.layout import Layout
from pymachined.core.names import RESOLV_CONF, resolv_conf_text
from pymachined.core.plan import starts_at_boot
from pymachined.core.records import MachineRecord, NetworkRecord
from pymachined.core.render import MARKER, all_binds
from pymachined.core.spec import Bind, Machine, Network, RootfsMode
from pymachined.errors import ApplyError, Failure, PymachineError, host_error
from pymachined.faults import crash_point
from pymachined.images import ImageRecord, ImageStore
from pymachined.state import StateStore
from pymachined.supervise.base import BindSource, RunSpec, Supervisor


def now() -> str:
    """The time now in UTC, to the second, as records keep it."""
    return datetime.now(UTC).isoformat(timespec="seconds")


class NetworkEdge(Protocol):
    """What the executor does to the host's networks (the ``network`` module)."""

    def create_bridge(self, layout: Layout, network: Network, /) -> str:
        """Make a network's bridge; its name."""
        ...

    def reconnect(self, layout: Layout, bridge: str, machines: list[str], /) -> None:
        """Put machines' veths on a bridge made again."""
        ...

    def remove_bridge(self, layout: Layout, record: NetworkRecord, /) -> None:
        """Remove a network's bridge."""
        ...

    def attach(
        self, layout: Layout, machine: str, network: Network, address: ipaddress.IPv4Address, /
    ) -> None:
        """Give a machine its namespace, veth pair and address."""
        ...

    def detach(self, layout: Layout, machine: str, /) -> None:
        """Take away a machine's namespace and veth pair."""
        ...

    def sync_rules(self, layout: Layout, state: StateStore, /) -> str:
        """Rewrite the nft table from the records."""
        ...

    def start_forwarders(
        self, layout: Layout, machine: Machine, address: ipaddress.IPv4Address, /
    ) -> list[int]:
        """Start a machine's IPv6 port forwarders."""
        ...

    def check_ports(self, layout: Layout, machine: Machine, /) -> None:
        """Refuse a machine's ports while another host process holds one."""
        ...


class RootfsEdge(Protocol):
    """What the executor does to machines' roots (the ``rootfs`` module)."""

    def read(self, layout: Layout, name: str, /) -> rootfs.Root | None:
        """A machine's root record, or None."""
        ...

    def create(
        self,
        layout: Layout,
        name: str,
        mode: RootfsMode,
        chain: list[ImageRecord],
        /,
        *,
        uid_base: int | None = None,
        durable: bool = True,
    ) -> rootfs.Root:
        """Make a machine's root from an image chain."""
        ...

    def adopt(
        self,
        layout: Layout,
        name: str,
        mode: RootfsMode,
        layers: tuple[str, ...],
        /,
        *,
        uid_base: int | None = None,
    ) -> rootfs.Root:
        """Write a root record for the writes a machine kept."""
        ...

    def claim_range(self, layout: Layout, root: rootfs.Root, uid_base: int, /) -> rootfs.Root:
        """The root, its record naming the range at uid_base."""
        ...

    def mount(self, layout: Layout, store: ImageStore, root: rootfs.Root, ids: int = 0, /) -> Path:
        """Assemble a machine's root, its layers shown in the range at ids; its path."""
        ...

    def mounted_ids(self, layout: Layout, name: str, /) -> int | None:
        """The range a machine's mounted overlay shows its layers in, or None."""
        ...

    def remove(self, layout: Layout, name: str, /) -> None:
        """Remove a machine's root."""
        ...


@dataclass
class Executor:
    """Carries out actions against one host."""

    layout: Layout
    images: ImageStore
    state: StateStore
    supervisor: Supervisor
    desired: Mapping[str, Desired]
    say: Callable[[str], None] = lambda text: None
    net: NetworkEdge = network
    roots: RootfsEdge = rootfs

    parallel: int = 8  # machines made at once: builds, roots and files
    # Machines started at once: a start mostly waits for its payload to run, so
    # a small pool would start them in waves, each as slow as its slowest.
    starting: int = 64
    _addresses: threading.Lock = field(default_factory=threading.Lock)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _failures: dict[str, Failure] = field(default_factory=dict)
    _builds: dict[str, PymachineError] = field(default_factory=dict)

    def run(self, actions: Sequence[Step]) -> None:
        """Every action, in phases. Each machine's builds, creation and files
        (machines in parallel, a bounded pool) once its dependencies are made;
        the supervisor takes in the written files at once (under systemd: one
        daemon-reload however many changed); then starts, restarts and
        resource updates, again in dependency order (in a larger pool: a start
        mostly waits for its payload). A supervisor that starts machines from
        their run specs, not from the files (pymachined), has each machine
        started as soon as it and its dependencies are made and started, while
        others are still being made. Stops and removals follow, in parallel
        too, each machine's after those of its dependents.

        A failed step fails its machine (or network) and what needs it; every
        other machine is still converged. The failures are raised together at
        the end, as an ApplyError, and the next apply plans only what is left."""
        if any(isinstance(a, StartMachine | RestartMachine) for a in actions):
            self.supervisor.prepare()
        self._failures = {}
        phases: dict[Phase, list[Step]] = {p: [] for p in Phase}
        for action in actions:
            phases[phase(action)].append(action)
        making = _by_machine(phases[Phase.MAKING])
        running = _by_machine(phases[Phase.RUNNING])
        try:
            for step in phases[Phase.NETWORK_FIRST]:
                self._guarded(step.machine, step)
            if self.supervisor.starts_from_files:
                made = self._run_forward([(making, self.parallel)])[0]
                self._commit(actions, phases[Phase.ENABLE], made)
                # Before any start: the boot apply's unit holds the machine units
                # back until now (under systemd), and a start would wait for them.
                self.supervisor.ready()
                self._run_forward([(running, self.starting)])
            else:
                self.supervisor.ready()
                stages = [(making, self.parallel), (running, self.starting)]
                self._commit(actions, phases[Phase.ENABLE], self._run_forward(stages)[0])
            self._run_backward(phases[Phase.BACKWARD])
            if any(isinstance(a, RemoveMachine) for a in phases[Phase.BACKWARD]):
                self.supervisor.commit({}, reload=True)
                if self.state.networks():
                    # Once every record is gone: a removal's own sync may have
                    # read another's record before its removal deleted it.
                    self.net.sync_rules(self.layout, self.state)
            for step in phases[Phase.NETWORK_LAST]:
                self._guarded(step.machine, step)
        finally:
            self._sync()
        if self._failures:
            raise ApplyError(list(self._failures.values()))

    def _commit(self, actions: Sequence[Step], enables: Sequence[Step], made: set[str]) -> None:
        """Have the supervisor take in the files written for the machines
        made, and the autostart changes."""
        written = {a.machine for a in actions if isinstance(a, WriteFiles) and a.machine in made}
        autostart = {n: starts_at_boot(self.desired[n]) for n in written}
        for action in enables:
            if isinstance(action, EnableMachine):
                self.say(action.describe())
                autostart[action.machine] = action.enabled
        if autostart:
            self.supervisor.commit(autostart, reload=bool(written))

    def _sync(self) -> None:
        """Make the records, roots and files this run wrote durable: one flush
        per filesystem, rather than two fsyncs for every write (each write is
        atomic on its own, so a killed apply leaves whole files either way)."""
        for directory in (
            self.layout.state_dir,
            self.layout.nspawn_dir,
            self.layout.unit_dir,
        ):
            if Path(directory).is_dir():
                files.sync_filesystem(Path(directory))

    def _one(self, action: Step) -> None:
        self.say(action.describe())
        match action:
            case BuildImage():
                self._ensure(self.desired[action.machine])
            case CreateMachine():
                self._create_machine(action)
            case AdoptRoot():
                self._adopt_root(action)
            case ReplaceRoot():
                self._replace_root(action)
            case WriteFiles():
                self._write_files(action)
            case StartMachine():
                self._start(self.desired[action.machine], "started")
            case RestartMachine():
                want = self.desired[action.machine]
                self._start(want, f"restarted ({action.reason})", restart=True)
            case UpdateLimits():
                self._update_limits(action)
            case UpdatePorts():
                self._update_ports(action)
            case StartForwarders():
                self._start_forwarders(action)
            case EnableMachine():
                raise AssertionError(f"{action.describe()}: the commit takes it in")
            case StopMachine():
                self._stop_machine(action)
            case RemoveMachine():
                remove_machine(
                    self.layout,
                    self.state,
                    self.supervisor,
                    action.machine,
                    net=self.net,
                    roots=self.roots,
                )
            case CreateNetwork() | ReplaceNetwork():
                self._create_network(action)
            case CreateVolume():
                assert action.spec is not None
                volumes.create(self.layout, self.state, action.spec, now())
            case ResizeVolume():
                assert action.spec is not None
                volumes.resize(self.layout, self.state, action.spec)
            case RemoveNetwork():
                self._remove_network(action)
            case _:
                assert_never(action)

    def _fail(self, name: str, step: str, error: PymachineError) -> None:
        with self._lock:
            self._failures.setdefault(name, Failure(name, step, error))
        self.say(f"failed: {name}: {error.message}")

    def _guarded(self, name: str, action: Step) -> bool:
        """Carry out one action of machine (or network) name; a failure is
        recorded against it, and False returned. A bug (any other exception)
        still stops the whole apply."""
        try:
            self._one(action)
        except PymachineError as error:
            self._fail(name, action.describe(), error)
            return False
        except OSError as error:
            self._fail(name, action.describe(), host_error(error))
            return False
        return True

    def _blocked(self, name: str) -> str | None:
        """What keeps machine name from converging now: a failed dependency or
        network, else None."""
        want = self.desired.get(name)
        if want is None:
            return None
        if want.network is not None and want.network.name in self._failures:
            return f"network {want.network.name}"
        failed = [d for d in want.machine.depends_on if d in self._failures]
        return f"machine {failed[0]}" if failed else None

    def _run_forward(
        self, stages: Sequence[tuple[Mapping[str, list[Step]], int]]
    ) -> list[set[str]]:
        """Each machine's steps, stage by stage: its steps of a stage once each
        of its dependencies is through that stage, with at most the stage's
        number of machines in it at once. The machines through each stage."""
        names = dict.fromkeys(name for work, _ in stages for name in work)  # in plan order
        order = list(
            TopologicalSorter({n: self._direct(n) & names.keys() for n in names}).static_order()
        )
        through: list[dict[str, Future[None]]] = [{n: Future() for n in order} for _ in stages]
        gates = [threading.BoundedSemaphore(slots) for _, slots in stages]
        passed: list[set[str]] = [set() for _ in stages]

        def machine_task(name: str) -> None:
            try:
                for index, (work, _) in enumerate(stages):
                    if not self._stage(name, work.get(name, []), through[index], gates[index]):
                        return
                    passed[index].add(name)
                    through[index][name].set_result(None)
            except BaseException as error:  # a bug: its dependents end with it
                for stage in through:
                    if not stage[name].done():
                        stage[name].set_exception(error)
                raise
            finally:
                for stage in through:
                    if not stage[name].done():
                        stage[name].set_result(None)

        # Submitted with dependencies first: a task only waits for tasks
        # submitted before it, so the pool cannot deadlock.
        with ThreadPoolExecutor(max_workers=max(slots for _, slots in stages)) as pool:
            futures = [pool.submit(machine_task, name) for name in order]
        _raise_first(futures)
        return passed

    def _stage(
        self,
        name: str,
        steps: list[Step],
        through: Mapping[str, Future[None]],
        gate: threading.BoundedSemaphore,
    ) -> bool:
        """One machine's steps of a stage, once its dependencies are through
        it; whether they all succeeded."""
        if not steps:
            return name not in self._failures
        for dependency in self._direct(name):
            if dependency in through:
                through[dependency].result()
        if name in self._failures:
            return False  # failed in an earlier phase
        blocker = self._blocked(name)
        if blocker is not None:
            error = PymachineError(f"not converged: it needs {blocker}, which failed")
            self._fail(name, steps[0].describe(), error)
            return False
        with gate:
            return all(self._guarded(name, step) for step in steps)

    def _direct(self, name: str) -> set[str]:
        """The machines a declared machine depends on directly."""
        want = self.desired.get(name)
        return set(want.machine.depends_on) if want else set()

    def _run_backward(self, steps: list[Step]) -> None:
        """Stops and removals, in the start phase's pool (they mostly wait for
        a machine to end), each machine's once those of the machines that
        depend on it, planned before it, are done, whether they failed or not."""
        work = _by_machine(steps)
        depends_on = {name: self._depends_on(name) for name in work}
        futures: dict[str, Future[None]] = {}

        def machine_task(name: str, steps: list[Step], needs: list[Future[None]]) -> None:
            for dependent in needs:
                dependent.result()
            for step in steps:
                if not self._guarded(name, step):
                    return

        with ThreadPoolExecutor(max_workers=self.starting) as pool:
            for name, steps in work.items():
                needs = [f for other, f in futures.items() if name in depends_on[other]]
                futures[name] = pool.submit(machine_task, name, steps, needs)
        _raise_first(futures.values())

    def _depends_on(self, name: str) -> set[str]:
        """What a machine depends on, directly or through others: as declared,
        or (pruned) as last recorded."""
        found: set[str] = set()
        pending = [name]
        while pending:
            current = pending.pop()
            want = self.desired.get(current)
            if want is not None:
                direct = want.machine.depends_on
            else:
                record = self.state.get(current)
                direct = record.spec.depends_on if record and record.spec else []
            pending += [d for d in direct if d not in found]
            found.update(direct)
        return found

    # -- helpers -------------------------------------------------------------

    def _record(self, name: str) -> MachineRecord:
        record = self.state.get(name)
        if record is None:
            raise PymachineError(f"machine {name} has no state record")
        return record

    def _event(self, record: MachineRecord, event: str) -> MachineRecord:
        updated = record.with_event(f"{now()} {event}")
        self.state.put(updated, durable=False)
        return updated

    def _claim_directory(self, name: str) -> None:
        """A machine directory may be reused only if pymachine made it."""
        base = Path(self.layout.machine_dir(name))
        if not base.exists():
            return
        ours = (
            any((base / mark).exists() for mark in (rootfs.OWNER, rootfs.RECORD))
            or self.state.path(name).exists()
        )
        if not ours and any(base.iterdir()):
            raise PymachineError(
                f"{base} exists and was not made by pymachine",
                hint="move it away or rename the machine; pymachine never deletes it",
            )

    def _ensure(self, want: Desired) -> list[ImageRecord]:
        """Build what is missing of a machine's layers (or wait for another
        machine's thread building them); a layer that failed once in this run
        is not built again for the next machine that needs it."""
        failed = next((self._builds[k] for k in want.layer_keys if k in self._builds), None)
        if failed is not None:
            raise failed
        try:
            return self.images.ensure(want.layers)
        except PymachineError as error:
            with self._lock:
                for key in want.layer_keys:
                    if self.images.get(key) is None:
                        self._builds.setdefault(key, error)
            raise

    def _make_root(self, want: Desired) -> None:
        # ensure, not chain: another machine's thread may still be building it.
        chain = self._ensure(want)
        root = self.roots.create(
            self.layout,
            want.name,
            want.machine.rootfs,
            chain,
            uid_base=want.uid_base,
            durable=False,
        )
        self.roots.mount(self.layout, self.images, root, rootfs.shown_ids(root, want.machine))

    # -- actions -------------------------------------------------------------

    def _create_machine(self, action: CreateMachine) -> None:
        want = self.desired[action.machine]
        self._claim_directory(want.name)
        self._make_root(want)
        crash_point("create")
        record = self.state.get(want.name) or MachineRecord(
            name=want.name, config_hash="", layers=want.layer_keys, created=now()
        )
        self._event(replace(record, layers=want.layer_keys), "created")
        events.record(self.layout, want.name, "create")

    def _adopt_root(self, action: AdoptRoot) -> None:
        want = self.desired[action.machine]
        self._claim_directory(want.name)
        self.images.ensure(want.layers)
        root = self.roots.adopt(
            self.layout, want.name, action.mode, want.layer_keys, uid_base=want.uid_base
        )
        self.roots.mount(self.layout, self.images, root, rootfs.shown_ids(root, want.machine))
        record = self.state.get(want.name) or MachineRecord(
            name=want.name, config_hash="", layers=want.layer_keys, created=now()
        )
        self._event(replace(record, layers=want.layer_keys), "root record made again, writes kept")

    def _replace_root(self, action: ReplaceRoot) -> None:
        want = self.desired[action.machine]
        self.supervisor.stop(want.name)
        self.roots.remove(self.layout, want.name)
        crash_point("replace")
        self._make_root(want)
        self._event(replace(self._record(want.name), layers=want.layer_keys), "root replaced")

    def _write_files(self, action: WriteFiles) -> None:
        want = self.desired[action.machine]
        record = self._record(want.name)
        hashes = dict(record.files)
        for rendered in want.files:
            if str(rendered.path) in action.paths:
                files.atomic_write(
                    Path(rendered.path), rendered.content, rendered.mode, durable=False
                )
            hashes[str(rendered.path)] = file_hash(rendered.content)
        crash_point("files")
        self._event(replace(record, files=hashes), f"files written ({action.reason})")

    def _attach(self, want: Desired) -> None:
        """Allocate the machine's address (kept in its record) and set up its
        network before it starts."""
        joined = want.network
        if joined is None:
            record = self._record(want.name)
            if record.network is not None:  # it left its network
                self.net.detach(self.layout, want.name)
                self.state.put(replace(record, address=None, network=None))
                self.net.sync_rules(self.layout, self.state)
            return
        with self._addresses:
            record = self._record(want.name)
            taken = _taken(self.state.all().values(), self.desired.values(), joined, want.name)
            previous = record.address if record.network == joined.name else None
            address = netplan.allocate(
                joined,
                taken,
                wanted=want.machine.address,
                previous=ipaddress.IPv4Address(previous) if previous else None,
            )
            # The spec goes in now too: the rules read the machine's ports from it.
            self.state.put(
                replace(record, address=str(address), network=joined.name, spec=want.machine)
            )
        # Again as it starts: a host listener may have come since the plan.
        self.net.check_ports(self.layout, want.machine)
        self.net.attach(self.layout, want.name, joined, address)
        self.net.start_forwarders(self.layout, want.machine, address)
        self.net.sync_rules(self.layout, self.state)

    def _detach(self, name: str) -> None:
        self.net.detach(self.layout, name)
        if self.state.networks():
            self.net.sync_rules(self.layout, self.state)

    def _start(self, want: Desired, event: str, *, restart: bool = False) -> None:
        root = self.roots.read(self.layout, want.name)
        if root is not None and want.uid_base is not None:
            # A root recorded before ranges were gets the one its files are
            # rendered with.
            root = self.roots.claim_range(self.layout, root, want.uid_base)
        if (
            restart
            and root is not None
            and self.roots.mounted_ids(self.layout, want.name)
            not in (None, rootfs.shown_ids(root, want.machine))
        ):
            # Its layers are shown in another range now: mounted again, once
            # the machine is down.
            self.supervisor.stop(want.name)
        ready_root(self.layout, self.images, want.name, want.machine, roots=self.roots)
        try:
            self._attach(want)
            if restart:
                self.supervisor.restart(want.run)
            else:
                self.supervisor.start(want.run)
        except Exception:
            if want.network is not None:  # no namespace, forwarder or rule outlives a failure
                self._detach(want.name)
            raise
        crash_point("start")
        record = replace(
            self._record(want.name),
            config_hash=want.config_hash,
            run=want.run,
            spec=want.machine,
        )
        self._event(record, event)

    def _update_limits(self, action: UpdateLimits) -> None:
        want = self.desired[action.machine]
        for problem in self.supervisor.set_limits(want.name, want.run.limits):
            self.say(f"warning: {want.name}: a limit is not applied: {problem}")
        record = replace(
            self._record(want.name),
            run=want.run,
            spec=want.machine,
        )
        self._event(record, f"limits changed ({action.reason})")

    def _update_ports(self, action: UpdatePorts) -> None:
        """Publish a running machine's new ports: its forwarders started
        again and the nft rules rewritten from its record, which takes the
        new spec once they are up (a failure leaves the record as it was, so
        the next plan tries again)."""
        record = self._record(action.machine)
        if record.address is None:
            raise PymachineError(f"machine {action.machine} has no address on record")
        want = self.desired[action.machine]
        self.net.check_ports(self.layout, want.machine)
        self.net.start_forwarders(self.layout, want.machine, ipaddress.IPv4Address(record.address))
        self._event(replace(record, spec=want.machine), f"ports changed ({action.reason})")
        self.net.sync_rules(self.layout, self.state)

    def _start_forwarders(self, action: StartForwarders) -> None:
        record = self._record(action.machine)
        if record.address is None:
            raise PymachineError(f"machine {action.machine} has no address on record")
        want = self.desired[action.machine]
        self.net.start_forwarders(self.layout, want.machine, ipaddress.IPv4Address(record.address))
        self._event(record, f"port forwarders started again ({action.reason})")
        self.net.sync_rules(self.layout, self.state)

    def _stop_machine(self, action: StopMachine) -> None:
        self.supervisor.stop(action.machine)
        self._detach(action.machine)
        self._event(self._record(action.machine), "stopped")

    def _create_network(self, action: CreateNetwork) -> None:
        assert action.spec is not None
        record = self.state.network(action.network)
        if record is not None and isinstance(action, ReplaceNetwork):
            self.net.remove_bridge(self.layout, record)
        bridge = self.net.create_bridge(self.layout, action.spec)
        members = [n for n, r in self.state.all().items() if r.network == action.network]
        self.net.reconnect(self.layout, bridge, members)
        if record is None:
            record = NetworkRecord(action.network, bridge, "", action.spec, created=now())
        record = replace(
            record,
            bridge=bridge,
            spec=action.spec,
            config_hash=action.config_hash,
        ).with_event(f"{now()} {action.verb}d ({action.reason})")
        self.state.put_network(record)
        self.net.sync_rules(self.layout, self.state)
        if self.net is network and (problem := names.resolver_problem(self.layout, record)):
            log = names.resolver_log(self.layout, action.network)
            self.say(f"warning: network {action.network}: {problem} (see {log})")

    def _remove_network(self, action: RemoveNetwork) -> None:
        # A stopped machine declared on another network now still names this
        # one in its record (a start would move it): it is no longer on it.
        for name, record in self.state.all().items():
            want = self.desired.get(name)
            if want is None or record.network != action.network:
                continue
            if want.network is None or want.network.name != action.network:
                self.state.put(replace(record, network=None, address=None))
        remove_network(self.layout, self.state, action.network, net=self.net)


def _by_machine(steps: Iterable[Step]) -> dict[str, list[Step]]:
    """Steps by machine, in plan order."""
    work: dict[str, list[Step]] = {}
    for step in steps:
        work.setdefault(step.machine, []).append(step)
    return work


def _raise_first(futures: Iterable[Future[None]]) -> None:
    """Raise the first exception of the tasks (a bug: failures are recorded)."""
    for future in futures:
        error = future.exception()
        if error is not None:
            raise error


def remove_machine(
    layout: Layout,
    state: StateStore,
    supervisor: Supervisor,
    name: str,
    *,
    net: NetworkEdge = network,
    roots: RootfsEdge = rootfs,
) -> None:
    """Stop a machine and remove its files, root and record, the record last, so
    an interrupted removal is finished by the next one."""
    record = state.get(name)
    if record is None:
        raise PymachineError(f"no machine {name!r} in pymachine's inventory")
    supervisor.forget(name)
    net.detach(layout, name)
    if state.networks():
        net.sync_rules(layout, state)
    for path in record.files:
        remove_owned_file(Path(path))
    crash_point("remove")
    roots.remove(layout, name)
    base = Path(layout.machine_dir(name))
    last = {state.path(name).name, rootfs.OWNER}
    for entry in sorted(base.iterdir()) if base.is_dir() else []:
        if entry.name not in last:
            files.remove_tree(entry)
    (base / rootfs.OWNER).unlink(missing_ok=True)
    state.delete(name)
    with contextlib.suppress(FileNotFoundError):
        base.rmdir()
    events.record(layout, name, "remove")


def ready_root(
    layout: Layout,
    images: ImageStore,
    name: str,
    machine: Machine | None,
    *,
    roots: RootfsEdge = rootfs,
) -> Path:
    """Mount a machine's root and put in it what a start of ``machine`` (its
    spec; None: only mount) needs: its ``files:`` (written at every start, so
    that a changed file, which restarts the machine, reaches the root, and an
    ephemeral root has them after a boot), its bind sources mounted at their
    staging paths (``files.stage_binds``) with its volumes (seeded from its
    image at their first use), and the mount points of its binds, volumes
    and tmpfs."""
    root = roots.read(layout, name)
    if root is None:
        raise PymachineError(f"machine {name} has no root", hint="run pymachine apply")
    ids = rootfs.shown_ids(root, machine)
    mounted = roots.mount(layout, images, root, ids)
    if machine is None:
        return mounted
    if root.mode is RootfsMode.COPY:
        if not machine.security.private_users:
            rootfs.reown(mounted, 0, 0)  # nspawn shifted it while it had a user namespace
    elif root.uid_base is not None or not machine.security.private_users:
        rootfs.reown(mounted, ids, roots.mounted_ids(layout, name) or 0)
    for file in machine.files:
        files.write_in_root(mounted, file.path, file.content, int(file.mode, 8), machine=name)
    resolv_conf = machine_resolv_conf(layout, machine)
    if resolv_conf is not None:
        files.write_in_root(mounted, RESOLV_CONF, resolv_conf, 0o644, machine=name)
    if machine.volumes:
        chain = images.chain(root.layers[0])
        for volume in machine.volumes:
            volumes.seed(layout, StateStore(layout), volume.name, volume.target, name, chain)
    binds = all_binds(machine, layout)
    if machine.security.private_users:
        _check_idmap(layout, name, [b for b in binds if b.idmap])
    sources = [BindSource(b.source, b.read_only) for b in binds]
    kinds = files.stage_binds(layout, name, sources)
    for bind, directory in zip(binds, kinds, strict=True):
        files.make_mount_point(mounted, bind.target, directory, machine=name)
    for tmpfs in machine.tmpfs:
        files.make_mount_point(mounted, tmpfs.path, directory=True, machine=name)
    return mounted


def _check_idmap(layout: Layout, name: str, binds: list[Bind]) -> None:
    """Refuse a start whose ID-mapped binds (its volumes among them) sit on a
    filesystem the kernel cannot mount ID-mapped: nspawn would fail on it
    with no word of why. A one-time chown of the data to the machine's range
    instead would tie it to that range, and no two machines of other ranges
    could share it."""
    for bind in binds:
        problem = files.idmap_problem_cached(Path(layout.run_dir) / "idmap", Path(bind.source))
        if problem is not None:
            what = "its volume data" if bind.source.startswith(str(layout.volumes_dir)) else "bind"
            raise PymachineError(
                f"machine {name}: {what} {bind.source} cannot be mounted ID-mapped on "
                f"its filesystem ({problem})",
                hint="keep it on a filesystem with ID-mapped mounts (ext4, xfs, btrfs, "
                "tmpfs since Linux 6.3), or run the machine with security.private_users: false",
            )


def machine_resolv_conf(layout: Layout, machine: Machine) -> str | None:
    """The /etc/resolv.conf a machine on a declared network gets: its network's
    resolver, on the gateway (from the network's record, which the network
    phase has written before any start). None for host and none (nspawn's own
    choice), a network not on record, or a machine whose ``files:`` give one."""
    if machine.network in ("host", "none") or any(f.path == RESOLV_CONF for f in machine.files):
        return None
    record = StateStore(layout).network(machine.network)
    if record is None:
        return None
    return resolv_conf_text(Network.model_validate(record.spec))


def attach_recorded(
    layout: Layout, state: StateStore, record: MachineRecord, *, forwarders: bool = True
) -> None:
    """Set up the network of a machine started by name, as it was last applied
    (its recorded network, address and ports), and its network's bridge if the
    host has lost it (as a reboot does). ``forwarders``: start its IPv6 port
    forwarders too (a systemd unit starts them itself, after the machine)."""
    if record.network is None or record.address is None:
        return
    made = state.network(record.network)
    if made is None:
        raise PymachineError(
            f"machine {record.name} joins network {record.network}, which is not on record",
            hint="run pymachine apply",
        )
    spec = made.spec
    if not network.link_exists(made.bridge):
        bridge = network.create_bridge(layout, spec)
        members = [n for n, r in state.all().items() if r.network == record.network]
        network.reconnect(layout, bridge, members)
    address = ipaddress.IPv4Address(record.address)
    if record.spec:  # again as it starts: a host listener may have come since the apply
        network.check_ports(layout, record.spec)
    network.attach(layout, record.name, spec, address)
    if forwarders and record.spec is not None:
        network.start_forwarders(layout, record.spec, address)
    network.sync_rules(layout, state)


def start_recorded_forwarders(layout: Layout, record: MachineRecord) -> None:
    """Start the IPv6 port forwarders of a machine as it was last applied (a
    unit's step after its machine), then sync the rules: the ``[::1]``
    redirect points a port at the machine once its relay holds it."""
    if record.address is not None and record.spec is not None:
        network.start_forwarders(layout, record.spec, ipaddress.IPv4Address(record.address))
        network.sync_rules(layout, StateStore(layout))


def detach_recorded(layout: Layout, state: StateStore, record: MachineRecord) -> None:
    """Tear down the network of a machine stopped by name."""
    if record.network is not None:
        network.detach(layout, record.name)
        network.sync_rules(layout, state)


def remove_network(
    layout: Layout, state: StateStore, name: str, *, net: NetworkEdge = network
) -> None:
    """Remove a network's bridge and rules, then its record. Machines still
    recorded on it are refused: remove them first."""
    record = state.network(name)
    if record is None:
        raise PymachineError(f"no network {name!r} in pymachine's inventory")
    users = sorted(n for n, r in state.all().items() if r.network == name and r.address)
    if users:
        raise PymachineError(
            f"network {name} still has machines: {', '.join(users)}",
            hint="remove them first (apply --prune removes undeclared machines)",
        )
    net.remove_bridge(layout, record)
    state.delete_network(name)
    net.sync_rules(layout, state)


def _taken(
    records: Iterable[MachineRecord],
    desired: Iterable[Desired],
    joined: Network,
    name: str,
) -> set[ipaddress.IPv4Address]:
    """Addresses on a network another machine holds or declares."""
    taken = {
        ipaddress.IPv4Address(r.address)
        for r in records
        if r.name != name and r.network == joined.name and r.address is not None
    }
    taken |= {
        d.machine.address
        for d in desired
        if d.name != name and d.machine.network == joined.name and d.machine.address is not None
    }
    return taken


def remove_owned_file(path: Path) -> None:
    """Remove a rendered file only if it still carries pymachine's owner marker."""
    try:
        with path.open() as handle:
            first = handle.readline()
    except FileNotFoundError:
        return
    if first.startswith(f"# {MARKER}"):
        path.unlink()


def resume_run_spec(record: MachineRecord) -> RunSpec:
    """The run spec a machine last started with, for start/restart by name."""
    if record.run is None:
        raise PymachineError(f"machine {record.name} was never started", hint="run pymachine apply")
    return record.run
