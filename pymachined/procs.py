"""Facts about a machine's processes, read from /proc: which process is its
PID 1, whether that has become its payload yet, and when a process started.
Reads the host only; used by the supervisors and the operator's verbs."""

from __future__ import annotations

import contextlib
import os
import select
import signal
from collections.abc import Callable
from pathlib import Path


def process_start_time(pid: int) -> int | None:
    """The start time of a process in clock ticks since boot (field 22 of
    /proc/PID/stat), or None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(text.rsplit(")", 1)[1].split()[19])


def _pid_namespace(pid: int) -> str | None:
    try:
        return str(Path(f"/proc/{pid}/ns/pid").readlink())
    except OSError:
        return None


def leader_pid(nspawn_pid: int) -> int | None:
    """The machine's own PID 1 (as the host sees it): the child of its
    systemd-nspawn process in a PID namespace of its own, or None while there
    is none yet (nspawn's first child only prepares the machine, and shifting
    a root to a user namespace's ids takes a moment at a first start)."""
    own = _pid_namespace(nspawn_pid)
    children: list[int] = []
    for task in Path(f"/proc/{nspawn_pid}/task").glob("*"):
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    inside = [c for c in children if _pid_namespace(c) not in (None, own)]
    return min(inside) if inside else None


def payload_running(nspawn_pid: int, leader: int) -> bool:
    """Whether the machine's PID 1 has become its payload: nspawn sets up the
    namespaces, root, bounding set and seccomp filters in that process and then
    execs the payload, so until its executable differs from nspawn's own, it is
    not yet confined as the machine's processes are."""
    try:
        ours = Path(f"/proc/{nspawn_pid}/exe").stat()
        theirs = Path(f"/proc/{leader}/exe").stat()
    except OSError:
        return False
    return (ours.st_dev, ours.st_ino) != (theirs.st_dev, theirs.st_ino)


def end(pid: int, ours: Callable[[int], bool], timeout: float = 5.0) -> None:
    """SIGTERM a process of pymachine's and wait until it is gone, if ours(pid)
    says the pid is still it. A pidfd first, so the pid cannot be another
    process's by the time it is signalled; it becomes readable once the
    process is a zombie, after the kernel closed its files (its cmdline
    empties earlier, when it drops its memory: waiting on that races the
    release of its sockets). Reaped if this process started it."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if not ours(pid):
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
