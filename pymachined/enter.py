"""Run a command inside a running machine, confined exactly as its PID 1 is. Edge.

``pymachine exec`` and ``shell`` start this module as a process of its own
(``python -m pymachined.enter``, argv from ``commands.enter_argv``): joining a
user namespace needs a single-threaded process, and the CLI stays outside, on
the host, to report the exit code. From the machine's PID 1 (given by its host
pid) the process takes, in this order:

1. its seccomp filters, copied with ``PTRACE_SECCOMP_GET_FILTER`` (needs host
   privileges and no seccomp of our own, so before anything else);
2. its group in every cgroup hierarchy (host paths, so before the cgroup
   namespace);
3. its namespaces, the user namespace last, as nsenter does (a machine's
   network namespace belongs to the host's user namespace); a fork then puts
   the command in the machine's PID namespace;
4. its root and working directory (or ``--workdir``);
5. its capability bounding set (``PR_CAPBSET_DROP``), no ambient set, and an
   inheritable set no wider than its own;
6. the user (resolved in the machine's own /etc/passwd and /etc/group, read
   after the chroot, so no link leads out of the root, never blocking and
   bounded in size), its no_new_privs flag, and the filters (installed while
   still root in the namespace when PID 1 has no no_new_privs, since then only
   CAP_SYS_ADMIN permits it; else last);
7. execve, with only the environment given.

Everything this process runs after the chroot was imported before it: nothing
from the machine's root is ever loaded (no ``pwd``/NSS, no lazy imports, no
tracebacks that read source files). Exit codes: the command's, 128+N when
signal N killed it, 125 when entering failed, 126/127 when the command cannot
be run or is not found (as Docker's).
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import signal
import stat
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from pymachined.core.parsers import (
    Confinement,
    Credentials,
    cgroup_directory,
    parse_mountinfo,
    parse_proc_cgroup,
    parse_proc_status,
    resolve_user,
)

# The namespaces nsenter --all enters, in its order; the user namespace is
# entered after the others (see the module docstring).
NAMESPACES = {
    "cgroup": 0x02000000,
    "ipc": 0x08000000,
    "uts": 0x04000000,
    "net": 0x40000000,
    "pid": 0x20000000,
    "mnt": 0x00020000,
    "time": 0x00000080,
}
CLONE_NEWUSER = 0x10000000

PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
PR_SET_PDEATHSIG = 1
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SECCOMP_MODE_FILTER = 2
PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_SECCOMP_GET_FILTER = 0x420C
WALL = 0x40000000
LINUX_CAPABILITY_VERSION_3 = 0x20080522
# /etc/passwd and /etc/group larger than this are refused, not read.
ACCOUNTS_LIMIT = 4 << 20
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

libc = ctypes.CDLL(None, use_errno=True)


class EnterError(Exception):
    """Entering the machine failed: the message says at which step."""


def _prctl(option: int, *args: int | ctypes.c_void_p, what: str) -> int:
    # prctl is variadic: each argument must be passed as a full unsigned long.
    values = [a if isinstance(a, ctypes.c_void_p) else ctypes.c_ulong(a) for a in args]
    values += [ctypes.c_ulong(0)] * (4 - len(values))
    return _check(libc.prctl(option, *values), what)


def _check(result: int, what: str) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise EnterError(f"{what}: {os.strerror(code)}")
    return result


class SockFprog(ctypes.Structure):
    """struct sock_fprog: a classic BPF program as seccomp takes it."""

    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class CapHeader(ctypes.Structure):
    """struct __user_cap_header_struct."""

    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class CapData(ctypes.Structure):
    """struct __user_cap_data_struct (two of them, for 64 capabilities)."""

    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _read_at(directory: int, name: str) -> str:
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=directory)
    with os.fdopen(fd) as handle:
        return handle.read()


def seccomp_filters(pid: int, count: int) -> list[bytes]:
    """The seccomp filters of process pid as raw sock_filter arrays, oldest first.
    The process is stopped (PTRACE_SEIZE + PTRACE_INTERRUPT) while they are read
    and resumed after."""
    if count == 0:
        return []
    _check(libc.ptrace(PTRACE_SEIZE, pid, None, None), "ptrace seize of the machine's PID 1")
    try:
        _check(libc.ptrace(PTRACE_INTERRUPT, pid, None, None), "ptrace interrupt")
        os.waitpid(pid, WALL)
        filters = []
        index = 0
        while True:
            length = libc.ptrace(
                PTRACE_SECCOMP_GET_FILTER, pid, ctypes.c_void_p(index), ctypes.c_void_p(None)
            )
            if length < 0:
                code = ctypes.get_errno()
                if code == errno.ENOENT:
                    break
                raise EnterError(
                    f"cannot read the machine's seccomp filters: {os.strerror(code)}"
                    + (
                        " (this process has seccomp filters of its own)"
                        if code == errno.EACCES
                        else ""
                    )
                )
            buffer = ctypes.create_string_buffer(length * 8)
            _check(
                libc.ptrace(PTRACE_SECCOMP_GET_FILTER, pid, ctypes.c_void_p(index), buffer),
                "reading a seccomp filter",
            )
            filters.append(buffer.raw)
            index += 1
    finally:
        libc.ptrace(PTRACE_DETACH, pid, None, None)
    if len(filters) != count:
        raise EnterError(f"read {len(filters)} seccomp filters, PID 1 has {count}")
    # Index 0 is the newest filter; install in the order PID 1 got them.
    return filters[::-1]


def install_filters(filters: Sequence[bytes]) -> None:
    """Install seccomp filters on this process, in order."""
    for program in filters:
        buffer = ctypes.create_string_buffer(program, len(program))
        fprog = SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
        pointer = ctypes.c_void_p(ctypes.addressof(fprog))
        _prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, pointer, what="installing a seccomp filter")


def join_cgroups(proc: int) -> None:
    """Move this process into every group the process of the /proc dir fd is in."""
    mounts = parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    own = {m.hierarchy: m for m in parse_proc_cgroup(Path("/proc/self/cgroup").read_text())}
    for membership in parse_proc_cgroup(_read_at(proc, "cgroup")):
        if own.get(membership.hierarchy) == membership:
            continue  # already there (and the hierarchy may be read-only here)
        directory = cgroup_directory(membership, mounts)
        if directory is None:
            raise EnterError(f"cannot join cgroup {membership}: its hierarchy is not mounted")
        try:
            Path(directory / "cgroup.procs").write_text(str(os.getpid()))
        except OSError as exc:
            raise EnterError(f"cannot join cgroup {directory}: {exc.strerror}") from exc


def namespaces_to_enter(proc: int) -> list[tuple[str, int, int]]:
    """The namespaces of the process whose /proc dir fd is proc that this
    process is not in, as (name, flag, open fd), the user namespace last. All
    are compared and opened before any is entered: once in the machine's mount
    namespace, /proc is the machine's."""
    out = []
    for name, flag in [*NAMESPACES.items(), ("user", CLONE_NEWUSER)]:
        try:
            theirs = os.stat(f"ns/{name}", dir_fd=proc)
        except FileNotFoundError:
            continue  # a kernel without this namespace type
        ours = Path(f"/proc/self/ns/{name}").stat()
        if (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino):
            continue
        out.append((name, flag, os.open(f"ns/{name}", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc)))
    return out


def enter_namespaces(namespaces: Sequence[tuple[str, int, int]]) -> None:
    """setns into each of the namespaces, in order, closing their fds."""
    for name, flag, fd in namespaces:
        try:
            _check(libc.setns(fd, flag), f"setns into the machine's {name} namespace")
        finally:
            os.close(fd)


def read_account_file(path: str) -> str:
    """A file of the machine's /etc (read after the chroot), or "" if it is not
    there: never a FIFO, device or anything larger than ACCOUNTS_LIMIT."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        return ""
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise EnterError(f"the machine's {path} is not a regular file")
        data = handle.read(ACCOUNTS_LIMIT + 1)
    if len(data) > ACCOUNTS_LIMIT:
        raise EnterError(f"the machine's {path} is larger than {ACCOUNTS_LIMIT} bytes")
    return data.decode("utf-8", errors="replace")


def _accounts(user: str) -> tuple[str, str]:
    """The machine's /etc/passwd and /etc/group texts. A user given by number
    needs neither: if a hostile root made them unreadable, exec as root still
    works (to repair it), with home /."""
    try:
        return read_account_file("/etc/passwd"), read_account_file("/etc/group")
    except EnterError:
        if user.partition(":")[0].isdigit():
            return "", ""
        raise


def _capget() -> tuple[int, int, int]:
    header = CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (CapData * 2)()
    _check(libc.capget(ctypes.byref(header), data), "capget")
    return (
        data[0].effective | data[1].effective << 32,
        data[0].permitted | data[1].permitted << 32,
        data[0].inheritable | data[1].inheritable << 32,
    )


def _capset(effective: int, permitted: int, inheritable: int) -> None:
    header = CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (CapData * 2)()
    for i in range(2):
        shift = 32 * i
        data[i].effective = (effective >> shift) & 0xFFFFFFFF
        data[i].permitted = (permitted >> shift) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> shift) & 0xFFFFFFFF
    _check(libc.capset(ctypes.byref(header), data), "capset")


def environment(credentials: Credentials, given: Sequence[str]) -> dict[str, str]:
    """The command's environment: what nspawn gives a payload (PATH, HOME, USER,
    LOGNAME, SHELL, container), then the given KEY=VALUE pairs in order."""
    env = {
        "PATH": DEFAULT_PATH,
        "container": "systemd-nspawn",
        "HOME": credentials.home,
        "USER": credentials.name,
        "LOGNAME": credentials.name,
        "SHELL": credentials.shell,
    }
    for pair in given:
        key, _, value = pair.partition("=")
        env[key] = value
    return env


def confine_and_exec(
    root: int,
    cwd: int,
    confinement: Confinement,
    filters: Sequence[bytes],
    last_cap: int,
    options: argparse.Namespace,
) -> None:
    """In the forked child, inside the namespaces: take PID 1's root, working
    directory, bounding set, user, no_new_privs and filters, and exec."""
    os.fchdir(root)
    os.chroot(".")
    os.close(root)
    user = options.user or "0"
    credentials = resolve_user(user, *_accounts(user))
    if options.workdir:
        try:
            os.chdir(options.workdir)
        except OSError as exc:
            raise EnterError(f"cannot enter {options.workdir}: {exc.strerror}") from exc
    else:
        os.fchdir(cwd)
    os.close(cwd)
    bounding = confinement.cap_bnd
    for cap in range(last_cap + 1):
        if not bounding >> cap & 1:
            _prctl(PR_CAPBSET_DROP, cap, what=f"dropping capability {cap}")
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, what="clearing the ambient set")
    # execve gives root its inheritable and bounding sets and any other user
    # its inheritable set only: with both no wider than PID 1's, root inside
    # has no more than PID 1 has.
    effective, permitted, _ = _capget()
    _capset(effective, permitted, confinement.cap_inh & bounding)
    if confinement.no_new_privs:
        _prctl(PR_SET_NO_NEW_PRIVS, 1, what="setting no_new_privs")
    else:
        install_filters(filters)  # needs CAP_SYS_ADMIN here, before the user changes
    os.setgroups(list(credentials.groups))
    os.setresgid(credentials.gid, credentials.gid, credentials.gid)
    os.setresuid(credentials.uid, credentials.uid, credentials.uid)
    if confinement.no_new_privs:
        install_filters(filters)
    # If pymachine's side goes, so does the command (set after the id change,
    # which clears it).
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, what="setting the parent death signal")
    env = environment(credentials, options.env)
    try:
        os.execvpe(options.command[0], options.command, env)
    except FileNotFoundError:
        sys.stderr.write(f"pymachine: {options.command[0]}: command not found\n")
        os._exit(127)
    except OSError as exc:
        sys.stderr.write(f"pymachine: {options.command[0]}: {exc.strerror}\n")
        os._exit(126)


def _wait(child: int) -> int:
    def forward(signum: int, _frame: FrameType | None) -> None:
        os.kill(child, signum)

    # The terminal sends SIGINT and SIGQUIT to the command itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGQUIT, signal.SIG_IGN)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, forward)
    while True:
        try:
            _, status = os.waitpid(child, 0)
        except InterruptedError:
            continue
        if os.WIFSIGNALED(status):
            return 128 + os.WTERMSIG(status)
        return os.WEXITSTATUS(status)


def enter(options: argparse.Namespace) -> int:
    """Enter the machine whose PID 1 is options.pid and run options.command;
    the exit code."""
    try:
        proc = os.open(f"/proc/{options.pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise EnterError(f"the machine's PID 1 ({options.pid}) is gone") from exc
    confinement = parse_proc_status(_read_at(proc, "status"))
    if confinement.seccomp == 1:
        raise EnterError("the machine's PID 1 is in strict seccomp mode")
    last_cap = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    root = os.open("root", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=proc)
    cwd = os.open("cwd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=proc)
    filters = seccomp_filters(options.pid, confinement.seccomp_filters)
    join_cgroups(proc)
    namespaces = namespaces_to_enter(proc)
    os.close(proc)
    enter_namespaces(namespaces)
    child = os.fork()
    if child == 0:
        try:
            confine_and_exec(root, cwd, confinement, filters, last_cap, options)
        except (EnterError, ValueError, OSError) as exc:
            sys.stderr.write(f"error: {exc}\n")
        except BaseException as exc:
            sys.stderr.write(f"error: entering the machine failed: {exc!r}\n")
        os._exit(125)
    os.close(root)
    os.close(cwd)
    return _wait(child)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The options commands.enter_argv builds."""
    parser = argparse.ArgumentParser(prog="python -m pymachined.enter")
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--user")
    parser.add_argument("--workdir")
    parser.add_argument("--env", action="append", default=[])
    parser.add_argument("command", nargs="+")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: enter, or say why not (exit 125)."""
    options = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return enter(options)
    except (EnterError, ValueError, OSError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 125


if __name__ == "__main__":
    sys.exit(main())
