"""How pymachined runs machines: systemd-nspawn in the machine's cgroups, the
filter that stamps its console log, pidfds, and adopting the processes of an
earlier pymachined. Everything the daemon does to processes and cgroups goes
through a ``Launcher``; ``NspawnLauncher`` is the real one. Touches the system.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess  # for the Popen type of children
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Protocol

from pymachined import files, procs, run
from pymachined.cgroups import MachineCgroup
from pymachined.core import commands, parsers
from pymachined.core.layout import Layout
from pymachined.core.limits import Limits
from pymachined.supervise.base import RunSpec
from pymachined.supervise.daemon import policy

log = logging.getLogger("pymachined")


@dataclass
class Process:
    """A machine's running systemd-nspawn: its pid and start time, a pidfd that
    becomes readable when it exits, and (if pymachined started it rather than
    adopted it) its Popen and its log stamper's."""

    pid: int
    pid_start: int | None
    pidfd: int
    log: str | None = None  # the console log, if pymachined started it
    child: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    stamper: subprocess.Popen[bytes] | None = field(default=None, repr=False)


class Launcher(Protocol):
    """What the daemon does to a machine's processes and cgroups."""

    def launch(self, spec: RunSpec) -> Process:
        """Start a machine's process now, in fresh cgroups with its limits."""
        ...

    def adopt(self, pid: int, pid_start: int | None) -> Process | None:
        """The recorded process if it still runs with its recorded start time."""
        ...

    def reap(self, process: Process) -> int | None:
        """The exit code of a process that has ended (None if it was adopted:
        not our child, so its exit code is lost); closes its pidfd."""
        ...

    def signal(self, process: Process, sig: int) -> None:
        """Send a signal to a machine's nspawn."""
        ...

    def payload_running(self, pid: int) -> bool:
        """Whether the machine of nspawn ``pid`` runs its payload yet."""
        ...

    def stage_binds(self, spec: RunSpec) -> None:
        """Mount a machine's bind sources afresh, before a restart."""
        ...

    def set_limits(self, name: str, limits: Limits) -> list[str]:
        """Write a running machine's limits; the ones not applied, and why."""
        ...

    def freeze(self, name: str, frozen: bool) -> None:
        """Freeze or thaw a machine's processes."""
        ...

    def oom_kills(self, name: str) -> int | None:
        """How many of a machine's processes the OOM killer has killed."""
        ...

    def clear(self, name: str) -> int:
        """SIGKILL whatever is left in a machine's cgroups and remove them; how
        many processes were killed."""
        ...


class NspawnLauncher:
    """Machines as systemd-nspawn processes in cgroups scoped by the root."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    def _cgroup(self, name: str) -> MachineCgroup:
        return MachineCgroup(name, self.layout.cgroup_name(name))

    def launch(self, spec: RunSpec) -> Process:
        """Start a machine's process now, in fresh cgroups with its limits."""
        Path(spec.log).parent.mkdir(parents=True, exist_ok=True)
        group = self._cgroup(spec.name)
        group.remove()  # left by an earlier run of the machine, if any
        entries = group.create()
        for problem in group.set_limits(spec.limits):
            log.warning("%s: a limit is not applied: %s", spec.name, problem)
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
            stamper = run.spawn(
                commands.log_stamp_argv(),
                sys.stderr.fileno(),
                stdin=read_end,
                environment=commands.log_stamp_environment(log_path, spec.log_max, size),
            )
            child = run.spawn(argv, write_end)
        finally:
            os.close(read_end)
            os.close(write_end)
        return Process(
            child.pid,
            procs.process_start_time(child.pid),
            os.pidfd_open(child.pid),
            log=spec.log,
            child=child,
            stamper=stamper,
        )

    def adopt(self, pid: int, pid_start: int | None) -> Process | None:
        """The recorded process if it still runs with its recorded start time."""
        # The pidfd first: checked after, the start time proves it is the
        # recorded process, not one that got its pid since.
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return None
        if pid_start is None or procs.process_start_time(pid) != pid_start:
            os.close(pidfd)
            return None
        return Process(pid, pid_start, pidfd)

    def reap(self, process: Process) -> int | None:
        """The exit code of a process that has ended (None if it was adopted:
        not our child, so its exit code is lost); closes its pidfd."""
        os.close(process.pidfd)
        if process.stamper is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.stamper.wait(timeout=2)  # it reads what is left, then ends
            process.stamper = None
        if process.child is None:
            return None
        code = process.child.wait()
        process.child = None
        killed = None
        if code == 1 and process.log is not None:  # nspawn's exit when a signal killed the payload
            killed = parsers.parse_payload_signal(_log_tail(Path(process.log)))
        return policy.exit_code(code, killed)

    def signal(self, process: Process, sig: int) -> None:
        """Signal a machine's nspawn through its pidfd: an adopted one is not our
        child, so its pid may be reused as soon as it exits."""
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(process.pidfd, sig)

    def payload_running(self, pid: int) -> bool:
        """Whether the machine of nspawn ``pid`` runs its payload yet."""
        leader = procs.leader_pid(pid)
        return leader is not None and procs.payload_running(pid, leader)

    def stage_binds(self, spec: RunSpec) -> None:
        """Mount a machine's bind sources afresh, as a unit's ExecStartPre does
        under systemd."""
        files.stage_binds(self.layout, spec.name, spec.binds)

    def set_limits(self, name: str, limits: Limits) -> list[str]:
        """Write a running machine's limits; the ones not applied, and why."""
        return self._cgroup(name).set_limits(limits)

    def freeze(self, name: str, frozen: bool) -> None:
        """Freeze or thaw a machine's processes."""
        self._cgroup(name).freeze(frozen)

    def oom_kills(self, name: str) -> int | None:
        """How many of a machine's processes the OOM killer has killed."""
        return self._cgroup(name).oom_kills()

    def clear(self, name: str) -> int:
        """SIGKILL whatever is left in a machine's cgroups and remove them; how
        many processes were killed."""
        group = self._cgroup(name)
        left = group.kill_all()
        group.remove()
        return left


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
