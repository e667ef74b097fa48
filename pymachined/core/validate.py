"""Checks across declarations, and the validated set they make. Pure.

One file's declarations are validated by their models (load.py); what needs the
whole set is here: unique names, references that resolve, dependency cycles,
subnets, addresses and host ports that do not clash, binds that stay out of
pymachine's own state.
"""

from __future__ import annotations

import difflib
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from pymachined.core.load import Located, Path_, collect
from pymachined.core.records import MachineRecord, NetworkRecord
from pymachined.core.spec import Image, Machine, MachineState, Network, Volume
from pymachined.errors import Diagnostic, SpecError


@dataclass(frozen=True)
class SpecSet:
    """A validated, internally consistent set of declarations."""

    machines: dict[str, Machine] = field(default_factory=dict)
    networks: dict[str, Network] = field(default_factory=dict)
    images: dict[str, Image] = field(default_factory=dict)
    volumes: dict[str, Volume] = field(default_factory=dict)
    sources: dict[tuple[str, str], Located] = field(default_factory=dict)

    def where(self, kind: str, name: str) -> str:
        """``file:line`` where a declaration stands (the catalog for shipped images)."""
        located = self.sources.get((kind, name))
        return located.where if located else "<catalog>"


def _at(located: Located, path: Path_, message: str, hint: str | None = None) -> Diagnostic:
    return located.document.diagnostic(path, message, hint)


def _suggest(name: str, choices: Iterable[str]) -> str | None:
    close = difflib.get_close_matches(name, sorted(choices), n=1)
    return f"did you mean {close[0]!r}?" if close else None


def _cycle(graph: dict[str, list[str]]) -> list[str] | None:
    """A cycle in graph as [a, b, ..., a], or None. Iterative DFS, sorted for
    deterministic reports."""
    state: dict[str, int] = {}
    for root in sorted(graph):
        if state.get(root):
            continue
        stack: list[tuple[str, int]] = [(root, 0)]
        trail: list[str] = []
        while stack:
            node, index = stack.pop()
            if index == 0:
                state[node] = 1
                trail.append(node)
            children = [c for c in graph.get(node, []) if c in graph]
            if index < len(children):
                stack.append((node, index + 1))
                child = children[index]
                if state.get(child) == 1:
                    return [*trail[trail.index(child) :], child]
                if not state.get(child):
                    stack.append((child, 0))
            else:
                state[node] = 2
                trail.pop()
    return None


def _under(path: str, root: PurePosixPath) -> bool:
    candidate = PurePosixPath(path)
    return candidate == root or root in candidate.parents


def check(
    declarations: Sequence[Located],
    catalog: Sequence[Located] = (),
    state_dirs: Sequence[PurePosixPath] = (),
) -> tuple[SpecSet, list[Diagnostic]]:
    """The validated set, and every problem across declarations. User images shadow
    catalog images of the same name."""
    problems: list[Diagnostic] = []
    spec_set = SpecSet()
    for located in catalog:
        if isinstance(located.spec, Image):
            spec_set.images[located.spec.name] = located.spec
    for located in declarations:
        spec = located.spec
        key = (spec.kind, spec.name)
        first = spec_set.sources.get(key)
        if first is not None:
            problems.append(
                _at(
                    located,
                    ("name",),
                    f"{spec.kind} {spec.name!r} is declared twice; first at {first.where}",
                    "give each a unique name",
                )
            )
            continue
        spec_set.sources[key] = located
        if isinstance(spec, Machine):
            spec_set.machines[spec.name] = spec
        elif isinstance(spec, Network):
            spec_set.networks[spec.name] = spec
        elif isinstance(spec, Volume):
            spec_set.volumes[spec.name] = spec
        else:
            spec_set.images[spec.name] = spec

    problems += _check_images(spec_set)
    problems += _check_networks(spec_set)
    problems += _check_machines(spec_set, state_dirs)
    return spec_set, problems


def _check_images(spec_set: SpecSet) -> list[Diagnostic]:
    problems: list[Diagnostic] = []
    graph: dict[str, list[str]] = {}
    for name, image in spec_set.images.items():
        graph[name] = [image.from_] if image.from_ else []
        located = spec_set.sources.get(("image", name))
        if image.from_ and image.from_ not in spec_set.images and located:
            problems.append(
                _at(
                    located,
                    ("from",),
                    f"unknown image {image.from_!r}",
                    _suggest(image.from_, spec_set.images),
                )
            )
    cycle = _cycle(graph)
    if cycle is not None:
        located = spec_set.sources.get(("image", cycle[0]))
        if located:
            problems.append(
                _at(located, ("from",), "images build from each other: " + " -> ".join(cycle))
            )
    return problems


def _check_networks(spec_set: SpecSet) -> list[Diagnostic]:
    problems: list[Diagnostic] = []
    seen: list[Network] = []
    bridges: dict[str, str] = {}
    for network in spec_set.networks.values():
        located = spec_set.sources[("network", network.name)]
        for other in seen:
            if network.subnet.overlaps(other.subnet):
                problems.append(
                    _at(
                        located,
                        ("subnet",),
                        f"{network.subnet} overlaps {other.subnet} of network {other.name!r} "
                        f"({spec_set.where('network', other.name)})",
                    )
                )
            if network.subnet6 and other.subnet6 and network.subnet6.overlaps(other.subnet6):
                problems.append(
                    _at(
                        located,
                        ("subnet6",),
                        f"{network.subnet6} overlaps {other.subnet6} of network {other.name!r}",
                    )
                )
        seen.append(network)
        if network.bridge is not None:
            if network.bridge in bridges:
                problems.append(
                    _at(
                        located,
                        ("bridge",),
                        f"bridge {network.bridge!r} is also used by network "
                        f"{bridges[network.bridge]!r}",
                    )
                )
            bridges[network.bridge] = network.name
    return problems


def _check_machines(spec_set: SpecSet, state_dirs: Sequence[PurePosixPath]) -> list[Diagnostic]:
    problems: list[Diagnostic] = []
    addresses: dict[tuple[str, ipaddress.IPv4Address], str] = {}
    host_ports: dict[tuple[str, int, str], str] = {}
    graph: dict[str, list[str]] = {}
    for name, machine in spec_set.machines.items():
        located = spec_set.sources[("machine", name)]
        graph[name] = list(machine.depends_on)
        if machine.image not in spec_set.images:
            problems.append(
                _at(
                    located,
                    ("image",),
                    f"unknown image {machine.image!r}",
                    _suggest(machine.image, spec_set.images)
                    or "declare it with kind: image, or use one of: "
                    + ", ".join(sorted(spec_set.images)),
                )
            )
        for index, dependency in enumerate(machine.depends_on):
            needed = spec_set.machines.get(dependency)
            if needed is None:
                problems.append(
                    _at(
                        located,
                        ("depends_on", index),
                        f"unknown machine {dependency!r}",
                        _suggest(dependency, spec_set.machines),
                    )
                )
            elif machine.state is MachineState.RUNNING and needed.state is MachineState.STOPPED:
                # Under systemd, starting this would start the dependency too (Requires=).
                problems.append(
                    _at(
                        located,
                        ("depends_on", index),
                        f"depends on {dependency!r}, which is declared state: stopped",
                        f"set state: stopped here too, or run {dependency}",
                    )
                )
        network = spec_set.networks.get(machine.network)
        if machine.network not in ("host", "none") and network is None:
            problems.append(
                _at(
                    located,
                    ("network",),
                    f"unknown network {machine.network!r}",
                    _suggest(machine.network, spec_set.networks)
                    or "declare it with kind: network, or use host or none",
                )
            )
        if network is not None and machine.address is not None:
            problems += _check_address(spec_set, located, machine, network, addresses)
        for index, mount in enumerate(machine.volumes):
            # A typo must never make a new, empty volume.
            if mount.name not in spec_set.volumes:
                problems.append(
                    _at(
                        located,
                        ("volumes", index),
                        f"unknown volume {mount.name!r}",
                        _suggest(mount.name, spec_set.volumes) or "declare it with kind: volume",
                    )
                )
        for index, port in enumerate(machine.ports):
            bind = "*" if port.host_ip is None or port.host_ip.is_unspecified else str(port.host_ip)
            key = (bind, port.host, port.protocol.value)
            clash = [
                owner
                for (other_ip, other_port, other_proto), owner in host_ports.items()
                if (other_port, other_proto) == (port.host, port.protocol.value)
                and (other_ip == bind or "*" in (other_ip, bind))
            ]
            if clash:
                problems.append(
                    _at(
                        located,
                        ("ports", index),
                        f"host port {port.host}/{port.protocol.value} is already forwarded "
                        f"to machine {clash[0]!r}",
                    )
                )
            host_ports.setdefault(key, name)
        for index, bind_spec in enumerate(machine.binds):
            for root in state_dirs:
                if _under(bind_spec.source, root) or _under(bind_spec.target, root):
                    problems.append(
                        _at(
                            located,
                            ("binds", index),
                            f"binds must stay out of pymachine's own state directory {root}",
                        )
                    )
    cycle = _cycle(graph)
    if cycle is not None:
        located = spec_set.sources[("machine", cycle[0])]
        problems.append(_at(located, ("depends_on",), "dependency cycle: " + " -> ".join(cycle)))
    return problems


def _check_address(
    spec_set: SpecSet,
    located: Located,
    machine: Machine,
    network: Network,
    taken: dict[tuple[str, ipaddress.IPv4Address], str],
) -> list[Diagnostic]:
    address = machine.address
    assert address is not None
    if address not in network.subnet:
        return [
            _at(
                located,
                ("address",),
                f"{address} is outside {network.subnet} of network {network.name!r}",
            )
        ]
    if address in (network.subnet.network_address, network.subnet.broadcast_address):
        return [_at(located, ("address",), f"{address} is not a host address of {network.subnet}")]
    if address == network.gateway_address:
        return [_at(located, ("address",), f"{address} is the gateway of network {network.name!r}")]
    owner = taken.get((network.name, address))
    if owner is not None:
        return [
            _at(
                located,
                ("address",),
                f"{address} is already the address of machine {owner!r} "
                f"({spec_set.where('machine', owner)})",
            )
        ]
    taken[(network.name, address)] = machine.name
    return []


def check_recorded_addresses(
    spec_set: SpecSet, records: Iterable[MachineRecord]
) -> list[Diagnostic]:
    """Declared addresses that another machine holds on the same network, as
    pymachine allocated it one earlier (its record says so)."""
    holders = {
        (record.network, record.address): record.name
        for record in records
        if record.address is not None and record.network is not None
    }
    problems = []
    for name, machine in spec_set.machines.items():
        if machine.address is None:
            continue
        holder = holders.get((machine.network, str(machine.address)))
        if holder is not None and holder != name:
            other = spec_set.machines.get(holder)
            if other is not None and other.address == machine.address:
                continue  # both declare it: reported by check
            problems.append(
                _at(
                    spec_set.sources[("machine", name)],
                    ("address",),
                    f"{machine.address} is already the address of machine {holder!r} "
                    f"on network {machine.network!r}",
                    f"choose another address, or remove {holder} (pymachine destroy {holder})",
                )
            )
    return problems


def check_recorded_networks(
    spec_set: SpecSet, records: Iterable[NetworkRecord], *, prune: bool
) -> list[Diagnostic]:
    """Declared networks whose subnet or bridge a network no longer declared
    still holds on this host (it stays until an apply with --prune)."""
    if prune:
        return []  # removed in the same apply
    problems = []
    for record in records:
        if record.name in spec_set.networks:
            continue
        held = record.spec
        for name, network in spec_set.networks.items():
            if network.subnet.overlaps(held.subnet):
                field, clash = "subnet", f"{network.subnet} overlaps {held.subnet}"
            elif network.bridge is not None and network.bridge == record.bridge:
                field, clash = "bridge", f"bridge {record.bridge!r} is the bridge"
            else:
                continue
            problems.append(
                _at(
                    spec_set.sources[("network", name)],
                    (field,),
                    f"{clash} of network {record.name!r}, no longer declared but still "
                    "on this host",
                    f"apply with --prune to remove {record.name}, or choose another",
                )
            )
    return problems


def resolve(
    declarations: Sequence[Located],
    problems: Sequence[Diagnostic],
    catalog: Sequence[Located] = (),
    state_dirs: Sequence[PurePosixPath] = (),
) -> SpecSet:
    """The validated set; raises SpecError with every problem, per file and across files."""
    spec_set, more = check(declarations, catalog, state_dirs)
    everything = [*problems, *more]
    if everything:
        raise SpecError(everything)
    return spec_set


def load_set(
    paths: Sequence[Path], catalog_dir: Path, state_dirs: Sequence[PurePosixPath] = ()
) -> SpecSet:
    """Load the specs under paths and the image catalog, and validate them as one
    set; raises SpecError with every problem found."""
    declarations, problems = collect(paths)
    catalog, catalog_problems = collect([catalog_dir])
    return resolve(declarations, [*problems, *catalog_problems], catalog, state_dirs)
