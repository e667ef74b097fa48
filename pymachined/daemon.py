"""pymachined: the supervisor for hosts without systemd as PID 1.

One process, one event loop: a Unix socket for requests (one JSON line in, one
JSON line out), and a pidfd per running machine that becomes readable when the
machine's systemd-nspawn exits. Each machine's spec and state is kept in
``<run>/supervisor/<name>.json`` (atomically rewritten on every change), so a
new pymachined adopts the machines an earlier one started without restarting
them: it checks that the recorded pid still runs and started when recorded.
Machines are started in their own sessions and outlive pymachined.

Restart policies: ``no``, ``on-failure`` (a non-zero or unknown exit code),
``always``; with backoff from 0.2 s doubling to 10 s, reset by 10 s of running.
A machine that exits more than five times in a row without running 10 s is
``dead``: no more restarts until it is started again.

Each machine runs in its own cgroups with its declared limits; the loop wakes
every second or so while machines run to record OOM kills as ``oom`` events.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import selectors
import signal
import socket
import subprocess  # for the Popen type of children
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from pymachined import commands, events, files, parsers, procs, run
from pymachined.cgroups import MachineCgroup
from pymachined.errors import PymachineError
from pymachined.layout import Layout
from pymachined.limits import Limits
from pymachined.supervise.base import SOCKET, RunSpec, RunState, Status, read_line

log = logging.getLogger("pymachined")

BACKOFF_FIRST = 0.2
BACKOFF_MAX = 10.0
HEALTHY_AFTER = 10.0
START_LIMIT = 5  # quick exits in a row before a machine is dead, as systemd's StartLimitBurst
OOM_POLL = 1.0  # seconds between looks at the running machines' OOM kill counters


@dataclass
class Machine:
    """One supervised machine: its spec and what became of it."""

    spec: RunSpec
    wanted: str = "running"
    state: RunState = RunState.CREATED
    pid: int | None = None
    pid_start: int | None = None
    started: float | None = None
    exit_code: int | None = None
    restarts: int = 0
    failures: int = 0
    forgotten: bool = False
    restart_at: float | None = None
    kill_at: float | None = None
    oom_kills: int = 0
    payload_up: bool = False  # its PID 1 was seen to have become its payload
    pidfd: int | None = field(default=None, repr=False)
    child: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    stamper: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def status(self) -> Status:
        """The machine's status as the interface reports it: ``starting`` while
        its nspawn still sets it up (shifting its root to a user namespace's
        ids takes seconds at a first start), ``running`` once its payload runs."""
        state = self.state
        if state is RunState.RUNNING and self.pid is not None and not self.payload_up:
            leader = procs.leader_pid(self.pid)
            self.payload_up = leader is not None and procs.payload_running(self.pid, leader)
            state = RunState.RUNNING if self.payload_up else RunState.STARTING
        return Status(self.spec.name, state, self.pid, self.started, self.exit_code, self.restarts)

    def as_json(self) -> dict[str, Any]:
        """What is kept on disk."""
        return {
            "spec": self.spec.as_json(),
            "wanted": self.wanted,
            "state": self.state.value,
            "pid": self.pid,
            "pid_start": self.pid_start,
            "started": self.started,
            "exit_code": self.exit_code,
            "restarts": self.restarts,
            "forgotten": self.forgotten,
        }


class Daemon:
    """The builtin supervisor's event loop."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.run_dir = Path(layout.run_dir)
        self.records = self.run_dir / "supervisor"
        self.machines: dict[str, Machine] = {}
        self.selector = selectors.DefaultSelector()
        self.stopping = False
        self.oom_checked = 0.0
        self.broken: dict[str, str] = {}  # machines whose records cannot be read, and why

    def _cgroup(self, name: str) -> MachineCgroup:
        """A machine's cgroups, scoped by the root."""
        return MachineCgroup(name, self.layout.cgroup_name(name))

    # -- persistence -------------------------------------------------------

    def save(self, machine: Machine) -> None:
        files.atomic_write_json(self.records / f"{machine.spec.name}.json", machine.as_json())

    def adopt(self) -> None:
        """Take over the machines recorded by an earlier pymachined."""
        self.records.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.records.glob("*.json")):
            try:
                data = json.loads(path.read_text())
                machine = Machine(
                    spec=RunSpec.from_json(data["spec"]),
                    wanted=data.get("wanted", "running"),
                    state=RunState(data.get("state", "created")),
                    pid=data.get("pid"),
                    pid_start=data.get("pid_start"),
                    started=data.get("started"),
                    exit_code=data.get("exit_code"),
                    restarts=int(data.get("restarts", 0)),
                    forgotten=bool(data.get("forgotten", False)),
                )
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                # Kept, and reported as unknown: the machine may still run,
                # and starting it again over its record would run it twice.
                log.error("unreadable supervisor record %s: %s", path, exc)
                self.broken[path.stem] = f"{path}: {exc}"
                continue
            self.machines[machine.spec.name] = machine
            # The pidfd first: checked after, the start time proves it is the
            # recorded process, not one that got its pid since.
            pidfd = None
            if machine.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    pidfd = os.pidfd_open(machine.pid)
            alive = (
                pidfd is not None
                and machine.pid is not None
                and machine.pid_start is not None
                and procs.process_start_time(machine.pid) == machine.pid_start
            )
            if alive and pidfd is not None and machine.pid is not None:
                log.info("adopted %s (pid %d)", machine.spec.name, machine.pid)
                machine.oom_kills = self._cgroup(machine.spec.name).oom_kills() or 0
                machine.pidfd = pidfd
                self.selector.register(pidfd, selectors.EVENT_READ, machine)
                continue
            if pidfd is not None:
                os.close(pidfd)
            if machine.state in (RunState.RUNNING, RunState.PAUSED, RunState.RESTARTING):
                # It ended while nobody watched: its exit code is unknown.
                self._guarded(self._exited, machine, None)

    # -- running -----------------------------------------------------------

    def _watch(self, machine: Machine, pid: int) -> None:
        machine.pidfd = os.pidfd_open(pid)
        self.selector.register(machine.pidfd, selectors.EVENT_READ, machine)

    def launch(self, machine: Machine) -> None:
        """Start a machine's process now."""
        spec = machine.spec
        Path(spec.log).parent.mkdir(parents=True, exist_ok=True)
        group = self._cgroup(spec.name)
        group.remove()  # left by an earlier run of the machine, if any
        entries = group.create()
        for problem in group.set_limits(spec.limits):
            log.warning("%s: a limit is not applied: %s", spec.name, problem)
        machine.oom_kills = 0
        argv = commands.cgroup_enter_argv([PurePosixPath(p) for p in entries], spec.argv)
        # The machine writes into a pipe, and a filter in a session of its own
        # stamps each line with the time into the log: both outlive pymachined,
        # and the filter ends when the machine closes the pipe.
        read_end, write_end = os.pipe()
        try:
            log_path = PurePosixPath(spec.log)
            with contextlib.suppress(FileNotFoundError):
                if Path(log_path).stat().st_size >= spec.log_max:
                    Path(log_path).replace(Path(commands.rotated_log(log_path)))
            with open(spec.log, "ab") as output:  # noqa: PTH123 - the log's size after the line
                stamp = time.strftime(commands.LOG_TIME_FORMAT, time.gmtime())
                output.write(f"{stamp} {parsers.STARTING_MARK}{spec.name}\n".encode())
                output.flush()
                size = os.fstat(output.fileno()).st_size
            # The filter writes the log itself, by name; its own errors go
            # to pymachined's log.
            stamper = commands.log_stamp_argv(log_path, spec.log_max, size)
            machine.stamper = run.spawn(stamper, sys.stderr.fileno(), stdin=read_end)
            child = run.spawn(argv, write_end)
        finally:
            os.close(read_end)
            os.close(write_end)
        machine.child = child
        machine.pid = child.pid
        machine.pid_start = procs.process_start_time(child.pid)
        machine.started = time.time()
        machine.state = RunState.RUNNING
        machine.payload_up = False
        machine.exit_code = None
        machine.restart_at = None
        self._watch(machine, child.pid)
        self.save(machine)
        self._event(spec.name, "start", pid=child.pid, restarts=machine.restarts)
        log.info("started %s (pid %d)", spec.name, child.pid)

    def _reap(self, machine: Machine) -> int | None:
        if machine.pidfd is not None:
            self.selector.unregister(machine.pidfd)
            os.close(machine.pidfd)
            machine.pidfd = None
        if machine.stamper is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                machine.stamper.wait(timeout=2)  # it reads what is left, then ends
            machine.stamper = None
        if machine.child is not None:
            code = machine.child.wait()
            machine.child = None
            if code == 1:  # nspawn's own exit when the payload was killed by a signal
                killed = parsers.parse_payload_signal(_log_tail(Path(machine.spec.log)))
                if killed is not None:
                    return 128 + killed
            return code if code >= 0 else 128 - code
        return None  # adopted: not our child, so its exit code is lost

    def _exited(self, machine: Machine, code: int | None) -> None:
        ran = time.time() - (machine.started or time.time())
        self._check_oom(machine)
        group = self._cgroup(machine.spec.name)
        left = group.kill_all()
        if left:
            log.info("%s: killed %d process(es) its nspawn left behind", machine.spec.name, left)
        group.remove()
        machine.exit_code = code
        machine.pid = None
        machine.pid_start = None
        machine.kill_at = None
        policy = machine.spec.restart
        again = machine.wanted == "running" and (
            policy == "always" or (policy == "on-failure" and code != 0)
        )
        # A stop asked for ends as a stop, with the payload's own exit code (0
        # for one that handles its stop signal); any other end is a death.
        stopped = machine.wanted == "stopped"
        self._event(machine.spec.name, "stop" if stopped else "die", exit_code=code)
        machine.failures = 0 if ran > HEALTHY_AFTER else machine.failures + 1
        if again and machine.failures > START_LIMIT:
            machine.state = RunState.DEAD
            self._event(machine.spec.name, "dead", exit_code=code)
            log.info(
                "%s exited (%s) %d times in a row; giving up",
                machine.spec.name,
                code,
                START_LIMIT + 1,
            )
        elif again:
            delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** max(0, machine.failures - 1))
            machine.state = RunState.RESTARTING
            machine.restart_at = time.monotonic() + delay
            self._event(machine.spec.name, "restart", delay=delay)
            log.info("%s exited (%s); restarting in %.1f s", machine.spec.name, code, delay)
        else:
            machine.state = RunState.EXITED
            log.info("%s exited (%s)", machine.spec.name, code)
        if machine.forgotten:
            self._drop(machine.spec.name)
        else:
            self.save(machine)

    def _drop(self, name: str) -> None:
        self.machines.pop(name, None)
        (self.records / f"{name}.json").unlink(missing_ok=True)

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

    @staticmethod
    def _signal(machine: Machine, sig: int) -> None:
        """Signal a machine's nspawn through its pidfd: an adopted one is not our
        child, so its pid may be reused as soon as it exits."""
        with contextlib.suppress(ProcessLookupError):
            if machine.pidfd is not None:
                signal.pidfd_send_signal(machine.pidfd, sig)
            elif machine.pid is not None:
                os.kill(machine.pid, sig)

    def on_exit(self, machine: Machine) -> None:
        """A machine's process ended."""
        self._exited(machine, self._reap(machine))

    def _check_oom(self, machine: Machine) -> None:
        """Record an ``oom`` event if the kernel killed a process of the machine."""
        kills = self._cgroup(machine.spec.name).oom_kills()
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
            # Its bind sources again, as a unit's ExecStartPre does under systemd.
            files.stage_binds(self.layout, machine.spec.name, machine.spec.binds)
            self.launch(machine)
        except (OSError, PymachineError) as exc:
            log.error("%s: cannot restart: %s", machine.spec.name, exc)
            machine.state = RunState.DEAD
            machine.restart_at = None
            self._event(machine.spec.name, "dead", error=str(exc))
            self.save(machine)

    def tick(self) -> None:
        """Restarts and kills that are due, and OOM kills to record."""
        now = time.monotonic()
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
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    # -- requests ----------------------------------------------------------

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """One request: status, start, stop, forget, pause, unpause, limits."""
        op = request.get("op")
        if op == "status":
            broken = [
                Status(name, RunState.UNKNOWN, detail=why).as_json()
                for name, why in sorted(self.broken.items())
                if name not in self.machines
            ]
            return {"machines": [m.status().as_json() for m in self.machines.values()] + broken}
        if op == "ping":
            return {"pid": os.getpid()}
        name = str(request.get("name", ""))
        if op == "start":
            spec = RunSpec.from_json(request["spec"])
            machine = self.machines.get(spec.name)
            if machine is not None and machine.pid is not None:
                return {"error": f"{spec.name} is running; stop it first"}
            if machine is None and spec.name in self.broken:
                return {
                    "error": f"the record of {spec.name} cannot be read: {self.broken[spec.name]}"
                }
            machine = Machine(spec, restarts=machine.restarts if machine else 0)
            self.machines[spec.name] = machine
            self.launch(machine)
            return {"status": machine.status().as_json()}
        machine = self.machines.get(name)
        if machine is None and name in self.broken and op in ("stop", "forget"):
            # What its record would have said is lost: end whatever runs in its cgroups.
            group = self._cgroup(name)
            group.kill_all()
            group.remove()
            if op == "forget":
                del self.broken[name]
                (self.records / f"{name}.json").unlink(missing_ok=True)
            return {"status": Status(name, RunState.EXITED).as_json(), "stop_timeout": 0}
        if machine is None and op == "stop":  # never started here (since a reboot): stopped
            return {"status": Status(name, RunState.EXITED).as_json(), "stop_timeout": 0}
        if machine is None:
            return {"error": f"no machine {name!r} is supervised"}
        if op == "limits":
            limits = Limits.from_json(request["limits"])
            machine.spec = dataclasses.replace(machine.spec, limits=limits)
            self.save(machine)
            skipped = []
            if machine.pid is not None:
                skipped = self._cgroup(name).set_limits(machine.spec.limits)
            return {"status": machine.status().as_json(), "skipped": skipped}
        if op in ("pause", "unpause"):
            if machine.pid is None:
                return {"error": f"{name} is not running"}
            self._cgroup(name).freeze(op == "pause")
            machine.state = RunState.PAUSED if op == "pause" else RunState.RUNNING
            self._event(name, op)
            self.save(machine)
            return {"status": machine.status().as_json()}
        if op in ("stop", "forget"):
            if machine.state is RunState.PAUSED:
                self._cgroup(name).freeze(False)  # a frozen process cannot act on SIGTERM
            if machine.pid is None:
                self._event(name, "stop")  # else when it has exited, with its exit code
            machine.wanted = "stopped"
            machine.restart_at = None
            if machine.pid is not None:
                self._signal(machine, signal.SIGTERM)
                machine.kill_at = time.monotonic() + machine.spec.stop_timeout
            elif machine.state is RunState.RESTARTING:
                machine.state = RunState.EXITED
            machine.forgotten = op == "forget"
            if machine.forgotten and machine.pid is None:
                self._drop(name)
            else:
                self.save(machine)
            return {"status": machine.status().as_json(), "stop_timeout": machine.spec.stop_timeout}
        return {"error": f"unknown request {op!r}"}

    def serve(self) -> None:
        """Run until SIGTERM or SIGINT."""
        path = self.run_dir / SOCKET
        path.unlink(missing_ok=True)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(path))
        path.chmod(0o600)
        server.listen(16)
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
            try:
                reply = self.handle(json.loads(read_line(connection)))
            except PymachineError as exc:
                reply = {"error": exc.message, "hint": exc.hint}
            except Exception as exc:  # a bad request must not stop the supervisor
                log.exception("request failed")
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            with contextlib.suppress(OSError):
                connection.sendall(json.dumps(reply).encode() + b"\n")


def _log_tail(path: Path, size: int = 4096) -> str:
    """The last bytes of a machine's console log (pymachine's own file, opened
    without following a symlink or waiting on a FIFO); '' if there is none."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        end = os.fstat(fd).st_size
        return os.pread(fd, size, max(0, end - size)).decode(errors="replace")
    finally:
        os.close(fd)


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


if __name__ == "__main__":
    raise SystemExit(main())
