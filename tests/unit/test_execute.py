"""The executor's middle, without root: the order of its phases and what a
failure does to the rest. The supervisor, the image builds, the network and
the roots are fakes that record what they are asked; records, rendered files
and events are real, under tmp_path."""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import Any, get_args

import pytest

from pymachined.core import wire
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
from pymachined.core.desired import Desired, desire, desire_networks, file_hash
from pymachined.core.layout import Layout
from pymachined.core.limits import Limits
from pymachined.core.plan import plan
from pymachined.core.recipes import Layer, Salts
from pymachined.core.records import NetworkRecord
from pymachined.core.spec import Machine, Network, RootfsMode
from pymachined.core.validate import load_set
from pymachined.errors import ApplyError, PymachineError
from pymachined.execute import Executor
from pymachined.images import ImageRecord, ImageStore
from pymachined.rootfs import Root
from pymachined.state import StateStore
from pymachined.supervise.base import LogLine, RunSpec, RunState, Status

SALTS = Salts(bootstrap="debootstrap 1.0 http://mirror", derive="layer")

SPECS = """\
name: db
image: debian-bookworm-slim
command: [sleep, infinity]
---
name: web
image: debian-bookworm-slim
packages: [curl]
command: [sleep, infinity]
depends_on: [db]
---
name: cache
image: debian-bookworm-slim
command: [sleep, infinity]
depends_on: [web]
---
name: solo
image: debian-bookworm-slim
command: [sleep, infinity]
"""

Calls = list[tuple[str, str]]


class FakeSupervisor:
    """The Supervisor protocol, recording each call as (call, machine)."""

    def __init__(self, calls: Calls, broken: str = "", starts_from_files: bool = True) -> None:
        self.calls = calls
        self.starts_from_files = starts_from_files
        self.broken = broken  # a start of this machine hits a bug
        self.commits: list[tuple[dict[str, bool], bool]] = []

    def prepare(self) -> None:
        self.calls.append(("prepare", ""))

    def status(self) -> dict[str, Status]:
        return {}

    def run_view(self, name: str, run: RunSpec, spec: Machine | None) -> dict[str, Any]:
        return wire.dump(run)

    def settled(self) -> None:
        self.calls.append(("settled", ""))

    def commit(self, autostart: Mapping[str, bool], reload: bool) -> None:
        self.calls.append(("commit", ",".join(sorted(autostart))))
        self.commits.append((dict(autostart), reload))

    def ready(self) -> None:
        self.calls.append(("ready", ""))

    def start(self, spec: RunSpec) -> Status:
        if spec.name == self.broken:
            raise RuntimeError("a bug in the supervisor")
        self.calls.append(("start", spec.name))
        return Status(spec.name, RunState.RUNNING, pid=100)

    def restart(self, spec: RunSpec) -> Status:
        self.calls.append(("restart", spec.name))
        return Status(spec.name, RunState.RUNNING, pid=100)

    def stop(self, name: str) -> Status:
        self.calls.append(("stop", name))
        return Status(name, RunState.EXITED)

    def forget(self, name: str) -> None:
        self.calls.append(("forget", name))

    def pause(self, name: str, paused: bool) -> Status:
        self.calls.append(("pause", name))
        return Status(name, RunState.PAUSED if paused else RunState.RUNNING)

    def set_limits(self, name: str, limits: Limits) -> list[str]:
        self.calls.append(("set_limits", name))
        return []

    def cgroup(self, name: str) -> str:
        return f"fake/{name}"

    def output(
        self, name: str, lines: int | None, since: float | None, follow: bool
    ) -> Iterator[LogLine] | None:
        return None

    def events(self, since: float | None) -> list[dict[str, Any]]:
        return []


class FakeImages(ImageStore):
    """An image store whose builds only record each layer's key, base first; a
    build of a key in ``failing`` fails."""

    def __init__(self, layout: Layout, repo: Path, calls: Calls, failing: frozenset[str]) -> None:
        super().__init__(layout, repo / "templates")
        self.calls = calls
        self.failing = failing
        self.built: dict[str, ImageRecord] = {}

    def ensure(self, layers: Sequence[Layer]) -> list[ImageRecord]:
        for layer in layers:
            if layer.key in self.built:
                continue
            self.calls.append(("build", layer.key))
            if layer.key in self.failing:
                raise PymachineError(f"image layer {layer.key} failed to build")
            self.built[layer.key] = ImageRecord(
                layer.key, layer.name, layer.parent, "now", "fake", None, self.path(layer.key)
            )
        return [self.built[layer.key] for layer in reversed(layers)]

    def get(self, key: str) -> ImageRecord | None:
        return self.built.get(key)


class FakeRoots:
    """The RootfsEdge: roots are records in memory, mounted at a plain directory."""

    def __init__(self, base: Path, calls: Calls) -> None:
        self.base = base
        self.calls = calls
        self.made: dict[str, Root] = {}

    def read(self, layout: Layout, name: str, /) -> Root | None:
        return self.made.get(name)

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
    ) -> Root:
        self.calls.append(("create", name))
        self.made[name] = Root(name, mode, tuple(r.key for r in chain), uid_base)
        return self.made[name]

    def adopt(
        self,
        layout: Layout,
        name: str,
        mode: RootfsMode,
        layers: tuple[str, ...],
        /,
        *,
        uid_base: int | None = None,
    ) -> Root:
        self.calls.append(("adopt", name))
        self.made[name] = Root(name, mode, layers, uid_base)
        return self.made[name]

    def claim_range(self, layout: Layout, root: Root, uid_base: int, /) -> Root:
        self.made[root.name] = replace(root, uid_base=uid_base)
        return self.made[root.name]

    def mount(self, layout: Layout, store: ImageStore, root: Root, ids: int = 0, /) -> Path:
        path = self.base / root.name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def mounted_ids(self, layout: Layout, name: str, /) -> int | None:
        return None

    def remove(self, layout: Layout, name: str, /) -> None:
        self.calls.append(("remove root", name))
        self.made.pop(name, None)


class FakeNetwork:
    """The NetworkEdge, recording each call."""

    def __init__(self, calls: Calls) -> None:
        self.calls = calls
        self.held: set[str] = set()  # machines whose ports another process holds

    def create_bridge(self, layout: Layout, network: Network, /) -> str:
        self.calls.append(("create bridge", network.name))
        return f"pmbr-{network.name}"

    def reconnect(self, layout: Layout, bridge: str, machines: list[str], /) -> None:
        self.calls.append(("reconnect", bridge))

    def remove_bridge(self, layout: Layout, record: NetworkRecord, /) -> None:
        self.calls.append(("remove bridge", record.name))

    def attach(
        self, layout: Layout, machine: str, network: Network, address: ipaddress.IPv4Address, /
    ) -> None:
        self.calls.append(("attach", machine))

    def detach(self, layout: Layout, machine: str, /) -> None:
        self.calls.append(("detach", machine))

    def sync_rules(self, layout: Layout, state: StateStore, /) -> str:
        self.calls.append(("sync rules", ""))
        return ""

    def start_forwarders(
        self, layout: Layout, machine: Machine, address: ipaddress.IPv4Address, /
    ) -> list[int]:
        self.calls.append(("start forwarders", machine.name))
        return []

    def check_ports(self, layout: Layout, machine: Machine, /) -> None:
        self.calls.append(("check ports", machine.name))
        if machine.name in self.held:
            raise PymachineError(f"cannot publish port 18241/tcp of machine {machine.name}")


PHASES = {
    CreateVolume: Phase.NETWORK_FIRST,
    ResizeVolume: Phase.NETWORK_FIRST,
    CreateNetwork: Phase.NETWORK_FIRST,
    ReplaceNetwork: Phase.NETWORK_FIRST,
    BuildImage: Phase.MAKING,
    CreateMachine: Phase.MAKING,
    AdoptRoot: Phase.MAKING,
    ReplaceRoot: Phase.MAKING,
    WriteFiles: Phase.MAKING,
    EnableMachine: Phase.ENABLE,
    StartMachine: Phase.RUNNING,
    RestartMachine: Phase.RUNNING,
    UpdateLimits: Phase.RUNNING,
    UpdatePorts: Phase.RUNNING,
    StartForwarders: Phase.RUNNING,
    StopMachine: Phase.BACKWARD,
    RemoveMachine: Phase.BACKWARD,
    RemoveNetwork: Phase.NETWORK_LAST,
}


def test_every_step_has_its_phase() -> None:
    assert set(get_args(Step)) == set(PHASES)
    for kind, expected in PHASES.items():
        assert phase(kind("m", "why")) is expected, kind.__name__


class Host:
    """A host under tmp_path, the desired state of SPECS, and an executor with fakes."""

    def __init__(
        self,
        repo: Path,
        tmp_path: Path,
        failing: frozenset[str] = frozenset(),
        broken: str = "",
        specs: str = SPECS,
        starts_from_files: bool = True,
    ) -> None:
        self.layout = Layout(PurePosixPath(tmp_path / "host"))
        self.repo = repo
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.spec_file = tmp_path / "specs.yaml"
        self.declare(specs)
        self.calls: Calls = []
        self.state = StateStore(self.layout)
        self.supervisor = FakeSupervisor(self.calls, broken, starts_from_files)
        self.images = FakeImages(self.layout, repo, self.calls, failing)
        self.roots = FakeRoots(tmp_path / "mounted", self.calls)
        self.net = FakeNetwork(self.calls)
        self.said: list[str] = []

    def declare(self, specs: str) -> None:
        """Desire specs (the host, its records and its fakes stay as they are)."""
        self.spec_file.write_text(specs)
        self.spec_set = load_set([self.spec_file], self.repo / "machines")
        self.desired: dict[str, Desired] = desire(
            self.spec_set, self.layout, self.repo / "templates", SALTS
        )

    def run(self, actions: Sequence[Step]) -> None:
        Executor(
            self.layout,
            self.images,
            self.state,
            self.supervisor,
            self.desired,
            self.said.append,
            net=self.net,
            roots=self.roots,
        ).run(actions)

    def index(self, call: str, name: str = "") -> int:
        return self.calls.index((call, name))

    def named(self, call: str) -> list[str]:
        return [name for kind, name in self.calls if kind == call]


def test_everything_is_made_before_one_commit_then_started_in_dependency_order(
    repo: Path, tmp_path: Path
) -> None:
    host = Host(repo, tmp_path)
    host.run(plan(host.desired, {}, built=[]))

    assert host.calls[0] == ("prepare", "")
    assert host.supervisor.commits == [(dict.fromkeys(["cache", "db", "solo", "web"], True), True)]
    commit = host.index("commit", "cache,db,solo,web")
    assert all(host.index("create", name) < commit for name in host.desired)
    assert host.named("ready") == [""]
    ready = host.index("ready")
    assert commit < ready < min(host.index("start", name) for name in host.desired)
    started = host.named("start")
    assert sorted(started) == sorted(host.desired)
    assert started.index("db") < started.index("web") < started.index("cache")
    for name, want in host.desired.items():
        record = host.state.get(name)
        assert record is not None and record.config_hash == want.config_hash
        for rendered in want.files:
            assert Path(rendered.path).read_text() == rendered.content
            assert record.files[str(rendered.path)] == file_hash(rendered.content)


def test_without_unit_files_a_machine_starts_while_others_are_still_being_made(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = Host(repo, tmp_path, starts_from_files=False)
    web_image = host.desired["web"].layer_keys[0]
    solo_started = threading.Event()
    ensure, start = host.images.ensure, host.supervisor.start

    def held_ensure(layers: Sequence[Layer]) -> list[ImageRecord]:
        if any(layer.key == web_image for layer in layers):
            # Only a start that does not wait for every machine to be made comes.
            assert solo_started.wait(10), "solo was not started while web was being made"
        return ensure(layers)

    def marked_start(spec: RunSpec) -> Status:
        status = start(spec)
        if spec.name == "solo":
            solo_started.set()
        return status

    monkeypatch.setattr(host.images, "ensure", held_ensure)
    monkeypatch.setattr(host.supervisor, "start", marked_start)
    host.run(plan(host.desired, {}, built=[]))

    started = host.named("start")
    assert sorted(started) == sorted(host.desired)
    assert started.index("db") < started.index("web") < started.index("cache")
    assert host.index("create", "web") < host.index("start", "web")
    assert host.index("ready") < host.index("start", "solo") < host.index("create", "web")
    # The files are still taken in, all at once, after they are all written.
    assert host.supervisor.commits == [(dict.fromkeys(["cache", "db", "solo", "web"], True), True)]


def test_a_failed_build_fails_its_machine_and_dependents_and_the_rest_converge(
    repo: Path, tmp_path: Path
) -> None:
    probe = Host(repo, tmp_path / "probe")
    web_image = probe.desired["web"].layer_keys[0]
    assert web_image not in probe.desired["db"].layer_keys  # web's own layer (curl)
    host = Host(repo, tmp_path / "host", failing=frozenset({web_image}))

    with pytest.raises(ApplyError) as raised:
        host.run(plan(host.desired, {}, built=[]))

    failures = {f.name: f for f in raised.value.failures}
    assert sorted(failures) == ["cache", "web"]
    assert "failed to build" in failures["web"].error.message
    assert "needs machine web" in failures["cache"].error.message
    assert sorted(host.named("start")) == ["db", "solo"]
    assert "web" not in host.named("create") and "cache" not in host.named("create")
    # The files of the machines that were made are still taken in, once.
    assert [sorted(a) for a, _ in host.supervisor.commits] == [["db", "solo"]]
    assert host.state.get("web") is None and host.state.get("cache") is None
    assert any(line.startswith("failed: web: ") for line in host.said)
    assert host.named("build").count(web_image) == 1


def test_a_bug_is_not_a_failure_it_stops_the_apply(repo: Path, tmp_path: Path) -> None:
    host = Host(repo, tmp_path, broken="web")
    with pytest.raises(RuntimeError, match="a bug in the supervisor"):
        host.run(plan(host.desired, {}, built=[]))
    assert "cache" not in host.named("start")


def test_networks_come_first_and_go_last_stops_and_removals_after_their_dependents(
    repo: Path, tmp_path: Path
) -> None:
    host = Host(repo, tmp_path)
    host.run(plan(host.desired, {}, built=[]))
    solo_files = [Path(f.path) for f in host.desired["solo"].files]
    assert solo_files and all(p.exists() for p in solo_files)
    new = Network.model_validate({"kind": "network", "name": "new", "subnet": "10.70.0.0/24"})
    old = Network.model_validate({"kind": "network", "name": "old", "subnet": "10.71.0.0/24"})
    host.state.put_network(NetworkRecord("old", "pmbr-old", "", old))
    host.calls.clear()
    host.supervisor.commits.clear()

    host.run(
        [
            RemoveNetwork("old", "no spec declares it"),
            StopMachine("cache", "state: stopped"),
            RemoveMachine("solo", "no spec declares it"),
            StopMachine("db", "state: stopped"),
            StartMachine("web", "it is stopped"),
            CreateNetwork("new", "declared", spec=new, bridge="pmbr-new", config_hash="h"),
        ]
    )

    order = [
        host.index("create bridge", "new"),
        host.index("ready"),
        host.index("start", "web"),
        host.index("stop", "cache"),  # it needs web, which needs db
        host.index("stop", "db"),
        host.index("remove bridge", "old"),
    ]
    assert order == sorted(order)
    # solo needs nothing and nothing needs it: removed beside the stops.
    assert host.index("start", "web") < host.index("forget", "solo") < order[-1]
    # The removal's files are taken away, then one commit says so.
    assert host.supervisor.commits == [({}, True)]
    assert (
        host.index("forget", "solo") < host.index("commit", "") < host.index("remove bridge", "old")
    )
    assert host.state.get("solo") is None and not any(p.exists() for p in solo_files)
    assert host.state.network("old") is None
    made = host.state.network("new")
    assert made is not None and made.bridge == "pmbr-new"


def test_machines_that_need_nothing_of_each_other_stop_at_once(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = Host(repo, tmp_path)
    host.run(plan(host.desired, {}, built=[]))
    # cache needs web, which needs db: only solo's removal can meet db's stop.
    both = threading.Barrier(2, timeout=10)
    stopped = host.supervisor.stop

    def stop(name: str) -> Status:
        if name == "db":
            both.wait()  # broken (raises) if solo's removal waits for this stop
        return stopped(name)

    def forget(name: str) -> None:
        both.wait()
        host.calls.append(("forget", name))

    monkeypatch.setattr(host.supervisor, "stop", stop)
    monkeypatch.setattr(host.supervisor, "forget", forget)
    host.calls.clear()
    host.run(
        [
            StopMachine("cache", "state: stopped"),
            StopMachine("db", "state: stopped"),
            RemoveMachine("solo", "no spec declares it"),
        ]
    )
    assert host.index("stop", "cache") < host.index("stop", "db")
    assert host.state.get("solo") is None


NETWORKED = """\
kind: network
name: n
subnet: 10.232.9.0/24
---
name: web
image: debian-bookworm-slim
command: [sleep, infinity]
network: n
ports: ["127.0.0.1:18241:80"]
"""


def test_a_change_of_ports_is_published_without_a_restart_or_refused_untouched(
    repo: Path, tmp_path: Path
) -> None:
    host = Host(repo, tmp_path, specs=NETWORKED)
    host.run(plan(host.desired, {}, [], networks=desire_networks(host.spec_set, host.layout)))
    assert host.index("check ports", "web") < host.index("attach", "web")
    first = host.state.get("web")
    assert first is not None and first.address == "10.232.9.2"
    host.declare(NETWORKED.replace('"127.0.0.1:18241:80"', '"127.0.0.1:18242:80"'))
    host.calls.clear()

    host.net.held.add("web")  # another process took the new port meanwhile
    with pytest.raises(ApplyError) as raised:
        host.run([UpdatePorts("web", "ports: +127.0.0.1:18242:80/tcp")])
    assert "cannot publish port" in raised.value.failures[0].error.message
    assert host.calls == [("ready", ""), ("check ports", "web")]
    assert host.state.get("web") == first

    host.net.held.clear()
    host.run([UpdatePorts("web", "ports: +127.0.0.1:18242:80/tcp")])
    assert host.calls[-3:] == [
        ("check ports", "web"),
        ("start forwarders", "web"),
        ("sync rules", ""),
    ]
    assert host.named("restart") == host.named("stop") == []
    record = host.state.get("web")
    assert record is not None and record.spec is not None
    assert record.spec.ports[0].host == 18242 and record.address == first.address
    assert record.config_hash == first.config_hash
    assert record.history[-1].endswith("ports changed (ports: +127.0.0.1:18242:80/tcp)")
