"""pymachined's event loop: a Unix socket for requests (one JSON line in, one
JSON line out), a pidfd per running machine that becomes readable when the
machine's systemd-nspawn exits, and timers for restarts, stop timeouts and
OOM polls. What a machine's process and cgroups undergo goes through its
``Launcher``, what becomes of an exit is ``policy.decide``, and its record is
kept by ``Store``. Touches the system.

Each machine runs in its own cgroups with its declared limits; the loop wakes
every second or so while machines run to record OOM kills as ``oom`` events.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, assert_never

from pymachined import events, files
from pymachined.core.layout import Layout
from pymachined.core.limits import Limits
from pymachined.errors import PymachineError
from pymachined.supervise import messages
from pymachined.supervise.base import SOCKET, RunSpec, RunState, Status, read_line
from pymachined.supervise.daemon import policy
from pymachined.supervise.daemon.launcher import Launcher, NspawnLauncher, Process
from pymachined.supervise.daemon.store import Machine, Store

log = logging.getLogger("pymachined")

OOM_POLL = 1.0  # seconds between looks at the running machines' OOM kill counters


class Daemon:
    """The builtin supervisor's event loop."""

    def __init__(
        self,
        layout: Layout,
        launcher: Launcher | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.layout = layout
        self.run_dir = Path(layout.run_dir)
        self.store = Store(self.run_dir / "supervisor")
        self.launcher: Launcher = launcher or NspawnLauncher(layout)
        self.monotonic = monotonic  # timers: restarts, stop timeouts, OOM polls
        self.wall = wall  # start times, kept on disk
        self.machines: dict[str, Machine] = {}
        self.selector = selectors.DefaultSelector()
        self.stopping = False
        self.oom_checked = 0.0
        self.broken: dict[str, str] = {}  # machines whose records cannot be read, and why

    def status(self, machine: Machine) -> Status:
        """A machine's status as the interface reports it: ``starting`` while
        its nspawn still sets it up (shifting its root to a user namespace's
        ids takes seconds at a first start), ``running`` once its payload runs."""
        state = machine.state
        if state is RunState.RUNNING and machine.pid is not None and not machine.payload_up:
            machine.payload_up = self.launcher.payload_running(machine.pid)
            state = RunState.RUNNING if machine.payload_up else RunState.STARTING
        spec = machine.spec
        return Status(
            spec.name, state, machine.pid, machine.started, machine.exit_code, machine.restarts
        )

    # -- persistence -------------------------------------------------------

    def adopt(self) -> None:
        """Take over the machines recorded by an earlier pymachined."""
        machines, self.broken = self.store.load()
        for machine in machines:
            self.machines[machine.spec.name] = machine
            process = None
            if machine.pid is not None:
                process = self.launcher.adopt(machine.pid, machine.pid_start)
            if process is not None:
                log.info("adopted %s (pid %d)", machine.spec.name, process.pid)
                machine.oom_kills = self.launcher.oom_kills(machine.spec.name) or 0
                self._watch(machine, process)
                continue
            if machine.state in (RunState.RUNNING, RunState.PAUSED, RunState.RESTARTING):
                # It ended while nobody watched: its exit code is unknown.
                self._guarded(self._clear, machine)
                self._guarded(self._exited, machine, None)

    def _drop(self, name: str) -> None:
        self.machines.pop(name, None)
        self.store.drop(name)

    # -- running -----------------------------------------------------------

    def _watch(self, machine: Machine, process: Process) -> None:
        machine.process = process
        self.selector.register(process.pidfd, selectors.EVENT_READ, machine)

    def launch(self, machine: Machine) -> None:
        """Start a machine's process now."""
        spec = machine.spec
        machine.oom_kills = 0
        process = self.launcher.launch(spec)
        machine.pid = process.pid
        machine.pid_start = process.pid_start
        machine.started = self.wall()
        machine.state = RunState.RUNNING
        machine.payload_up = False
        machine.exit_code = None
        machine.restart_at = None
        self._watch(machine, process)
        self.store.save(machine)
        self._event(spec.name, "start", pid=process.pid, restarts=machine.restarts)
        log.info("started %s (pid %d)", spec.name, process.pid)

    def _reap(self, machine: Machine) -> int | None:
        process, machine.process = machine.process, None
        if process is None:
            return None
        self.selector.unregister(process.pidfd)
        return self.launcher.reap(process)

    def _clear(self, machine: Machine) -> None:
        """Once a machine's nspawn has ended: record its OOM kills, then kill
        what it left in its groups and remove them."""
        self._check_oom(machine)
        left = self.launcher.clear(machine.spec.name)
        if left:
            log.info("%s: killed %d process(es) its nspawn left behind", machine.spec.name, left)

    def _exited(self, machine: Machine, code: int | None) -> None:
        ran = self.wall() - (machine.started or self.wall())
        machine.exit_code = code
        machine.pid = None
        machine.pid_start = None
        machine.kill_at = None
        decision = policy.decide(machine.spec.restart, machine.wanted, code, ran, machine.failures)
        # A stop asked for ends as a stop, with the payload's own exit code (0
        # for one that handles its stop signal); any other end is a death.
        self._event(machine.spec.name, decision.event, exit_code=code)
        machine.failures = decision.failures
        if decision.outcome is policy.Outcome.DEAD:
            machine.state = RunState.DEAD
            self._event(machine.spec.name, "dead", exit_code=code)
            log.info(
                "%s exited (%s) %d times in a row; giving up",
                machine.spec.name,
                code,
                policy.START_LIMIT + 1,
            )
        elif decision.outcome is policy.Outcome.RESTART and decision.delay is not None:
            machine.state = RunState.RESTARTING
            machine.restart_at = self.monotonic() + decision.delay
            self._event(machine.spec.name, "restart", delay=decision.delay)
            log.info(
                "%s exited (%s); restarting in %.1f s", machine.spec.name, code, decision.delay
            )
        else:
            machine.state = RunState.EXITED
            log.info("%s exited (%s)", machine.spec.name, code)
        if machine.forgotten:
            self._drop(machine.spec.name)
        else:
            self.store.save(machine)

    def _event(self, name: str, event: str, **fields: Any) -> None:
        """Record a lifecycle event; a failure to (a full disk) is logged, and
        never stops supervision."""
        try:
            events.record(self.layout, name, event, **fields)
        except OSError as exc:
            log.error("%s: cannot record event %s: %s", name, event, exc)

    def _guarded(self, step: Callable[..., None], *args: Any) -> None:
        """One step of the event loop; an error in it is logged, and the
        supervisor carries on with the other machines."""
        try:
            step(*args)
        except Exception:
            log.exception("%s failed", getattr(step, "__name__", "a step"))

    def _signal(self, machine: Machine, sig: int) -> None:
        if machine.process is not None:
            self.launcher.signal(machine.process, sig)

    def on_exit(self, machine: Machine) -> None:
        """A machine's process ended. What it left is killed before its exit is
        read: a payload that outlived its nspawn (SIGKILLed at the stop timeout)
        holds the log's pipe open, and the log's filter, waited on in the reap,
        ends only once the pipe closes."""
        self._clear(machine)
        self._exited(machine, self._reap(machine))

    def _check_oom(self, machine: Machine) -> None:
        """Record an ``oom`` event if the kernel killed a process of the machine."""
        kills = self.launcher.oom_kills(machine.spec.name)
        if kills is not None and kills > machine.oom_kills:
            events.record(
                self.layout, machine.spec.name, "oom", kills=kills - machine.oom_kills, total=kills
            )
            log.info("%s: the OOM killer killed %d process(es)", machine.spec.name, kills)
            machine.oom_kills = kills

    def _relaunch(self, machine: Machine) -> None:
        """Start a machine again by its restart policy, its bind sources mounted
        afresh; a failure leaves it dead."""
        machine.restarts += 1
        try:
            self.launcher.stage_binds(machine.spec)
            self.launch(machine)
        except (OSError, PymachineError) as exc:
            log.error("%s: cannot restart: %s", machine.spec.name, exc)
            machine.state = RunState.DEAD
            machine.restart_at = None
            self._event(machine.spec.name, "dead", error=str(exc))
            self.store.save(machine)

    def tick(self) -> None:
        """Restarts and kills that are due, and OOM kills to record."""
        now = self.monotonic()
        if now - self.oom_checked >= OOM_POLL:
            self.oom_checked = now
            for machine in self.machines.values():
                if machine.pid is not None:
                    self._check_oom(machine)
        for machine in list(self.machines.values()):
            if machine.restart_at is not None and now >= machine.restart_at:
                self._relaunch(machine)
            if machine.kill_at is not None and now >= machine.kill_at and machine.pid:
                self._signal(machine, signal.SIGKILL)
                machine.kill_at = None

    def next_deadline(self) -> float | None:
        """Seconds until the loop must wake, or None to sleep until a request."""
        deadlines = [
            t for m in self.machines.values() for t in (m.restart_at, m.kill_at) if t is not None
        ]
        if any(m.pid is not None for m in self.machines.values()):
            deadlines.append(self.oom_checked + OOM_POLL)
        return max(0.0, min(deadlines) - self.monotonic()) if deadlines else None

    # -- requests ----------------------------------------------------------

    def handle(self, request: messages.Request) -> messages.Reply:
        """One request: ping, status, start, stop, forget, pause, unpause, limits."""
        match request:
            case messages.Ping():
                return messages.Pong(os.getpid())
            case messages.ListStatus(names=names):
                wanted = None if names is None else set(names)
                broken = [
                    Status(name, RunState.UNKNOWN, detail=why)
                    for name, why in sorted(self.broken.items())
                    if name not in self.machines and (wanted is None or name in wanted)
                ]
                return messages.Statuses(
                    tuple(
                        self.status(m)
                        for name, m in self.machines.items()
                        if wanted is None or name in wanted
                    )
                    + tuple(broken)
                )
            case messages.Start(spec=spec):
                return self._start(spec)
            case messages.Stop(name=name):
                return self._stop(name, forget=request.forget)
            case messages.Pause(name=name):
                return self._pause(name, request.paused)
            case messages.SetLimits(name=name, limits=limits):
                return self._set_limits(name, limits)
            case _:
                assert_never(request)

    def _start(self, spec: RunSpec) -> messages.Reply:
        machine = self.machines.get(spec.name)
        if machine is not None and machine.pid is not None:
            return messages.Failed(f"{spec.name} is running; stop it first")
        if machine is None and spec.name in self.broken:
            return messages.Failed(
                f"the record of {spec.name} cannot be read: {self.broken[spec.name]}"
            )
        machine = Machine(spec, restarts=machine.restarts if machine else 0)
        self.machines[spec.name] = machine
        self.launch(machine)
        return messages.Changed(self.status(machine))

    def _stop(self, name: str, *, forget: bool) -> messages.Reply:
        machine = self.machines.get(name)
        if machine is None:
            if name in self.broken:
                # What its record would have said is lost: end whatever runs in its cgroups.
                self.launcher.clear(name)
                if forget:
                    del self.broken[name]
                    self.store.drop(name)
            elif forget:
                return _unknown(name)
            # Else never started here (since a reboot): stopped.
            return messages.Changed(Status(name, RunState.EXITED))
        if machine.state is RunState.PAUSED:
            self.launcher.freeze(name, False)  # a frozen process cannot act on SIGTERM
        if machine.pid is None:
            self._event(name, "stop")  # else when it has exited, with its exit code
        machine.wanted = "stopped"
        machine.restart_at = None
        if machine.pid is not None:
            self._signal(machine, signal.SIGTERM)
            machine.kill_at = self.monotonic() + machine.spec.stop_timeout
        elif machine.state is RunState.RESTARTING:
            machine.state = RunState.EXITED
        machine.forgotten = forget
        if machine.forgotten and machine.pid is None:
            self._drop(name)
        else:
            self.store.save(machine)
        return messages.Changed(self.status(machine), stop_timeout=machine.spec.stop_timeout)

    def _pause(self, name: str, paused: bool) -> messages.Reply:
        machine = self.machines.get(name)
        if machine is None:
            return _unknown(name)
        if machine.pid is None:
            return messages.Failed(f"{name} is not running")
        self.launcher.freeze(name, paused)
        machine.state = RunState.PAUSED if paused else RunState.RUNNING
        self._event(name, "pause" if paused else "unpause")
        self.store.save(machine)
        return messages.Changed(self.status(machine))

    def _set_limits(self, name: str, limits: Limits) -> messages.Reply:
        machine = self.machines.get(name)
        if machine is None:
            return _unknown(name)
        machine.spec = dataclasses.replace(machine.spec, limits=limits)
        self.store.save(machine)
        skipped: list[str] = []
        if machine.pid is not None:
            skipped = self.launcher.set_limits(name, machine.spec.limits)
        return messages.Changed(self.status(machine), skipped=tuple(skipped))

    def serve(self) -> None:
        """Run until SIGTERM or SIGINT."""
        path = self.run_dir / SOCKET
        path.unlink(missing_ok=True)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(path))
        path.chmod(0o600)
        # Every thread of an apply may ask at once (its start pool is 64): a
        # full backlog fails a client's connect with EAGAIN.
        server.listen(socket.SOMAXCONN)
        self.selector.register(server, selectors.EVENT_READ, None)
        # A signal handler alone would not wake select(), which Python retries
        # after EINTR: the signal also writes a byte to this socket pair.
        wake_read, wake_write = socket.socketpair()
        wake_read.setblocking(False)
        wake_write.setblocking(False)
        signal.set_wakeup_fd(wake_write.fileno())
        self.selector.register(wake_read, selectors.EVENT_READ, "wake")
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: setattr(self, "stopping", True))
        self.adopt()
        log.info("pymachined %d serving %s", os.getpid(), path)
        notify("READY=1")
        while not self.stopping:
            for key, _ in self.selector.select(self.next_deadline()):
                if key.data is None:
                    self._answer(server)
                elif key.data == "wake":
                    with contextlib.suppress(BlockingIOError):
                        wake_read.recv(4096)
                else:
                    self._guarded(self.on_exit, key.data)
            self._guarded(self.tick)
        notify("STOPPING=1")
        server.close()
        path.unlink(missing_ok=True)

    def _answer(self, server: socket.socket) -> None:
        connection, _ = server.accept()
        with connection:
            connection.settimeout(5)
            reply = self.answer(read_line(connection))
            with contextlib.suppress(OSError):
                connection.sendall(messages.encode(reply))

    def answer(self, line: bytes) -> messages.Reply:
        """The reply to one request line; a request that cannot be read, or
        that fails, is refused with why, and the supervisor goes on."""
        try:
            request = messages.decode_request(line)
        except ValueError as exc:
            return messages.Failed(f"a request pymachined cannot read: {exc}")
        try:
            return self.handle(request)
        except PymachineError as exc:
            return messages.Failed(exc.message, exc.hint)
        except Exception as exc:  # a failed request must not stop the supervisor
            log.exception("request failed")
            return messages.Failed(f"{type(exc).__name__}: {exc}")


def _unknown(name: str) -> messages.Failed:
    return messages.Failed(f"no machine {name!r} is supervised")


def notify(state: str) -> None:
    """Tell the service manager how pymachined is (sd_notify), when it runs as a
    Type=notify service; nothing without $NOTIFY_SOCKET."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    from systemd import daemon as sd_daemon

    sd_daemon.notify(state)


def main(argv: list[str] | None = None) -> int:
    """Run pymachined in the foreground."""
    parser = argparse.ArgumentParser(
        prog="pymachined",
        description="Supervise pymachine's machines on hosts without systemd as PID 1. "
        "`pymachine apply` starts it when needed.",
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=Path(os.environ.get("PYMACHINE_ROOT", "/")),
        help="keep all state under this directory instead of /",
    )
    parser.add_argument("--debug", action="store_true", help="log every event")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s pymachined: %(message)s",
        stream=sys.stderr,
    )
    layout = files.host_layout(args.root)
    run_dir = Path(layout.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with files.locked(run_dir / "pymachined.lock", timeout=0):
            Daemon(layout).serve()
    except PymachineError as error:
        print(f"pymachined: {error.message}", file=sys.stderr)
        return 1
    return 0
