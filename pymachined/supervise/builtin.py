"""The client of pymachined, the builtin supervisor: requests over its socket,
and starting it when it is not running."""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from pymachined import run
from pymachined.core import wire
from pymachined.core.commands import LOG_TIME_FORMAT, rotated_log
from pymachined.core.desired import console_log
from pymachined.core.layout import Layout
from pymachined.core.limits import Limits
from pymachined.core.parsers import parse_log_line
from pymachined.core.spec import Machine
from pymachined.errors import PymachineError
from pymachined.supervise import messages
from pymachined.supervise.base import SOCKET, LogLine, RunSpec, RunState, Status, read_line

R = TypeVar("R")

START_TIMEOUT = 10.0  # for pymachined itself to listen
POLL_INTERVAL = 0.05  # between two looks at the status of machines being waited on
# How long a start waits for the machine's payload: systemd's
# DefaultTimeoutStartSec, which machine units keep.
MACHINE_START_TIMEOUT = 90.0
ANSWER_TIMEOUT = 30.0  # for pymachined to answer one request


class BuiltinSupervisor:
    """Machines supervised by pymachined."""

    starts_from_files = False  # a start sends the run spec

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.run_dir = Path(layout.run_dir)
        self.socket = self.run_dir / SOCKET
        self._starting: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        # Machines waited on by the threads of an apply, polled for all at once.
        self._poll = threading.Condition()
        self._waited: dict[str, int] = {}  # name -> how many threads wait on it
        self._polled: dict[str, Status] = {}
        self._polls = 0  # polls answered so far
        self._polling = False
        self._polled_at = 0.0

    def _send(self, request: messages.Request, expected: type[R]) -> R:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(ANSWER_TIMEOUT)
            try:
                connection.connect(str(self.socket))
                connection.sendall(messages.encode(request))
                data = read_line(connection)
            except TimeoutError:  # an OSError with no errno: it would read "Success"
                raise PymachineError(
                    f"pymachined did not answer within {ANSWER_TIMEOUT:g} s",
                    hint=f"is it stuck? see {self.run_dir / 'pymachined.log'}",
                ) from None
        try:
            reply = messages.decode_reply(data, expected)
        except ValueError as exc:
            raise PymachineError(
                f"pymachined sent a reply this pymachine cannot read: {exc}",
                hint=f"is it another version? see {self.run_dir / 'pymachined.log'}",
            ) from exc
        if isinstance(reply, messages.Failed):
            raise PymachineError(f"pymachined: {reply.error}", hint=reply.hint)
        return reply

    def request(self, request: messages.Request, expected: type[R]) -> R:
        """Send one request and read its reply, starting pymachined first if
        it does not answer."""
        try:
            return self._send(request, expected)
        except (FileNotFoundError, ConnectionRefusedError):
            self.start_daemon()
            return self._send(request, expected)

    def running(self) -> bool:
        """Whether pymachined answers."""
        try:
            self._send(messages.Ping(), messages.Pong)
        except (FileNotFoundError, ConnectionRefusedError):
            return False
        return True

    def prepare(self) -> None:
        """Start pymachined now if it is not running, without waiting for it, so
        that it comes up while other work goes on."""
        if self._starting is None and not self.running():
            self._starting = self._spawn()

    def _spawn(self) -> subprocess.Popen[bytes]:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            sys.executable,
            "-m",
            "pymachined.supervise.daemon",
            "--root",
            str(self.layout.root),
        ]
        with (self.run_dir / "pymachined.log").open("ab") as output:
            return run.spawn(argv, output)

    def start_daemon(self) -> None:
        """Start pymachined in the background (unless prepare() did) and wait
        until it answers."""
        with self._lock:  # executor threads may all find it down at once
            if self.running():
                self._starting = None
                return
            daemon = self._starting or self._spawn()
            self._starting = None
            self._wait_for(daemon)

    def _wait_for(self, daemon: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.running():
                return
            if daemon.poll() is not None:
                break
            time.sleep(0.05)
        raise PymachineError(
            "pymachined did not start",
            hint=f"see {self.run_dir / 'pymachined.log'}",
        )

    def status(self) -> dict[str, Status]:
        """Every supervised machine, by name. If pymachined is not running but has
        machines on record (it was killed, or the host rebooted), it is started,
        and adopts or restarts them."""
        if not self.running():
            if not any((self.run_dir / "supervisor").glob("*.json")):
                return {}
            self.start_daemon()
        reply = self.request(messages.ListStatus(), messages.Statuses)
        return {status.name: status for status in reply.machines}

    def run_view(self, name: str, run: RunSpec, spec: Machine | None) -> dict[str, Any]:
        """pymachined runs the recorded command line, into the console log."""
        return wire.dump(run)

    def cgroup(self, name: str) -> str:
        """pymachined makes a machine's group under its own, by the root's scope."""
        return self.layout.cgroup_name(name)

    def output(
        self, name: str, lines: int | None, since: float | None, follow: bool
    ) -> Iterator[LogLine] | None:
        """The machine's console log as pymachined captured it (the rotated
        part first), each line stamped with the time it came."""
        return console_output(console_log(self.layout, name), lines, since, follow)

    def events(self, since: float | None) -> list[dict[str, Any]]:
        """None beyond pymachine's event log: pymachined writes its own there."""
        return []

    def settled(self) -> None:
        """Nothing: pymachined has no unit of the boot apply."""

    def commit(self, autostart: Mapping[str, bool], reload: bool) -> None:
        """Nothing: pymachined runs machines from their run specs, not unit files."""

    def ready(self) -> None:
        """Nothing: no unit waits for an apply under pymachined."""

    def start(self, spec: RunSpec) -> Status:
        """Start a machine and wait until its payload runs (a first start with a
        user namespace shifts the root first), it ends, or MACHINE_START_TIMEOUT passes,
        as `systemctl start` waits for nspawn's READY=1 under systemd."""
        status = self.request(messages.Start(spec), messages.Changed).status
        if status.state is not RunState.STARTING:
            return status
        return self._wait(
            spec.name, lambda s: s.state is not RunState.STARTING, MACHINE_START_TIMEOUT
        )

    def restart(self, spec: RunSpec) -> Status:
        """Stop a machine, then start it with spec."""
        self.stop(spec.name)
        return self.start(spec)

    def _wait(self, name: str, done: Callable[[Status], bool], timeout: float) -> Status:
        """The machine's status once done(status), or when timeout passes."""
        deadline = time.monotonic() + timeout
        with self._poll:
            self._waited[name] = self._waited.get(name, 0) + 1
        try:
            while True:
                status = self._next_status(name)
                if done(status) or time.monotonic() > deadline:
                    return status
        finally:
            with self._poll:
                self._waited[name] -= 1
                if not self._waited[name]:
                    del self._waited[name]

    def _next_status(self, name: str) -> Status:
        """name's status as a poll begun after this call saw it. One waiting
        thread asks pymachined for every machine being waited on, at most once
        per POLL_INTERVAL, and the others take their answer from it: an apply
        starting many machines sends one request a round, not one per machine."""
        with self._poll:
            # A poll under way may have asked before this call: the next one.
            wanted = self._polls + (2 if self._polling else 1)
            while self._polls < wanted:
                if self._polling:
                    self._poll.wait()
                    continue
                self._polling = True
                names = tuple(self._waited)
                pause = self._polled_at + POLL_INTERVAL - time.monotonic()
                self._poll.release()
                try:
                    if pause > 0:
                        time.sleep(pause)
                    request = messages.ListStatus(names=names)
                    reply = self.request(request, messages.Statuses)
                finally:
                    self._poll.acquire()
                    self._polling = False
                    self._poll.notify_all()  # on a failure too: another thread polls
                self._polled = {status.name: status for status in reply.machines}
                self._polls += 1
                self._polled_at = time.monotonic()
            return self._polled.get(name, Status(name, RunState.EXITED))

    def _wait_stopped(self, name: str, timeout: float) -> Status:
        status = self._wait(name, lambda s: s.pid is None, timeout)
        if status.pid is not None:
            raise PymachineError(f"{name} did not stop within {timeout:g} s")
        return status

    def stop(self, name: str) -> Status:
        """Stop a machine and wait until its process is gone."""
        reply = self.request(messages.Stop(name), messages.Changed)
        # pymachined SIGKILLs the machine after its stop_timeout: wait that, and a margin.
        return self._wait_stopped(name, reply.stop_timeout + 10)

    def forget(self, name: str) -> None:
        """Stop a machine if needed and drop it from pymachined."""
        if name not in self.status():
            return
        reply = self.request(messages.Stop(name, "forget"), messages.Changed)
        self._wait_stopped(name, reply.stop_timeout + 10)

    def pause(self, name: str, paused: bool) -> Status:
        """Freeze or thaw a running machine."""
        request = messages.Pause(name, "pause" if paused else "unpause")
        return self.request(request, messages.Changed).status

    def set_limits(self, name: str, limits: Limits) -> list[str]:
        """Write a machine's new limits into its cgroups, and keep them for its
        restarts; what this host cannot limit, as messages."""
        return list(self.request(messages.SetLimits(name, limits), messages.Changed).skipped)


def console_output(
    path: Path, lines: int | None, since: float | None, follow: bool
) -> Iterator[LogLine] | None:
    """A console log's lines (its rotated part first), and with follow the
    lines written next, across rotations; None if neither part exists."""
    rotated = Path(rotated_log(PurePosixPath(path)))
    if not path.exists() and not rotated.exists():
        return None
    # Stamps and the boundary share one fixed format, so they compare as text.
    boundary = (
        datetime.fromtimestamp(since, UTC).strftime(LOG_TIME_FORMAT) if since is not None else None
    )

    def kept(line: str) -> Iterator[LogLine]:
        stamp, text = parse_log_line(line)
        if boundary is None or (stamp is not None and stamp >= boundary):
            yield LogLine(stamp, text)

    def read(source: Path) -> Iterator[str]:
        # The stamper writes whole lines: one without its newline at the end
        # is being written now, and is read whole next time.
        try:
            with source.open(errors="replace") as handle:
                yield from (line for line in handle if line.endswith("\n"))
        except FileNotFoundError:
            return

    def generate() -> Iterator[LogLine]:
        # The rotated part first: the two are the machine's output in order.
        both = itertools.chain(read(rotated), read(path))
        for line in both if lines is None else deque(both, maxlen=lines):
            yield from kept(line)
        if follow:
            yield from _follow(path, kept)

    return generate()


def _last_line_end(path: Path, size: int, window: int = 1 << 16) -> int:
    """The offset just past the last newline in a log's first ``size`` bytes
    (``size`` itself when the last ``window`` bytes hold none)."""
    start = max(0, size - window)
    with path.open("rb") as raw:
        raw.seek(start)
        data = raw.read(size - start)
    found = data.rfind(b"\n")
    if found >= 0:
        return start + found + 1
    return 0 if start == 0 else size


def _follow(path: Path, kept: Callable[[str], Iterator[LogLine]]) -> Iterator[LogLine]:
    """The lines written to a console log from now on, across its rotations."""
    handle = path.open(errors="replace")
    # From the end of the last whole line: one being written is read whole.
    handle.seek(_last_line_end(path, os.fstat(handle.fileno()).st_size))
    pending = ""  # a line being written: shown once it is whole
    try:
        while True:
            line = handle.readline()
            if line:
                pending += line
                if pending.endswith("\n"):
                    yield from kept(pending)
                    pending = ""
                    continue
            try:
                renamed = path.stat().st_ino != os.fstat(handle.fileno()).st_ino
            except FileNotFoundError:
                renamed = False  # between the rename and the next line
            if renamed:  # rotated: the rest of the old file, then on to the new one
                for rest in handle:
                    pending += rest
                    if pending.endswith("\n"):
                        yield from kept(pending)
                        pending = ""
                pending = ""  # a rotated file is whole: what is left is no line
                handle.close()
                handle = path.open(errors="replace")
            else:
                time.sleep(0.2)
    finally:
        handle.close()
