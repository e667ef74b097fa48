"""The ``[::1]`` connect redirect made real: ``core.sockprog``'s program
attached at the root of the unified cgroup tree, and its map kept in step with
the machines that publish ports on ``::1``.

One program serves the host: it is found again by its name among the
programs attached to the group (no bpffs pin to go stale), and its map
through the program. Every state root syncs its own entries in it, under a
lock of the group's directory; the program is attached when the first entry
comes and detached when the last goes, so a host with no such port runs
none. An older version of the program found attached is replaced.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from pymachined import bpf
from pymachined.core import sockprog
from pymachined.core.sockprog import Target

CGROUP = Path("/sys/fs/cgroup")
SO_NETNS_COOKIE = 71  # <asm-generic/socket.h>, Linux 5.14


def unified_root(root: Path = CGROUP) -> Path | None:
    """The root of the unified (v2) tree, where connect programs attach: the
    cgroup mount itself on a v2 host, its ``unified`` mount on a hybrid one;
    None on a v1-only host. (A v2 group has ``cgroup.threads``, a v1 one not.)"""
    for group in (root, root / "unified"):
        if (group / "cgroup.procs").exists() and (group / "cgroup.threads").exists():
            return group
    return None


def netns_cookie() -> int:
    """The cookie of this process's network namespace, the host's."""
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
    return int(struct.unpack("=Q", raw)[0])


@contextlib.contextmanager
def locked(group: Path) -> Iterator[None]:
    """Hold the lock every sync of the redirect takes (flock of the group's
    directory), so two roots' syncs never race for the program or the map."""
    fd = os.open(group, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Attached:
    """A version of the redirect attached to the group."""

    prog_id: int
    name: bytes
    map_ids: tuple[int, ...]


def ours(group: Path) -> list[Attached]:
    """The redirect programs (of any version) attached to the group itself."""
    found = []
    for prog_id in bpf.attached(group, bpf.CGROUP_INET6_CONNECT):
        try:
            fd = bpf.program_fd(prog_id)
        except FileNotFoundError:
            continue  # detached meanwhile
        try:
            info = bpf.program_info(fd)
        finally:
            os.close(fd)
        if info.name.startswith(sockprog.PREFIX):
            found.append(Attached(prog_id, info.name, info.map_ids))
    return found


def _entries(map_fd: int) -> dict[int, Target]:
    raw = bpf.entries(map_fd, sockprog.KEY_SIZE, sockprog.VALUE.size)
    return {sockprog.parse_key(k): sockprog.parse_value(v) for k, v in raw.items()}


def held(group: Path) -> dict[int, Target]:
    """The entries of the current version's map (none when it is not attached)."""
    for attached in ours(group):
        if attached.name == sockprog.NAME and attached.map_ids:
            fd = bpf.map_fd(attached.map_ids[0])
            try:
                return _entries(fd)
            finally:
                os.close(fd)
    return {}


def _detach(group: Path, prog_id: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        fd = bpf.program_fd(prog_id)
        try:
            bpf.detach(group, fd, bpf.CGROUP_INET6_CONNECT)
        finally:
            os.close(fd)


def _install(group: Path) -> int:
    """Load and attach the current version with an empty map; the map's fd."""
    map_fd = bpf.create_map(
        sockprog.KEY_SIZE, sockprog.VALUE.size, sockprog.MAX_ENTRIES, sockprog.MAP_NAME
    )
    try:
        program = sockprog.redirect_program(map_fd, netns_cookie())
        prog_fd = bpf.load_program(
            bpf.PROG_TYPE_CGROUP_SOCK_ADDR, program, sockprog.NAME, bpf.CGROUP_INET6_CONNECT
        )
        try:
            bpf.attach(group, prog_fd, bpf.CGROUP_INET6_CONNECT)
        finally:
            os.close(prog_fd)
    except BaseException:
        os.close(map_fd)
        raise
    return map_fd


def sync(group: Path, owner: bytes, want: Mapping[int, Target], listening: Collection[int]) -> None:
    """Make the map hold a root's wanted entries (and drop any whose port has
    no listener, see ``sockprog.changes``); attach the program when the map
    gets its first entry, detach it when the map is left empty. Raises
    OSError where bpf(2) cannot (no CAP_SYS_ADMIN, no cgroup BPF, a seccomp
    filter)."""
    with locked(group):
        attached = ours(group)
        current = next((a for a in attached if a.name == sockprog.NAME and a.map_ids), None)
        for old in attached:
            if old is not current:
                _detach(group, old.prog_id)
        if current is None:
            changes = sockprog.changes({}, want, owner, listening)
            if not changes.put:
                return
            map_fd = _install(group)
            current_id = None
        else:
            map_fd = bpf.map_fd(current.map_ids[0])
            current_id = current.prog_id
        try:
            entries = _entries(map_fd)
            changes = sockprog.changes(entries, want, owner, listening)
            for port in changes.delete:
                bpf.delete(map_fd, sockprog.key(port))
            for port, target in changes.put.items():
                bpf.update(map_fd, sockprog.key(port), sockprog.value(target))
            if current_id is not None and not _entries(map_fd):
                _detach(group, current_id)
        finally:
            os.close(map_fd)
