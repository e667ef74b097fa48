"""pymachined's request handling and timers, with a fake launcher (no root, no
process) and a fake clock: the replies, and what the launcher was asked."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from pymachined import events
from pymachined.core import wire
from pymachined.core.layout import Layout
from pymachined.core.limits import Limits
from pymachined.supervise import messages
from pymachined.supervise.base import RunSpec, RunState
from pymachined.supervise.daemon.launcher import Process
from pymachined.supervise.daemon.server import Daemon


@dataclass
class FakeLauncher:
    """Records every call; processes are pipes, so the daemon's selector can
    watch them; each one exits with the next of ``codes``."""

    calls: list[tuple[Any, ...]] = field(default_factory=list)
    codes: list[int | None] = field(default_factory=list)
    alive: set[int] = field(default_factory=set)  # pids adopt() finds running
    payload_up: bool = True
    pipes: dict[int, int] = field(default_factory=dict)
    next_pid: int = 1000

    def launch(self, spec: RunSpec) -> Process:
        self.next_pid += 1
        read_end, write_end = os.pipe()
        self.pipes[read_end] = write_end
        self.calls.append(("launch", spec.name))
        return Process(self.next_pid, 77, read_end, log=spec.log)

    def adopt(self, pid: int, pid_start: int | None) -> Process | None:
        self.calls.append(("adopt", pid, pid_start))
        if pid not in self.alive:
            return None
        read_end, write_end = os.pipe()
        self.pipes[read_end] = write_end
        return Process(pid, pid_start, read_end)

    def reap(self, process: Process) -> int | None:
        self.calls.append(("reap", process.pid))
        os.close(self.pipes.pop(process.pidfd))
        os.close(process.pidfd)
        return self.codes.pop(0) if self.codes else None

    def signal(self, process: Process, sig: int) -> None:
        self.calls.append(("signal", process.pid, sig))

    def payload_running(self, pid: int) -> bool:
        return self.payload_up

    def stage_binds(self, spec: RunSpec) -> None:
        self.calls.append(("stage_binds", spec.name))

    def set_limits(self, name: str, limits: Limits) -> list[str]:
        self.calls.append(("set_limits", name, limits))
        return ["cpu_weight: no cpu controller"]

    def freeze(self, name: str, frozen: bool) -> None:
        self.calls.append(("freeze", name, frozen))

    def oom_kills(self, name: str) -> int | None:
        return 0

    def clear(self, name: str) -> int:
        self.calls.append(("clear", name))
        return 0


class Clock:
    """A fake clock for the daemon's timers and start times."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def launcher() -> FakeLauncher:
    return FakeLauncher()


@pytest.fixture
def daemon(tmp_path: Path, launcher: FakeLauncher, clock: Clock) -> Iterator[Daemon]:
    made = Daemon(Layout(PurePosixPath(tmp_path)), launcher, monotonic=clock, wall=clock)
    yield made
    for machine in list(made.machines.values()):  # close the fake pidfds
        if machine.process is not None:
            launcher.reap(machine.process)


def spec(name: str = "web", restart: str = "on-failure", stop_timeout: float = 5.0) -> RunSpec:
    return RunSpec(name, ("systemd-nspawn", "--", "sleep"), restart, f"/logs/{name}", stop_timeout)


def ask(daemon: Daemon, request: dict[str, Any]) -> dict[str, Any]:
    """pymachined's reply to one request, as both travel: JSON lines."""
    answer = daemon.answer(json.dumps(request).encode() + b"\n")
    reply: dict[str, Any] = json.loads(messages.encode(answer))
    return reply


def start(daemon: Daemon, **kwargs: Any) -> dict[str, Any]:
    return ask(daemon, {"op": "start", "spec": wire.dump(spec(**kwargs))})


def exits(daemon: Daemon, name: str = "web") -> None:
    """The machine's process ends, as its pidfd would say."""
    daemon.on_exit(daemon.machines[name])


def record(daemon: Daemon, name: str = "web") -> dict[str, Any]:
    data: dict[str, Any] = json.loads((daemon.store.directory / f"{name}.json").read_text())
    return data


def names_of_events(daemon: Daemon) -> list[str]:
    return [e["event"] for e in events.read(daemon.layout)]


def test_start_launches_and_records(daemon: Daemon, launcher: FakeLauncher) -> None:
    reply = start(daemon)
    assert launcher.calls == [("launch", "web")]
    assert reply["status"]["state"] == "running"
    assert reply["status"]["pid"] == 1001
    assert record(daemon)["pid"] == 1001
    assert record(daemon)["pid_start"] == 77
    assert names_of_events(daemon) == ["start"]


def test_a_machine_is_starting_until_its_payload_runs(
    daemon: Daemon, launcher: FakeLauncher
) -> None:
    launcher.payload_up = False
    assert start(daemon)["status"]["state"] == "starting"
    launcher.payload_up = True
    [status] = ask(daemon, {"op": "status"})["machines"]
    assert status["state"] == "running"


def test_a_status_request_may_name_the_machines_it_wants(daemon: Daemon) -> None:
    start(daemon)
    start(daemon, name="db")
    every = ask(daemon, {"op": "status"})["machines"]
    assert sorted(s["name"] for s in every) == ["db", "web"]
    [one] = ask(daemon, {"op": "status", "names": ["db"]})["machines"]
    assert one["name"] == "db"
    assert ask(daemon, {"op": "status", "names": ["nope"]})["machines"] == []


def test_a_second_start_is_refused_while_it_runs(daemon: Daemon, launcher: FakeLauncher) -> None:
    start(daemon)
    assert start(daemon) == {"error": "web is running; stop it first", "hint": None}
    assert launcher.calls == [("launch", "web")]


def test_stop_sends_sigterm_then_sigkill_after_the_timeout(
    daemon: Daemon, launcher: FakeLauncher, clock: Clock
) -> None:
    start(daemon, stop_timeout=5.0)
    reply = ask(daemon, {"op": "stop", "name": "web"})
    assert reply["stop_timeout"] == 5.0
    assert launcher.calls[-1] == ("signal", 1001, signal.SIGTERM)
    daemon.tick()  # the first OOM poll
    assert daemon.next_deadline() == pytest.approx(1.0)  # the next comes before the kill
    clock.now += 4.9
    daemon.tick()
    assert ("signal", 1001, signal.SIGKILL) not in launcher.calls
    clock.now += 0.2
    daemon.tick()
    assert launcher.calls[-1] == ("signal", 1001, signal.SIGKILL)
    daemon.tick()  # only once
    assert launcher.calls.count(("signal", 1001, signal.SIGKILL)) == 1
    launcher.codes = [137]
    exits(daemon)
    machine = daemon.machines["web"]
    assert (machine.state, machine.exit_code, machine.pid) == (RunState.EXITED, 137, None)
    # What its nspawn left holds the log's pipe: it is killed before the reap
    # waits for the log's filter to read the pipe to its end.
    assert launcher.calls[-2:] == [("clear", "web"), ("reap", 1001)]
    assert names_of_events(daemon) == ["start", "stop"]


def test_a_stop_that_ends_in_time_is_not_killed(
    daemon: Daemon, launcher: FakeLauncher, clock: Clock
) -> None:
    start(daemon, restart="always")
    ask(daemon, {"op": "stop", "name": "web"})
    launcher.codes = [0]
    clock.now += 1
    exits(daemon)
    clock.now += 10
    daemon.tick()
    assert not any(c[0] == "signal" and c[2] == signal.SIGKILL for c in launcher.calls)
    assert daemon.machines["web"].state is RunState.EXITED  # "always", but stopped
    assert daemon.machines["web"].restart_at is None


def test_a_failure_restarts_after_the_backoff(
    daemon: Daemon, launcher: FakeLauncher, clock: Clock
) -> None:
    start(daemon)
    launcher.codes = [1]
    clock.now += 1
    exits(daemon)
    machine = daemon.machines["web"]
    assert machine.state is RunState.RESTARTING
    assert daemon.next_deadline() == pytest.approx(0.2)
    clock.now += 0.1
    daemon.tick()
    assert launcher.calls.count(("launch", "web")) == 1
    clock.now += 0.1
    daemon.tick()
    assert launcher.calls[-2:] == [("stage_binds", "web"), ("launch", "web")]
    assert (machine.state, machine.restarts) == (RunState.RUNNING, 1)
    assert names_of_events(daemon) == ["start", "die", "restart", "start"]


def test_a_crash_loop_ends_dead(daemon: Daemon, launcher: FakeLauncher, clock: Clock) -> None:
    start(daemon)
    for _ in range(6):
        launcher.codes = [1]
        clock.now += 0.5
        exits(daemon)
        clock.now += 10  # past any backoff
        daemon.tick()
    machine = daemon.machines["web"]
    assert machine.state is RunState.DEAD
    assert launcher.calls.count(("launch", "web")) == 6
    assert names_of_events(daemon)[-2:] == ["die", "dead"]
    assert record(daemon)["state"] == "dead"


def test_stop_of_a_restarting_machine_cancels_the_restart(
    daemon: Daemon, launcher: FakeLauncher, clock: Clock
) -> None:
    start(daemon)
    launcher.codes = [1]
    exits(daemon)
    reply = ask(daemon, {"op": "stop", "name": "web"})
    assert reply["status"]["state"] == "exited"
    clock.now += 60
    daemon.tick()
    assert launcher.calls.count(("launch", "web")) == 1
    assert names_of_events(daemon)[-1] == "stop"


def test_stop_of_an_unknown_machine_is_a_stop(daemon: Daemon, launcher: FakeLauncher) -> None:
    reply = ask(daemon, {"op": "stop", "name": "ghost"})
    assert reply == {
        "status": {**reply["status"], "state": "exited"},
        "stop_timeout": 0,
        "skipped": [],
    }
    assert launcher.calls == []
    assert ask(daemon, {"op": "pause", "name": "ghost"}) == {
        "error": "no machine 'ghost' is supervised",
        "hint": None,
    }


def test_pause_freezes_and_a_stop_thaws_first(daemon: Daemon, launcher: FakeLauncher) -> None:
    start(daemon)
    assert ask(daemon, {"op": "pause", "name": "web"})["status"]["state"] == "paused"
    assert launcher.calls[-1] == ("freeze", "web", True)
    assert record(daemon)["state"] == "paused"
    ask(daemon, {"op": "stop", "name": "web"})
    assert launcher.calls[-2:] == [("freeze", "web", False), ("signal", 1001, signal.SIGTERM)]


def test_unpause_thaws(daemon: Daemon, launcher: FakeLauncher) -> None:
    start(daemon)
    ask(daemon, {"op": "pause", "name": "web"})
    assert ask(daemon, {"op": "unpause", "name": "web"})["status"]["state"] == "running"
    assert launcher.calls[-1] == ("freeze", "web", False)
    assert names_of_events(daemon) == ["start", "pause", "unpause"]


def test_pause_of_a_machine_that_is_not_running(daemon: Daemon, launcher: FakeLauncher) -> None:
    start(daemon, restart="no")
    launcher.codes = [0]
    exits(daemon)
    assert ask(daemon, {"op": "pause", "name": "web"}) == {
        "error": "web is not running",
        "hint": None,
    }
    assert ("freeze", "web", True) not in launcher.calls


def test_limits_are_recorded_and_written_while_it_runs(
    daemon: Daemon, launcher: FakeLauncher
) -> None:
    start(daemon, restart="no")
    limits = Limits(memory=64 << 20, cpu_weight=50)
    reply = ask(daemon, {"op": "limits", "name": "web", "limits": wire.dump(limits)})
    assert reply["skipped"] == ["cpu_weight: no cpu controller"]
    assert launcher.calls[-1] == ("set_limits", "web", limits)
    assert record(daemon)["spec"]["limits"]["memory"] == 64 << 20
    launcher.codes = [0]
    exits(daemon)
    reply = ask(daemon, {"op": "limits", "name": "web", "limits": wire.dump(Limits(pids=9))})
    assert reply["skipped"] == []  # not running: kept for its next start only
    assert launcher.calls[-1] != ("set_limits", "web", Limits(pids=9))
    assert daemon.machines["web"].spec.limits == Limits(pids=9)


def test_forget_of_a_running_machine_drops_it_when_it_has_exited(
    daemon: Daemon, launcher: FakeLauncher
) -> None:
    start(daemon, restart="always")
    ask(daemon, {"op": "forget", "name": "web"})
    assert launcher.calls[-1] == ("signal", 1001, signal.SIGTERM)
    assert record(daemon)["forgotten"] is True
    launcher.codes = [0]
    exits(daemon)
    assert "web" not in daemon.machines
    assert not (daemon.store.directory / "web.json").exists()


def test_forget_of_a_stopped_machine_drops_it_at_once(
    daemon: Daemon, launcher: FakeLauncher
) -> None:
    start(daemon, restart="no")
    launcher.codes = [0]
    exits(daemon)
    ask(daemon, {"op": "forget", "name": "web"})
    assert "web" not in daemon.machines
    assert ask(daemon, {"op": "status"}) == {"machines": []}


def test_an_unreadable_record_is_unknown_and_cannot_be_started_over(
    daemon: Daemon, launcher: FakeLauncher
) -> None:
    daemon.store.directory.mkdir(parents=True)
    (daemon.store.directory / "web.json").write_text("{not json")
    daemon.adopt()
    [status] = ask(daemon, {"op": "status"})["machines"]
    assert status["state"] == "unknown"
    assert "cannot be read" in start(daemon)["error"]
    assert launcher.calls == []
    ask(daemon, {"op": "forget", "name": "web"})
    assert launcher.calls == [("clear", "web")]  # whatever runs in its cgroups ends
    assert not (daemon.store.directory / "web.json").exists()
    assert start(daemon)["status"]["state"] == "running"


def test_a_new_daemon_adopts_what_runs_and_restarts_what_ended(
    tmp_path: Path, daemon: Daemon, launcher: FakeLauncher, clock: Clock
) -> None:
    start(daemon, name="alive", restart="always")
    start(daemon, name="gone", restart="on-failure")
    launcher.alive = {1001}
    later = FakeLauncher(alive={1001}, next_pid=2000)
    successor = Daemon(daemon.layout, later, monotonic=clock, wall=clock)
    successor.adopt()
    assert later.calls == [("adopt", 1001, 77), ("adopt", 1002, 77), ("clear", "gone")]
    assert successor.machines["alive"].state is RunState.RUNNING
    gone = successor.machines["gone"]
    # Its exit code is unknown, which on-failure counts as a failure.
    assert (gone.state, gone.exit_code) == (RunState.RESTARTING, None)
    clock.now += 1
    successor.tick()
    assert later.calls[-1] == ("launch", "gone")
    for machine in successor.machines.values():
        if machine.process is not None:
            later.reap(machine.process)


def test_requests_that_do_not_fit_are_refused_whole(daemon: Daemon) -> None:
    unknown = ask(daemon, {"op": "reboot", "name": "web"})
    assert unknown["error"].startswith("a request pymachined cannot read: ")
    assert "'reboot'" in unknown["error"] and "'pause'" in unknown["error"]
    # A start whose spec lacks a field starts nothing, and says which field.
    broken = wire.dump(spec())
    del broken["argv"]
    refused = ask(daemon, {"op": "start", "spec": broken})
    assert refused["error"] == "a request pymachined cannot read: start.spec.argv: Field required"
    assert daemon.machines == {}
    assert ask(daemon, {"op": "limits", "name": "web", "limits": {"pids": "many"}})["error"]
    assert ask(daemon, {"op": "pause", "name": "ghost"})["error"] == (
        "no machine 'ghost' is supervised"
    )
    start(daemon)
    assert ask(daemon, {"op": "ping"}) == {"pid": os.getpid()}
    assert daemon.answer(b"not json\n") == messages.Failed(
        "a request pymachined cannot read: Expecting value: line 1 column 1 (char 0)"
    )
