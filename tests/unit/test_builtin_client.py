"""The builtin supervisor's client waiting on many machines at once, against
a fake pymachined: one status request a round for all of them."""

from __future__ import annotations

import socket
import threading
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from pymachined.core.layout import Layout
from pymachined.errors import PymachineError
from pymachined.supervise import builtin, messages
from pymachined.supervise.base import RunState, Status
from pymachined.supervise.builtin import BuiltinSupervisor


class FakeDaemon:
    """Answers ListStatus: machine i runs once it has been asked of i + 1 times."""

    def __init__(self, fail_first: int = 0) -> None:
        self.asked: list[tuple[str, ...]] = []
        self.counts: dict[str, int] = {}
        self.fail_first = fail_first
        self.lock = threading.Lock()

    def request(self, request: messages.Request, expected: type[Any]) -> messages.Statuses:
        assert isinstance(request, messages.ListStatus)
        assert request.names is not None
        with self.lock:
            self.asked.append(request.names)
            if len(self.asked) <= self.fail_first:
                raise PymachineError("pymachined: busy")
            machines = []
            for name in request.names:
                self.counts[name] = self.counts.get(name, 0) + 1
                up = self.counts[name] > int(name.removeprefix("m"))
                machines.append(Status(name, RunState.RUNNING if up else RunState.STARTING))
        return messages.Statuses(tuple(machines))


def wait_all(supervisor: BuiltinSupervisor, count: int) -> dict[str, Status | BaseException]:
    found: dict[str, Status | BaseException] = {}

    def wait(name: str) -> None:
        try:
            found[name] = supervisor._wait(name, lambda s: s.state is RunState.RUNNING, 30)
        except PymachineError as error:
            found[name] = error

    threads = [threading.Thread(target=wait, args=(f"m{i}",)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return found


def test_many_waits_share_one_request_a_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(builtin, "POLL_INTERVAL", 0.01)
    supervisor = BuiltinSupervisor(Layout(PurePosixPath(tmp_path)))
    daemon = FakeDaemon()
    monkeypatch.setattr(supervisor, "request", daemon.request)
    found = wait_all(supervisor, 16)
    assert all(isinstance(s, Status) and s.state is RunState.RUNNING for s in found.values())
    assert sorted(found) == sorted(f"m{i}" for i in range(16))
    # m15 runs at its 16th look: one request per look for every waiter (a
    # request per waiter and look would be 136), and a few more for the
    # threads that came while a poll was under way.
    assert 16 <= len(daemon.asked) <= 16 + 16
    assert max(len(names) for names in daemon.asked) > 8  # polled together
    # Each round asks only of the machines still waited on: m0 ran at its first.
    assert "m15" in daemon.asked[-1] and "m0" not in daemon.asked[-1]


def test_a_failed_poll_fails_its_caller_and_another_thread_polls_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(builtin, "POLL_INTERVAL", 0.01)
    supervisor = BuiltinSupervisor(Layout(PurePosixPath(tmp_path)))
    daemon = FakeDaemon(fail_first=1)
    monkeypatch.setattr(supervisor, "request", daemon.request)
    found = wait_all(supervisor, 4)
    failed = [name for name, got in found.items() if isinstance(got, PymachineError)]
    assert len(failed) == 1  # the poller of the failed request, and no one else
    assert all(got.state is RunState.RUNNING for got in found.values() if isinstance(got, Status))
    assert len(found) == 4


def test_a_daemon_that_never_answers_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    supervisor = BuiltinSupervisor(Layout(PurePosixPath(tmp_path)))
    supervisor.run_dir.mkdir(parents=True)
    monkeypatch.setattr(builtin, "ANSWER_TIMEOUT", 0.2)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(supervisor.socket))
        server.listen(1)  # accepted by the kernel, never read
        with pytest.raises(PymachineError) as caught:
            supervisor.request(messages.Ping(), messages.Pong)
    # Not the errno-less TimeoutError's "Success".
    assert str(caught.value) == "pymachined did not answer within 0.2 s"
    assert caught.value.hint is not None and "pymachined.log" in caught.value.hint
