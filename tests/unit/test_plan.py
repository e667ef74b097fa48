"""Planning is pure: desired and observed state in, actions out. Each case also
checks that planning again, with what the actions produce, plans nothing."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path, PurePosixPath

import pytest

from pymachined.core.actions import Action
from pymachined.core.desired import Desired, desire, file_hash
from pymachined.core.layout import Layout
from pymachined.core.plan import Kept, Observed, plan, problems, start_order, warnings
from pymachined.core.recipes import Salts
from pymachined.core.records import MachineRecord
from pymachined.core.spec import RootfsMode
from pymachined.core.validate import load_set
from pymachined.supervise.base import RunState, Status

SALTS = Salts(bootstrap="debootstrap 1.0 http://mirror", derive="layer")
LAYOUT = Layout(PurePosixPath("/srv/host"))

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
environment: {MODE: prod}
---
name: cache
image: debian-bookworm-slim
command: [sleep, infinity]
depends_on: [web]
"""


def desired_from(repo: Path, tmp_path: Path, text: str = SPECS) -> dict[str, Desired]:
    spec = tmp_path / "specs.yaml"
    spec.write_text(text)
    spec_set = load_set([spec], repo / "machines")
    return desire(spec_set, LAYOUT, repo / "templates", SALTS)


def converged(desired: dict[str, Desired]) -> tuple[dict[str, Observed], set[str]]:
    """What the host looks like after a successful apply of desired."""
    observed = {}
    for name, want in desired.items():
        record = MachineRecord(
            name=name,
            config_hash=want.config_hash,
            layers=want.layer_keys,
            files={str(f.path): file_hash(f.content) for f in want.files},
            run=want.run,
            spec=want.machine,
        )
        observed[name] = Observed(
            name=name,
            record=record,
            root=want.layer_keys,
            root_mode=want.machine.rootfs,
            files=dict(record.files),
            status=Status(name, RunState.RUNNING, pid=100),
        )
    built = {layer.key for want in desired.values() for layer in want.layers}
    return observed, built


def kinds(actions: Sequence[Action]) -> list[tuple[str, str]]:
    return [(a.kind, a.machine) for a in actions]


def test_a_fresh_host_gets_everything_in_dependency_order(repo: Path, tmp_path: Path) -> None:
    desired = desired_from(repo, tmp_path)
    actions = plan(desired, {}, built=[])
    assert kinds(actions) == [
        ("BuildImage", "db"),
        ("CreateMachine", "db"),
        ("WriteFiles", "db"),
        ("StartMachine", "db"),
        ("BuildImage", "web"),
        ("CreateMachine", "web"),
        ("WriteFiles", "web"),
        ("StartMachine", "web"),
        ("CreateMachine", "cache"),
        ("WriteFiles", "cache"),
        ("StartMachine", "cache"),
    ]
    observed, built = converged(desired)
    assert plan(desired, observed, built) == []


def test_start_order_puts_dependencies_first(repo: Path, tmp_path: Path) -> None:
    assert start_order(desired_from(repo, tmp_path)) == ["db", "web", "cache"]


def test_an_environment_change_restarts_only_that_machine(repo: Path, tmp_path: Path) -> None:
    before = desired_from(repo, tmp_path)
    observed, built = converged(before)
    after = desired_from(repo, tmp_path, SPECS.replace("MODE: prod", "MODE: test"))
    actions = plan(after, observed, built)
    assert kinds(actions) == [("WriteFiles", "web"), ("RestartMachine", "web")]
    assert actions[1].reason == "its configuration changed"
    observed, built = converged(after)
    assert plan(after, observed, built) == []


def test_a_limit_change_updates_the_running_machine_without_a_restart(
    repo: Path, tmp_path: Path
) -> None:
    before = desired_from(repo, tmp_path)
    observed, built = converged(before)
    limited = SPECS.replace("MODE: prod}\n", "MODE: prod}\nresources: {memory: 64M, pids: 64}\n")
    after = desired_from(repo, tmp_path, limited)
    actions = plan(after, observed, built)
    assert kinds(actions) == [("WriteFiles", "web"), ("UpdateLimits", "web")]
    assert actions[1].reason == "memory unlimited → 64M, pids 2048 → 64"
    observed, built = converged(after)
    assert plan(after, observed, built) == []
    lifted = desired_from(repo, tmp_path, limited.replace("memory: 64M, ", ""))
    assert [a.reason for a in plan(lifted, observed, built)][-1] == "memory 64M → unlimited"


def test_a_resource_and_config_change_restarts_once(repo: Path, tmp_path: Path) -> None:
    before = desired_from(repo, tmp_path)
    observed, built = converged(before)
    both = SPECS.replace(
        "environment: {MODE: prod}\n", "environment: {MODE: test}\nresources: {memory: 96M}\n"
    )
    actions = plan(desired_from(repo, tmp_path, both), observed, built)
    assert kinds(actions) == [("WriteFiles", "web"), ("RestartMachine", "web")]


def test_labels_and_autostart_do_not_restart(repo: Path, tmp_path: Path) -> None:
    before = desired_from(repo, tmp_path)
    observed, built = converged(before)
    after = desired_from(
        repo, tmp_path, SPECS.replace("name: db\n", "name: db\nlabels: {tier: data}\n")
    )
    assert [a.kind for a in plan(after, observed, built)] == []


def test_drift_is_repaired(repo: Path, tmp_path: Path) -> None:
    desired = desired_from(repo, tmp_path)
    observed, built = converged(desired)
    unit = str(desired["db"].files[1].path)
    edited = dict(observed["db"].files, **{unit: "hand-edited"})
    observed["db"] = replace(observed["db"], files=edited)
    observed["web"] = replace(observed["web"], status=Status("web", RunState.EXITED, exit_code=1))
    observed["cache"] = replace(observed["cache"], root=None)
    actions = plan(desired, observed, built)
    assert kinds(actions) == [
        ("WriteFiles", "db"),
        ("StartMachine", "web"),
        ("CreateMachine", "cache"),
        ("RestartMachine", "cache"),
    ]
    assert actions[0].reason == f"{unit} differs from the spec"
    assert actions[3].reason == "its root was made again"


def test_an_image_change_replaces_the_root(repo: Path, tmp_path: Path) -> None:
    before = desired_from(repo, tmp_path)
    observed, built = converged(before)
    after = desired_from(repo, tmp_path, SPECS.replace("packages: [curl]", "packages: [wget]"))
    actions = plan(after, observed, built)
    assert kinds(actions) == [
        ("BuildImage", "web"),
        ("ReplaceRoot", "web"),
        ("RestartMachine", "web"),
        ("RestartMachine", "cache"),  # stopped with web under systemd (Requires=)
    ]
    assert actions[3].reason == "web, which it needs, is stopped on the way"


def test_a_rootfs_mode_change_replaces_the_root(repo: Path, tmp_path: Path) -> None:
    observed, built = converged(desired_from(repo, tmp_path))
    copied = desired_from(repo, tmp_path, SPECS.replace("name: db\n", "name: db\nrootfs: copy\n"))
    actions = plan(copied, observed, built)
    assert kinds(actions) == [
        ("ReplaceRoot", "db"),
        ("RestartMachine", "db"),
        ("RestartMachine", "web"),
        ("RestartMachine", "cache"),  # through web: what needs db is restarted after it
    ]
    assert actions[0].reason == "rootfs: overlay -> copy"
    assert actions[3].reason == "web, which it needs, is stopped on the way"
    observed, built = converged(copied)
    assert plan(copied, observed, built) == []


def test_state_stopped_stops_dependents_first(repo: Path, tmp_path: Path) -> None:
    desired = desired_from(repo, tmp_path)
    observed, built = converged(desired)
    stopped = desired_from(repo, tmp_path, SPECS.replace("command", "state: stopped\ncommand"))
    actions = plan(stopped, observed, built)
    # The units lose their [Install] section: a stopped machine is not started at boot.
    assert kinds(actions) == [
        ("WriteFiles", "db"),
        ("WriteFiles", "web"),
        ("WriteFiles", "cache"),
        ("StopMachine", "cache"),
        ("StopMachine", "web"),
        ("StopMachine", "db"),
    ]
    observed, built = converged(stopped)
    stopped_host = {
        n: replace(o, status=Status(n, RunState.EXITED, exit_code=0)) for n, o in observed.items()
    }
    assert plan(stopped, stopped_host, built) == []


@pytest.mark.parametrize("prune", [False, True])
def test_undeclared_machines_go_only_with_prune(repo: Path, tmp_path: Path, prune: bool) -> None:
    desired = desired_from(repo, tmp_path)
    observed, built = converged(desired)
    only_db = {"db": desired["db"]}
    actions = plan(only_db, observed, built, prune=prune)
    expected = [("RemoveMachine", "web"), ("RemoveMachine", "cache")] if prune else []
    assert sorted(kinds(actions)) == sorted(expected)


def test_pruned_machines_go_dependents_first(repo: Path, tmp_path: Path) -> None:
    desired = desired_from(repo, tmp_path)
    observed, built = converged(desired)
    # cache needs web, which needs db: names would order them cache, db, web.
    actions = plan({}, observed, built, prune=True)
    assert kinds(actions) == [
        ("RemoveMachine", "cache"),
        ("RemoveMachine", "web"),
        ("RemoveMachine", "db"),
    ]


def test_machines_without_a_record_are_never_pruned() -> None:
    handmade = {"mine": Observed("mine", record=None, root=("abc",))}
    assert plan({}, handmade, built=[], prune=True) == []


def test_plan_as_json_names_action_machine_and_reason(repo: Path, tmp_path: Path) -> None:
    actions = plan(desired_from(repo, tmp_path), {}, built=[])
    first = actions[0].as_json()
    assert first["action"] == "BuildImage"
    assert first["machine"] == "db"
    assert first["reason"] == "1 layer(s) not in the cache"
    assert len(first["key"]) == 16


def test_confinement_opt_outs_are_shown_for_machines_being_started(
    repo: Path, tmp_path: Path
) -> None:
    text = SPECS.replace(
        "name: db\n", "name: db\nsecurity: {private_users: false, capabilities: {add: [all]}}\n"
    )
    desired = desired_from(repo, tmp_path, text)
    assert warnings(desired, plan(desired, {}, built=[])) == [
        "db runs without a user namespace (security.private_users: false): "
        "root in the machine is root on the host",
        "db keeps every capability (security.capabilities.add: [all])",
    ]
    observed, built = converged(desired)
    assert warnings(desired, plan(desired, observed, built)) == []


def test_start_at_boot_changed_outside_pymachine_is_put_back(repo: Path, tmp_path: Path) -> None:
    text = SPECS.replace("name: cache\n", "name: cache\nautostart: false\n")
    desired = desired_from(repo, tmp_path, text)
    observed, built = converged(desired)
    # As systemd reports units someone enabled or disabled by hand.
    for name, enabled in (("db", False), ("web", True), ("cache", True)):
        status = replace(observed[name].status, enabled=enabled)  # type: ignore[type-var]
        observed[name] = replace(observed[name], status=status)
    actions = plan(desired, observed, built)
    assert [(a.kind, a.machine, a.as_json()["enabled"]) for a in actions] == [
        ("EnableMachine", "db", True),
        ("EnableMachine", "cache", False),
    ]
    assert actions[0].describe() == "enable db at boot: disabled outside pymachine"
    for name, enabled in (("db", True), ("cache", False)):
        status = replace(observed[name].status, enabled=enabled)  # type: ignore[type-var]
        observed[name] = replace(observed[name], status=status)
    assert plan(desired, observed, built) == []


def test_a_running_machine_with_a_broken_link_is_restarted(repo: Path, tmp_path: Path) -> None:
    desired = desired_from(repo, tmp_path)
    observed, built = converged(desired)
    observed["web"] = replace(observed["web"], link="its veth vpm1234 is missing")
    actions = plan(desired, observed, built)
    assert kinds(actions) == [("RestartMachine", "web")]
    assert actions[0].describe().endswith("its veth vpm1234 is missing")
    observed["web"] = replace(observed["web"], link=None)  # the restart attached it again
    assert plan(desired, observed, built) == []


BOUND = SPECS.replace("environment: {MODE: prod}", "binds: ['/srv/one:/data:ro']")


def test_a_changed_bind_source_restarts_though_its_staging_path_stays(
    repo: Path, tmp_path: Path
) -> None:
    before = desired_from(repo, tmp_path, BOUND)
    observed, built = converged(before)
    assert plan(desired_from(repo, tmp_path, BOUND), observed, built) == []
    after = desired_from(repo, tmp_path, BOUND.replace("/srv/one", "/srv/two"))
    # nspawn is told the staging path only: what is mounted there is the
    # source, which the run spec carries, and the hash covers.
    assert after["web"].run.argv == before["web"].run.argv
    assert [b.source for b in after["web"].run.binds] == ["/srv/two"]
    actions = plan(after, observed, built)
    assert kinds(actions) == [("RestartMachine", "web")]
    observed, built = converged(after)
    assert plan(after, observed, built) == []


def test_writes_without_a_root_record_are_kept(repo: Path, tmp_path: Path) -> None:
    desired = desired_from(repo, tmp_path)
    observed, built = converged(desired)
    lost = replace(
        observed["web"], root=None, root_mode=None, kept=Kept(RootfsMode.OVERLAY, 12 * 1024**2)
    )
    actions = plan(desired, {**observed, "web": lost}, built)
    assert kinds(actions) == [("AdoptRoot", "web")]
    assert actions[0].describe() == (
        "keep the root of web: its root record is missing; its writable layer (12 MiB) "
        "is kept and the record made again from the spec's image"
    )
    unreadable = replace(lost, root_problem="root record x is unreadable: not JSON")
    (action,) = plan(desired, {**observed, "web": unreadable}, built)
    assert "its root record cannot be read (root record x is unreadable: not JSON)" in (
        action.reason
    )
    # Nothing written (a create killed half-way): the root is made again.
    empty = replace(lost, kept=None)
    assert kinds(plan(desired, {**observed, "web": empty}, built)) == [
        ("CreateMachine", "web"),
        ("RestartMachine", "web"),
        ("RestartMachine", "cache"),
    ]


def test_an_unreadable_record_leaves_only_its_machine(repo: Path, tmp_path: Path) -> None:
    changed = desired_from(repo, tmp_path, SPECS.replace("MODE: prod", "MODE: test"))
    desired = desired_from(repo, tmp_path)
    observed, built = converged(desired)
    broken = Observed("web", problem="state record w is not valid JSON")
    observed = {**observed, "web": broken, "old": Observed("old", problem="bad")}
    actions = plan(changed, observed, built, prune=True)
    assert "web" not in {a.machine for a in actions}
    assert "old" not in {a.machine for a in actions}  # never pruned unread
    assert problems(changed, observed) == [
        "old: bad; left as it is",
        "web: state record w is not valid JSON; left as it is",
    ]
    assert problems(desired, converged(desired)[0]) == []


def test_a_running_machine_gets_its_lost_forwarders_back(repo: Path, tmp_path: Path) -> None:
    desired = desired_from(repo, tmp_path)
    observed, built = converged(desired)
    lost = replace(observed["web"], forwarders_gone=1)
    actions = plan(desired, {**observed, "web": lost}, built)
    assert [a.describe() for a in actions] == [
        "start the port forwarders of web: 1 of its IPv6 port forwarders are gone"
    ]
    # Stopped, or restarted anyway: the start makes them.
    stopped = replace(lost, status=Status("web", RunState.EXITED))
    assert kinds(plan(desired, {**observed, "web": stopped}, built)) == [("StartMachine", "web")]
