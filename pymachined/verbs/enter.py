"""``exec`` and ``shell``: a command run in a running machine, confined as its
PID 1 is (by ``pymachined.enter`` in a child of this process). Edge."""

from __future__ import annotations

import os
import sys
import time

from pymachined import run
from pymachined.core import commands
from pymachined.core.layout import Layout
from pymachined.errors import PymachineError, UsageError
from pymachined.procs import leader_pid, payload_running
from pymachined.supervise.base import RunState, Supervisor
from pymachined.verbs.lifecycle import known

LEADER_TIMEOUT = 30.0  # for a machine that is starting to run its payload


def leader(layout: Layout, supervisor: Supervisor, name: str) -> int:
    """The host pid of a running machine's PID 1, once it runs the payload
    (waiting at most 30 s for a machine that is starting)."""
    known(layout, name)
    deadline = time.monotonic() + LEADER_TIMEOUT
    while True:
        status = supervisor.status().get(name)
        if status is not None and status.state == RunState.PAUSED:
            raise PymachineError(f"machine {name} is paused", hint=f"pymachine unpause {name}")
        if status is None or status.pid is None:
            raise PymachineError(f"machine {name} is not running", hint=f"pymachine start {name}")
        pid = leader_pid(status.pid)
        if pid is not None and payload_running(status.pid, pid):
            return pid
        if time.monotonic() > deadline:
            raise PymachineError(f"machine {name} is still starting after 30 s")
        time.sleep(0.1)  # nspawn is still preparing the machine


def enter(
    layout: Layout,
    supervisor: Supervisor,
    name: str,
    command: list[str],
    user: str | None,
    workdir: str | None,
    env: list[str] | None,
) -> int:
    """Run command in a running machine, with the machine's environment (env's
    KEY=VALUE over it), user and working directory unless given; its exit code."""
    for pair in env or []:
        if "=" not in pair or pair.startswith("="):
            raise UsageError(f"--env {pair!r}: not KEY=VALUE")
    spec = known(layout, name).spec
    pid = leader(layout, supervisor, name)
    environment = [f"TERM={os.environ.get('TERM', 'dumb')}"]
    environment += [f"{k}={v}" for k, v in sorted(spec.environment.items() if spec else ())]
    environment += env or []
    argv = commands.enter_argv(
        sys.executable,
        pid,
        command,
        environment,
        user if user is not None else (spec.user if spec else None),
        workdir if workdir is not None else (spec.workdir if spec else None),
    )
    return run.interactive(argv)
