"""The reconciler: load → observe → plan → execute, under the host-wide lock.

The CLI is the reconciler; no daemon is needed to apply. The supervisor is
systemd where it is PID 1 and pymachined elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pymachined.actions import Action
from pymachined.desired import Desired, desire
from pymachined.errors import PymachineError
from pymachined.execute import Executor
from pymachined.images import ImageStore
from pymachined.layout import Layout
from pymachined.observe import observe
from pymachined.plan import Observed, plan
from pymachined.state import StateStore
from pymachined.supervise.base import Supervisor
from pymachined.validate import SpecSet


def choose_supervisor(layout: Layout, name: str) -> Supervisor:
    """systemd when it is PID 1 (or asked for), else pymachined."""
    if name == "auto":
        name = "systemd" if Path("/run/systemd/system").is_dir() else "builtin"
    if name == "systemd":
        raise PymachineError(
            "the systemd supervisor is not available in this version",
            hint="use --supervisor builtin (pymachined)",
        )
    from pymachined.supervise.builtin import BuiltinSupervisor

    return BuiltinSupervisor(layout)


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
        return desire(spec_set, self.layout, self.template_dir, self.images.salts())

    def observed(self, desired: dict[str, Desired]) -> dict[str, Observed]:
        """The observed state of declared and recorded machines."""
        return observe(self.layout, self.state, desired, self.supervisor.status())

    def plan(self, spec_set: SpecSet, *, prune: bool) -> tuple[dict[str, Desired], list[Action]]:
        """The desired state and the actions that reach it."""
        desired = self.desired(spec_set)
        built = {record.key for record in self.images.records()}
        return desired, plan(desired, self.observed(desired), built, prune=prune)

    def execute(
        self,
        desired: dict[str, Desired],
        actions: Sequence[Action],
        say: Callable[[str], None],
    ) -> None:
        """Carry out actions."""
        Executor(self.layout, self.images, self.state, self.supervisor, desired, say).run(actions)
