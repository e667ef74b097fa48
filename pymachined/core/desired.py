"""Desired state: what each declared machine should be on this host. Pure.

Everything that, when it changes, needs the machine restarted goes into its
configuration hash: the command line it runs with, its restart policy and
stop timeout, its image layers, the files written into its root, its binds,
and its network (the network's own settings). A declared address that is not
the one the machine has restarts it too (``plan``); its ports are changed in
place.
Labels, ``state``, ``autostart`` and ``depends_on`` do not, nor do resource
limits, which are changed on the running machine.

A declared network's desired state is its spec, its bridge's name and a hash
of both: when the hash changes, the bridge is made again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pymachined.core.layout import Layout
from pymachined.core.limits import Limits
from pymachined.core.netplan import bridge_name
from pymachined.core.recipes import Layer, Salts, machine_layers
from pymachined.core.render import (
    PROGRAM,
    RenderedFile,
    all_binds,
    machine_files,
    nspawn_run_argv,
)
from pymachined.core.spec import Machine, Network
from pymachined.core.validate import SpecSet
from pymachined.supervise.base import BindSource, RunSpec


@dataclass(frozen=True)
class Desired:
    """One declared machine, resolved for this host."""

    machine: Machine
    layers: tuple[Layer, ...]
    files: tuple[RenderedFile, ...]
    run: RunSpec
    config_hash: str
    network: Network | None = None  # the declared network it joins, if any
    uid_base: int | None = None  # its user-namespace range (None: nspawn picks)

    @property
    def name(self) -> str:
        """The machine's name."""
        return self.machine.name

    @property
    def layer_keys(self) -> tuple[str, ...]:
        """The image layers, topmost first (as a root records them)."""
        return tuple(layer.key for layer in reversed(self.layers))


@dataclass(frozen=True)
class DesiredNetwork:
    """One declared network, resolved for this host."""

    network: Network
    bridge: str
    config_hash: str

    @property
    def name(self) -> str:
        """The network's name."""
        return self.network.name


def _digest(data: object) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def desire_networks(spec_set: SpecSet, layout: Layout) -> dict[str, DesiredNetwork]:
    """The desired state of every declared network, by name."""
    out = {}
    for name, network in spec_set.networks.items():
        bridge = bridge_name(layout, network)
        config = {"spec": network.model_dump(mode="json"), "bridge": bridge}
        out[name] = DesiredNetwork(network, bridge, _digest(config))
    return out


def file_hash(content: str | bytes) -> str:
    """The hash pymachine records for a file it writes."""
    raw = content.encode() if isinstance(content, str) else content
    return hashlib.sha256(raw).hexdigest()


def console_log(layout: Layout, name: str) -> Path:
    """Where a machine's output goes under pymachined."""
    return Path(layout.machine_dir(name)) / "console.log"


def desire(
    spec_set: SpecSet,
    layout: Layout,
    template_dir: Path,
    salts: Salts,
    program: Sequence[str] = PROGRAM,
    bases: Mapping[str, int] | None = None,
) -> dict[str, Desired]:
    """The desired state of every declared machine, by name. ``program`` is how
    units run pymachine; ``bases`` the user-namespace range of each machine
    (``rootfs.ranges``: kept in its root record, or chosen anew)."""
    out = {}
    networks = desire_networks(spec_set, layout)
    for name, machine in spec_set.machines.items():
        joined = networks.get(machine.network)
        layers = tuple(machine_layers(spec_set, machine, salts))
        binds = all_binds(machine, layout)
        uid_base = (bases or {}).get(name)
        run = RunSpec(
            name=name,
            argv=tuple(nspawn_run_argv(machine, layout, uid_base)),
            restart=machine.restart.value,
            log=str(console_log(layout, name)),
            stop_timeout=machine.stop_timeout,
            limits=Limits(**machine.resources.model_dump()),
            binds=tuple(BindSource(b.source, b.read_only) for b in binds),
            log_max=machine.log.max_size,
        )
        config = {
            "argv": list(run.argv),
            "restart": run.restart,
            "stop_timeout": run.stop_timeout,
            "layers": [layer.key for layer in layers],
            "rootfs": machine.rootfs.value,
            "files": [f.model_dump(mode="json") for f in machine.files],
            # The command line names binds by their staging paths only.
            # (idmap only when set: binds from before it keep their hash)
            "binds": [
                b.model_dump(mode="json", exclude_defaults=True) | {"read_only": b.read_only}
                for b in binds
            ],
        }
        if joined is not None:
            # Not its address nor its ports: plan restarts a machine whose
            # address is declared anew (one it has already is no change), and
            # changes its ports in place.
            config["network"] = {"network": joined.config_hash}
        digest = _digest(config)
        out[name] = Desired(
            machine=machine,
            layers=layers,
            files=tuple(machine_files(machine, layout, template_dir, program, uid_base)),
            run=run,
            config_hash=digest,
            network=joined.network if joined else None,
            uid_base=uid_base,
        )
    return out
