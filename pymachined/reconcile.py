"""The reconciler: load → observe → plan → execute, under the host-wide lock.

The CLI is the reconciler; no daemon is needed to apply. The supervisor is
systemd where it is PID 1 and pymachined elsewhere.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from pymachined import network, quota, rootfs
from pymachined.core.actions import RemoveMachine, ReplaceRoot, Step
from pymachined.core.desired import Desired, desire, desire_networks
from pymachined.core.layout import Layout
from pymachined.core.plan import Observed, ObservedVolume, plan, problems
from pymachined.core.render import RenderedFile, machine_files
from pymachined.core.spec import Machine, MachineState
from pymachined.core.validate import SpecSet, check_recorded_addresses, check_recorded_networks
from pymachined.errors import Diagnostic, PymachineError, SpecError
from pymachined.execute import Executor
from pymachined.images import ImageStore
from pymachined.observe import observe, observe_networks, observe_volumes
from pymachined.state import StateStore
from pymachined.supervise.base import Supervisor


def program() -> tuple[str, ...]:
    """How units run this pymachine: the interpreter it runs under."""
    return (sys.executable, "-m", "pymachined")


def choose_supervisor(layout: Layout, name: str) -> Supervisor:
    """systemd when it is PID 1 (or asked for), else pymachined. With --root
    elsewhere than /, auto picks pymachined: systemd would not see the files."""
    if name == "auto":
        systemd = Path("/run/systemd/system").is_dir() and layout.root == PurePosixPath("/")
        name = "systemd" if systemd else "builtin"
    if name == "systemd":
        if not Path("/run/systemd/system").is_dir():
            raise PymachineError(
                "systemd is not PID 1 on this host, so it cannot supervise machines",
                hint="use --supervisor builtin (pymachined), or auto",
            )
        if layout.root != PurePosixPath("/"):
            raise PymachineError(
                f"the systemd supervisor needs --root / (not {layout.root}): systemd "
                "reads units and .nspawn files only from the host's /etc",
                hint="use --supervisor builtin with --root",
            )
        from pymachined.supervise.systemd import SystemdSupervisor

        return SystemdSupervisor(layout)
    if name != "builtin":
        raise PymachineError(f"unknown supervisor {name!r}", hint="use auto, builtin or systemd")
    from pymachined.supervise.builtin import BuiltinSupervisor

    return BuiltinSupervisor(layout)


def check_host(spec_set: SpecSet) -> None:
    """Check what the specs name on this host, before anything changes: every bind
    source exists and is named by its real path, so a symlink cannot carry a
    bind to a place the spec does not say."""
    problems: list[Diagnostic] = []
    for name, machine in spec_set.machines.items():
        located = spec_set.sources.get(("machine", name))
        for index, bind in enumerate(machine.binds):
            real = os.path.realpath(bind.source)
            if not os.path.lexists(bind.source):
                message = f"bind source {bind.source} does not exist on this host"
                hint = "create it first, or fix the path"
            elif real != bind.source:
                message = (
                    f"bind source {bind.source} is a symlink, or passes through one, to {real}"
                )
                hint = f"name the real path ({real}) if that is what the machine should see"
            else:
                continue
            if located is not None:
                problems.append(located.document.diagnostic(("binds", index), message, hint))
    if problems:
        raise SpecError(problems)


def check_ports(layout: Layout, spec_set: SpecSet) -> None:
    """Check that no other process on this host holds a port the specs
    publish (a running machine's own forwarders aside), before anything
    changes: its DNAT would take that port's traffic away without a word."""
    problems: list[Diagnostic] = []
    for name, machine in spec_set.machines.items():
        if machine.state is not MachineState.RUNNING:
            continue
        located = spec_set.sources.get(("machine", name))
        for index, message in network.port_clashes(layout, machine):
            if located is not None:
                hint = "stop that process, or publish another host port"
                problems.append(located.document.diagnostic(("ports", index), message, hint))
    if problems:
        raise SpecError(problems)


QUOTA_HINT = (
    "keep the volumes on ext4 made with -O quota,project and mounted with prjquota, "
    "or on XFS mounted with pquota; or drop size"
)


def check_quotas(layout: Layout, spec_set: SpecSet) -> None:
    """Check that each volume with a size lives on a filesystem that enforces
    project quotas, before anything changes: a size that cannot hold is
    refused, as Docker and Podman refuse one without pquota."""
    problems: list[Diagnostic] = []
    for name, volume in sorted(spec_set.volumes.items()):
        located = spec_set.sources.get(("volume", name))
        if volume.size is None or located is None:
            continue
        trouble = quota.problem(Path(layout.volume_data(name)))
        if trouble is not None:
            message = f"volume {name} cannot be limited: {trouble}"
            problems.append(located.document.diagnostic(("size",), message, QUOTA_HINT))
    if problems:
        raise SpecError(problems)


def rendered_files(
    layout: Layout, spec_set: SpecSet, machine: Machine, template_dir: Path
) -> list[RenderedFile]:
    """The files a declared machine gets on this host, as an apply renders
    them (with the range it has, or the one an apply would choose)."""
    base = rootfs.ranges(layout, sorted(spec_set.machines))[machine.name]
    return machine_files(machine, layout, template_dir, program(), base)


@dataclass
class Reconciler:
    """One host's reconciliation."""

    layout: Layout
    images: ImageStore
    supervisor: Supervisor
    template_dir: Path

    @property
    def state(self) -> StateStore:
        """The host's state store."""
        return StateStore(self.layout)

    def desired(self, spec_set: SpecSet) -> dict[str, Desired]:
        """The desired state of the declared machines on this host."""
        return desire(
            spec_set,
            self.layout,
            self.template_dir,
            self.images.salts(),
            program(),
            rootfs.ranges(self.layout, sorted(spec_set.machines)),
        )

    def observed(self, desired: dict[str, Desired]) -> dict[str, Observed]:
        """The observed state of declared and recorded machines."""
        return observe(self.layout, self.state, desired, self.supervisor.status())

    def plan(
        self, spec_set: SpecSet, *, prune: bool
    ) -> tuple[dict[str, Desired], list[Step], list[str]]:
        """The desired state, the actions that reach it, and what keeps some
        machines out of the plan (records that cannot be read), one line each."""
        check_host(spec_set)
        check_ports(self.layout, spec_set)
        check_quotas(self.layout, spec_set)
        desired = self.desired(spec_set)
        clashes = check_recorded_addresses(spec_set, self.state.all().values())
        clashes += check_recorded_networks(spec_set, self.state.networks().values(), prune=prune)
        if clashes:
            raise SpecError(clashes)
        networks = desire_networks(spec_set, self.layout)
        built = {record.key for record in self.images.records()}
        observed = self.observed(desired)
        observed_networks = observe_networks(self.state, networks)
        actions = plan(
            desired,
            observed,
            built,
            prune=prune,
            networks=networks,
            observed_networks=observed_networks,
            volumes=spec_set.volumes,
            recorded_volumes=self._recorded_volumes(spec_set),
        )
        return (
            desired,
            [self._measured(step) for step in actions],
            problems(desired, observed, observed_networks),
        )

    def _recorded_volumes(self, spec_set: SpecSet) -> dict[str, ObservedVolume]:
        """The declared volumes that have a record, as found; one whose record
        cannot be read stops the plan (a volume is never made again over data)."""
        found, bad = self.state.scan_volumes()
        broken = [bad[name] for name in sorted(bad) if name in spec_set.volumes]
        if broken:
            raise broken[0]
        declared = {name: record for name, record in found.items() if name in spec_set.volumes}
        return observe_volumes(self.layout, declared)

    def _measured(self, step: Step) -> Step:
        """A step that throws a machine's root away, with what it discards
        (measured only for those: walking every root at each plan would cost
        what it does not need)."""
        if isinstance(step, ReplaceRoot | RemoveMachine):
            return replace(step, discards=rootfs.written(self.layout, step.machine))
        return step

    def undeclared(self, desired: dict[str, Desired]) -> list[str]:
        """Recorded machines that no spec declares (what --prune would remove)."""
        return sorted(set(self.state.all()) - set(desired))

    def execute(
        self,
        desired: dict[str, Desired],
        actions: Sequence[Step],
        say: Callable[[str], None],
    ) -> None:
        """Carry out actions."""
        executor = Executor(self.layout, self.images, self.state, self.supervisor, desired, say)
        executor.run(actions)
