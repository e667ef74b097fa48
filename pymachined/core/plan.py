"""Planning: desired state and observed state in, ordered actions out. Pure.

``plan`` decides what changed and what to do about it, and nothing else: it
reads no file, starts no process, and gives the same actions for the same
inputs. Networks are made before the machines that join them and removed
after; starts follow ``depends_on`` (dependencies first); stops and removals
go the other way.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from pymachined.core.actions import (
    Action,
    AdoptRoot,
    BuildImage,
    CreateMachine,
    CreateNetwork,
    CreateVolume,
    EnableMachine,
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
)
from pymachined.core.desired import Desired, DesiredNetwork, file_hash
from pymachined.core.limits import Limits, describe_change
from pymachined.core.records import MachineRecord, NetworkRecord, VolumeRecord
from pymachined.core.sizes import format_size, human_size
from pymachined.core.spec import MachineState, Port, RootfsMode, Volume
from pymachined.supervise.base import LIVE, RunSpec, Status


@dataclass(frozen=True)
class Kept:
    """A machine's writes found without a readable root record: how they are
    kept (an overlay's upper directory, or a copied root) and the bytes they hold."""

    mode: RootfsMode
    size: int


@dataclass(frozen=True)
class Observed:
    """What is on the host for one machine name."""

    name: str
    record: MachineRecord | None = None
    root: tuple[str, ...] | None = None  # the layers of its root, if it has one
    root_mode: RootfsMode | None = None  # how that root is made
    files: Mapping[str, str | None] = field(default_factory=dict)  # path -> hash on disk
    status: Status | None = None
    link: str | None = None  # what is wrong with a running machine's network link
    kept: Kept | None = None  # its writes, when it has no readable root record
    root_problem: str | None = None  # why its root record cannot be read
    problem: str | None = None  # why nothing can be done to it (a record that cannot be read)
    forwarders_gone: int = 0  # how many of its IPv6 port forwarders no longer run

    @property
    def running(self) -> bool:
        """Whether its supervisor runs it (or is about to restart it)."""
        return self.status is not None and self.status.state in LIVE


@dataclass(frozen=True)
class ObservedNetwork:
    """What is on the host for one network name."""

    name: str
    record: NetworkRecord | None = None
    bridge_up: bool = False  # its recorded bridge exists
    resolver: str | None = None  # what is wrong with its name resolver
    problem: str | None = None  # why its record cannot be read


def plan_networks(
    networks: Mapping[str, DesiredNetwork], observed: Mapping[str, ObservedNetwork]
) -> list[Step]:
    """The actions that make each declared network's bridge as declared."""
    actions: list[Step] = []
    for name in sorted(networks):
        want = networks[name]
        seen = observed.get(name, ObservedNetwork(name))
        if seen.problem is not None:
            continue  # reported by problems()
        if seen.record is None:
            actions.append(
                CreateNetwork(name, "new network", want.network, want.bridge, want.config_hash)
            )
        elif seen.record.config_hash != want.config_hash:
            actions.append(
                ReplaceNetwork(
                    name, "its settings changed", want.network, want.bridge, want.config_hash
                )
            )
        elif not seen.bridge_up:
            actions.append(
                CreateNetwork(
                    name,
                    f"its bridge {want.bridge} is missing",
                    want.network,
                    want.bridge,
                    want.config_hash,
                )
            )
        elif seen.resolver is not None:
            actions.append(
                CreateNetwork(name, seen.resolver, want.network, want.bridge, want.config_hash)
            )
    return actions


@dataclass(frozen=True)
class ObservedVolume:
    """What is on the host for one recorded volume."""

    record: VolumeRecord
    quota: str | None = None  # what is not as recorded about its project quota on disk


def _size_text(size: int | None) -> str:
    return "none" if size is None else format_size(size)


def plan_volumes(
    volumes: Mapping[str, Volume], recorded: Mapping[str, ObservedVolume]
) -> list[Step]:
    """The actions that make each declared volume that has no record yet, and
    give a recorded one the declared size (a quota on disk that is not as
    recorded is set again). Nothing else of a recorded volume changes."""
    actions: list[Step] = []
    for name in sorted(volumes):
        spec = volumes[name]
        seen = recorded.get(name)
        if seen is None:
            actions.append(CreateVolume(name, "new volume", spec=spec))
            continue
        had = seen.record.spec.size
        if had != spec.size:
            change = f"size: {_size_text(had)} -> {_size_text(spec.size)}"
            actions.append(ResizeVolume(name, change, spec=spec))
        elif seen.quota is not None:
            actions.append(ResizeVolume(name, seen.quota, spec=spec))
    return actions


def _adopt_reason(seen: Observed, kept: Kept) -> str:
    found = "is missing" if seen.root_problem is None else f"cannot be read ({seen.root_problem})"
    what = "writable layer" if kept.mode is RootfsMode.OVERLAY else "copied root"
    made = "made again" if seen.record is not None else "made"
    return (
        f"its root record {found}; its {what} ({human_size(kept.size)}) is kept "
        f"and the record {made} from the spec's image"
    )


def _blocked(
    want: Desired | None, seen: Observed, networks: Mapping[str, ObservedNetwork]
) -> str | None:
    """Why nothing can be planned for a machine, or None."""
    if seen.problem is not None:
        return seen.problem
    joined = want.machine.network if want is not None else None
    network = networks.get(joined) if joined is not None else None
    if network is not None and network.problem is not None:
        return f"its network {joined} cannot be used: {network.problem}"
    return None


def problems(
    desired: Mapping[str, Desired],
    observed: Mapping[str, Observed],
    observed_networks: Mapping[str, ObservedNetwork] | None = None,
) -> list[str]:
    """What keeps plan from acting on some machines and networks (each left as
    it is, the others planned as usual): one line each, naming the machine."""
    networks = observed_networks or {}
    out = [f"network {n}: {seen.problem}" for n, seen in sorted(networks.items()) if seen.problem]
    for name in sorted(observed):
        why = _blocked(desired.get(name), observed[name], networks)
        if why is not None:
            out.append(f"{name}: {why}; left as it is")
    return out


def start_order(desired: Mapping[str, Desired]) -> list[str]:
    """Machine names with every dependency before its dependents, ties by name."""
    return dependency_order({n: want.machine.depends_on for n, want in desired.items()})


def dependency_order(depends_on: Mapping[str, Sequence[str]]) -> list[str]:
    """The names of depends_on with every dependency (among them) before its
    dependents, ties by name."""
    done: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen or name not in depends_on:
            return
        seen.add(name)
        for dependency in sorted(depends_on[name]):
            visit(dependency)
        done.append(name)

    for name in sorted(depends_on):
        visit(name)
    return done


def _file_actions(want: Desired, seen: Observed) -> list[Step]:
    stale = []
    for rendered in want.files:
        path = str(rendered.path)
        current = seen.files.get(path)
        if current != file_hash(rendered.content):
            stale.append(path)
    if not stale:
        return []
    if seen.record is None:
        reason = "new machine"
    else:
        missing = [p for p in stale if seen.files.get(p) is None]
        reason = f"{missing[0]} is missing" if missing else f"{stale[0]} differs from the spec"
    return [WriteFiles(want.name, reason, tuple(stale))]


def starts_at_boot(want: Desired) -> bool:
    """Whether a machine should start when the host boots."""
    return want.machine.autostart and want.machine.state is MachineState.RUNNING


def _limits(run: RunSpec | None) -> Limits:
    return run.limits if run is not None else Limits()


def _address_change(want: Desired, record: MachineRecord) -> str | None:
    """How a machine's declared address differs from the one it has on the
    same network, or None: pinning the address it has already is no change."""
    declared = want.machine.address
    joined = want.network
    if declared is None or joined is None or record.network != joined.name:
        return None
    if record.address is None or record.address == str(declared):
        return None
    return f"address: {record.address} -> {declared}"


def _port_text(port: Port) -> str:
    if port.host_ip is None:
        where = ""
    elif port.host_ip.version == 6:
        where = f"[{port.host_ip}]:"
    else:
        where = f"{port.host_ip}:"
    return f"{where}{port.host}:{port.machine}/{port.protocol.value}"


def _ports_change(want: Desired, record: MachineRecord) -> str | None:
    """How a machine's declared ports differ from those it was last started
    (or updated) with, or None."""
    if record.spec is None or record.address is None:
        return None
    had = list(record.spec.ports)
    wanted = list(want.machine.ports)
    if had == wanted:
        return None
    added = [f"+{_port_text(p)}" for p in wanted if p not in had]
    removed = [f"-{_port_text(p)}" for p in had if p not in wanted]
    return "ports: " + (", ".join(added + removed) or "reordered")


def plan(
    desired: Mapping[str, Desired],
    observed: Mapping[str, Observed],
    built: Iterable[str],
    *,
    prune: bool = False,
    networks: Mapping[str, DesiredNetwork] | None = None,
    observed_networks: Mapping[str, ObservedNetwork] | None = None,
    volumes: Mapping[str, Volume] | None = None,
    recorded_volumes: Mapping[str, ObservedVolume] | None = None,
) -> list[Step]:
    """The actions that make observed into desired. ``built`` are the image keys
    already in the cache; ``prune`` removes recorded machines and networks no
    spec declares."""
    built = set(built)
    networks = networks or {}
    observed_networks = observed_networks or {}
    actions: list[Step] = plan_networks(networks, observed_networks)
    actions += plan_volumes(volumes or {}, recorded_volumes or {})
    stopping: list[Step] = []
    queued_builds: set[str] = set()
    # Machines stopped on the way (a root made again): their running dependents
    # stop with them under systemd (Requires=), so they are restarted after.
    bounced: set[str] = set()
    for name in start_order(desired):
        want = desired[name]
        seen = observed.get(name, Observed(name))
        if _blocked(want, seen, observed_networks) is not None:
            continue  # reported by problems()
        top = want.layers[-1]
        if top.key not in built and top.key not in queued_builds:
            missing = [layer for layer in want.layers if layer.key not in built]
            actions.append(
                BuildImage(name, f"{len(missing)} layer(s) not in the cache", top.label, top.key)
            )
            queued_builds.add(top.key)
        recreated = False
        if seen.root is None and seen.kept is not None:
            actions.append(AdoptRoot(name, _adopt_reason(seen, seen.kept), mode=seen.kept.mode))
        elif seen.record is None or seen.root is None:
            reason = "new machine" if seen.record is None else "its root is missing"
            actions.append(CreateMachine(name, reason))
            recreated = True
        elif seen.root != want.layer_keys:
            actions.append(ReplaceRoot(name, "its image changed"))
            recreated = True
        elif seen.root_mode is not None and seen.root_mode is not want.machine.rootfs:
            change = f"rootfs: {seen.root_mode.value} -> {want.machine.rootfs.value}"
            actions.append(ReplaceRoot(name, change))
            recreated = True
        actions += _file_actions(want, seen)
        wants_running = want.machine.state is MachineState.RUNNING
        stopped_with = next((d for d in want.machine.depends_on if d in bounced), None)
        if recreated or (stopped_with is not None and seen.running):
            bounced.add(name)
        if wants_running and not seen.running:
            actions.append(StartMachine(name, "not running"))
        elif wants_running and recreated:
            actions.append(RestartMachine(name, "its root was made again"))
        elif wants_running and stopped_with is not None:
            actions.append(
                RestartMachine(name, f"{stopped_with}, which it needs, is stopped on the way")
            )
        elif wants_running and seen.record and seen.record.config_hash != want.config_hash:
            actions.append(RestartMachine(name, "its configuration changed"))
        elif wants_running and seen.record and (moved := _address_change(want, seen.record)):
            actions.append(RestartMachine(name, moved))
        elif wants_running and seen.link is not None:
            # A running machine keeps the namespace it started in: made again,
            # its network needs a restart to be joined.
            actions.append(RestartMachine(name, seen.link))
        elif wants_running and seen.record and _limits(seen.record.run) != want.run.limits:
            change = describe_change(_limits(seen.record.run), want.run.limits)
            actions.append(UpdateLimits(name, change))
        elif not wants_running and seen.running:
            stopping.append(StopMachine(name, "state: stopped"))
        started = any(
            isinstance(a, StartMachine | RestartMachine) and a.machine == name for a in actions
        )
        ported = _ports_change(want, seen.record) if seen.record is not None else None
        if wants_running and seen.running and not started and ported is not None:
            actions.append(UpdatePorts(name, ported))
        if (
            wants_running
            and seen.running
            and seen.forwarders_gone
            and not started
            and ported is None
        ):
            lost = f"{seen.forwarders_gone} of its IPv6 port forwarders are gone"
            actions.append(StartForwarders(name, lost))
        at_boot = starts_at_boot(want)
        enabled = seen.status.enabled if seen.status is not None else None
        if (
            enabled is not None
            and enabled != at_boot
            and not any(isinstance(a, WriteFiles) and a.machine == name for a in actions)
        ):
            reason = "disabled outside pymachine" if at_boot else "enabled outside pymachine"
            actions.append(EnableMachine(name, reason, enabled=at_boot))
    # Stop dependents before what they depend on.
    actions += reversed(stopping)
    if prune:
        gone = {
            n: seen.record.spec.depends_on if seen.record.spec is not None else []
            for n, seen in observed.items()
            if n not in desired and seen.record is not None and seen.problem is None
        }
        # Dependents before what they depend on, as their stops.
        ordered = reversed(dependency_order(gone))
        actions += [RemoveMachine(n, "no spec declares it") for n in ordered]
        unused = sorted(
            n
            for n, seen in observed_networks.items()
            if n not in networks and seen.record is not None and seen.problem is None
        )
        actions += [RemoveNetwork(n, "no spec declares it") for n in unused]
    return actions


_STARTS = (CreateMachine, ReplaceRoot, StartMachine, RestartMachine)


def warnings(desired: Mapping[str, Desired], actions: Iterable[Action]) -> list[str]:
    """What a plan should tell the operator about the machines it starts: every
    opt-out of the default confinement, so that none goes unnoticed."""
    out = []
    starting = sorted({a.machine for a in actions if isinstance(a, _STARTS)})
    for name in starting:
        machine = desired[name].machine
        if not machine.security.private_users:
            out.append(
                f"{name} runs without a user namespace (security.private_users: false): "
                "root in the machine is root on the host"
            )
        if "all" in machine.security.capabilities.add:
            out.append(f"{name} keeps every capability (security.capabilities.add: [all])")
    return out
