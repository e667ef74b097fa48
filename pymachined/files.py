"""Careful file operations: atomic writes, kernel-held locks, and tree removal
that never crosses into a mounted filesystem.

These touch the host; the rules they keep are in docs/architecture.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import signal
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from pymachined import run
from pymachined.core.layout import Layout
from pymachined.core.parsers import mounts_under, parse_mountinfo
from pymachined.errors import PymachineError
from pymachined.supervise.base import BindSource


def host_layout(root: Path) -> Layout:
    """The layout under --root, resolved once for the CLI and pymachined alike:
    relative to the working directory and through symlinks, so every way of
    naming one root gives the same scope (and so the same host-wide names)."""
    return Layout(PurePosixPath(os.path.realpath(root)))


def atomic_write(path: Path, data: str | bytes, mode: int = 0o644, *, durable: bool = True) -> None:
    """Write path as a whole or not at all: temp file, fsync, rename, fsync dir.
    Not durable: the same, without the two fsyncs; a reader (or a process
    killed meanwhile) still sees the old file or the new one, never a mix, and
    the caller makes the writes durable at once with sync_filesystem()."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(raw)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            if durable:
                os.fsync(handle.fileno())
        Path(temp).replace(path)
    except OSError as error:
        with contextlib.suppress(FileNotFoundError):
            Path(temp).unlink()
        if error.filename is None:  # a failed write names no file: name the one meant
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            Path(temp).unlink()
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write_json(path: Path, data: Any, *, durable: bool = True) -> None:
    """atomic_write of data as indented, sorted JSON."""
    atomic_write(path, json.dumps(data, indent=2, sort_keys=True) + "\n", durable=durable)


def sync_filesystem(path: Path) -> None:
    """Make every write to the filesystem holding path durable (syncfs(2)): one
    flush for many non-durable atomic writes."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if libc.syncfs(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), str(path))
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename or creation in directory path durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(
    path: Path,
    *,
    timeout: float | None = None,
    waiting: Callable[[str], None] | None = None,
) -> Iterator[None]:
    """Hold an exclusive flock on path (held by the kernel: it dies with the
    process). Says who holds it through waiting() while it waits; raises after
    timeout seconds if given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            if waiting is not None:
                waiting(f"waiting for {path} (held by {holder})")
            if timeout is None:
                fcntl.flock(fd, fcntl.LOCK_EX)  # the kernel wakes it once the lock is free
            else:
                deadline = time.monotonic() + timeout
                while True:
                    if time.monotonic() >= deadline:
                        raise PymachineError(
                            f"timed out after {timeout:g} s waiting for {path}, held by {holder}",
                            hint="wait for the other pymachine to finish, or raise the timeout",
                        ) from None
                    time.sleep(0.1)
                    with contextlib.suppress(BlockingIOError):
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
        # Written, then cut to its length: a truncation to 0 makes ext4 flush
        # the file at its close (auto_da_alloc), which can wait on a busy disk.
        holder_line = f"pid {os.getpid()}\n".encode()
        os.pwrite(fd, holder_line, 0)
        os.ftruncate(fd, len(holder_line))
        yield
    finally:
        os.close(fd)  # closing releases the lock


def mounts() -> list[Path]:
    """Every mount point of this process's mount namespace."""
    text = Path("/proc/self/mountinfo").read_text()
    return [Path(m.target) for m in parse_mountinfo(text)]


def unmount_under(root: Path) -> None:
    """Unmount everything mounted at or below root, deepest first."""
    text = Path("/proc/self/mountinfo").read_text()
    from pathlib import PurePosixPath

    for target in mounts_under(text, PurePosixPath(root.resolve())):
        run.run(["umount", "--", str(target)])


def remove_tree(root: Path) -> None:
    """Remove root and everything below it, after unmounting what is mounted there.

    Never crosses into another filesystem: if something is still mounted below
    root, the removal stops with an error instead of deleting the mount's
    content."""
    if not root.exists() and not root.is_symlink():
        return
    unmount_under(root)
    top = os.lstat(root)
    if not stat.S_ISDIR(top.st_mode):
        root.unlink()
        return
    _remove_dir(root, top.st_dev)


def _remove_dir(path: Path, device: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        _remove_children(fd, path, device)
    finally:
        os.close(fd)
    path.rmdir()


def _remove_children(fd: int, where: Path, device: int) -> None:
    for name in os.listdir(fd):
        info = os.stat(name, dir_fd=fd, follow_symlinks=False)
        if stat.S_ISDIR(info.st_mode):
            if info.st_dev != device:
                raise PymachineError(
                    f"refusing to remove {where / name}: another filesystem is mounted there",
                    hint=f"unmount it (umount {where / name}) and try again",
                )
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            try:
                _remove_children(child, where / name, device)
            finally:
                os.close(child)
            try:
                os.rmdir(name, dir_fd=fd)
            except OSError as exc:
                if exc.errno == errno.EBUSY:
                    raise PymachineError(f"{where / name} is busy (a mount point?)") from exc
                raise
        else:
            os.unlink(name, dir_fd=fd)


def tree_usage(root: Path, seen: set[tuple[int, int]] | None = None) -> int:
    """Bytes of disk used by the files below root (hard links counted once, other
    filesystems not entered). Walked by directory descriptors opened without
    following a symlink, so a running machine that swaps a directory of its
    root for a symlink cannot turn the walk to the host."""
    try:
        top = os.open(root, _DIRECTORY)
    except FileNotFoundError:
        return 0
    seen = set() if seen is None else seen
    device = os.fstat(top).st_dev
    total = 0
    stack = [top]
    while stack:
        fd = stack.pop()
        try:
            names = os.listdir(fd)  # noqa: PTH208 - a directory descriptor
        except OSError:
            names = []
        for name in names:
            try:
                info = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except OSError:
                continue  # gone meanwhile
            if info.st_dev != device:
                continue
            key = (info.st_dev, info.st_ino)
            if key in seen:
                continue
            seen.add(key)
            total += info.st_blocks * 512
            if stat.S_ISDIR(info.st_mode):
                with contextlib.suppress(OSError):
                    stack.append(os.open(name, _DIRECTORY, dir_fd=fd))
        os.close(fd)
    return total


# Every open inside a machine's root: never through a symlink, never waiting
# on a FIFO or a device, never inherited by a child.
_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def file_kind(mode: int) -> str:
    """What a file is, in words, from its st_mode."""
    kinds = (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symlink"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((words for test, words in kinds if test(mode)), "a special file")


def _lstat_at(fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _in_machine(machine: str, path: str, problem: str) -> PymachineError:
    return PymachineError(
        f"machine {machine}: {path} in its root is {problem}",
        hint="remove it from the machine's image (or its root), or name another path",
    )


def _open_in_root(
    root: Path, parts: list[str], path: str, owner: os.stat_result, machine: str
) -> int:
    """An fd of the directory parts name inside root, made where missing (owned
    by owner), never following a symlink."""
    fd = os.open(root, _DIRECTORY)
    for index, part in enumerate(parts):
        where = "/" + "/".join(parts[: index + 1])
        try:
            try:
                child = os.open(part, _DIRECTORY, dir_fd=fd)
            except FileNotFoundError:
                os.mkdir(part, 0o755, dir_fd=fd)
                child = os.open(part, _DIRECTORY, dir_fd=fd)
                os.fchown(child, owner.st_uid, owner.st_gid)
        except OSError as exc:
            found = _lstat_at(fd, part)
            os.close(fd)
            what = file_kind(found.st_mode) if found else "missing"
            raise PymachineError(
                f"machine {machine}: cannot make {path} in its root: {where} is {what}, "
                "not a directory",
                hint="name the path by its real path inside the machine",
            ) from exc
        os.close(fd)
        fd = child
    return fd


def _fresh_temp(fd: int, temp: str, mode: int, machine: str, where: str) -> int:
    """A regular file made now at temp in the directory fd: whatever a root left
    under that name (a device, a FIFO, a symlink, a stale temp) is unlinked by
    name first, never opened."""
    try:
        os.unlink(temp, dir_fd=fd)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        raise _in_machine(machine, where, "a directory (pymachine's temporary name)") from None
    try:
        out = os.open(temp, _NEW_FILE, mode, dir_fd=fd)
    except FileExistsError:  # a running machine made it again meanwhile
        raise _in_machine(machine, where, "made again while pymachine writes it") from None
    if not stat.S_ISREG(os.fstat(out).st_mode):
        os.close(out)
        raise _in_machine(machine, where, "not a regular file")
    return out


def write_in_root(root: Path, path: str, content: str, mode: int, *, machine: str) -> None:
    """Write content at the absolute path inside root, atomically, never following
    a symlink: a path through a symlink is refused, so nothing is written
    outside root whatever the root holds. Only a regular file made here is
    written (in a fresh temporary file, renamed over path); a path that is a
    directory, a device, a FIFO or a socket is refused, and a symlink there is
    replaced, not followed. What is made belongs to the owner of root, which is
    root inside the machine also when its ids are shifted to a user
    namespace's range."""
    parts = [p for p in path.split("/") if p]
    owner = root.lstat()
    fd = _open_in_root(root, parts[:-1], path, owner, machine)
    try:
        name = parts[-1]
        found = _lstat_at(fd, name)
        if found is not None and not (stat.S_ISREG(found.st_mode) or stat.S_ISLNK(found.st_mode)):
            raise _in_machine(machine, path, f"{file_kind(found.st_mode)}, not a regular file")
        temp = f".{name}.pymachine-tmp"
        where = "/" + "/".join([*parts[:-1], temp])
        out = _fresh_temp(fd, temp, mode, machine, where)
        try:
            data = content.encode()
            while data:
                data = data[os.write(out, data) :]
            os.fchown(out, owner.st_uid, owner.st_gid)
            os.fchmod(out, mode)
            os.fsync(out)
            made = os.fstat(out)
        finally:
            os.close(out)
        os.rename(temp, name, src_dir_fd=fd, dst_dir_fd=fd)
        placed = _lstat_at(fd, name)
        if placed is None or (placed.st_dev, placed.st_ino) != (made.st_dev, made.st_ino):
            raise _in_machine(machine, path, "changed by the machine while pymachine wrote it")
    finally:
        os.close(fd)


def make_mount_point(root: Path, path: str, directory: bool, *, machine: str) -> None:
    """Make the directory, or empty file, that something is mounted on at path
    inside root, unless it exists as such; as write_in_root, never through a
    symlink, and never opening what is there: anything else at path (a
    symlink, a FIFO, a device, a file where a directory is wanted) is refused.
    A read-only root needs its mount points made beforehand."""
    parts = [p for p in path.split("/") if p]
    owner = root.lstat()
    if directory:
        os.close(_open_in_root(root, parts, path, owner, machine))
        return
    fd = _open_in_root(root, parts[:-1], path, owner, machine)
    try:
        found = _lstat_at(fd, parts[-1])
        if found is None:
            try:
                out = os.open(parts[-1], _NEW_FILE, 0o644, dir_fd=fd)
            except FileExistsError:
                raise _in_machine(machine, path, "made while pymachine made it") from None
            try:
                os.fchown(out, owner.st_uid, owner.st_gid)
            finally:
                os.close(out)
        elif not stat.S_ISREG(found.st_mode):
            raise _in_machine(
                machine, path, f"{file_kind(found.st_mode)}, not a regular file to bind a file on"
            )
    finally:
        os.close(fd)


# Mounting from descriptors (openat2(2), mount_setattr(2): Linux 5.6, 5.12).
_SYS_OPENAT2 = 437
_SYS_MOUNT_SETATTR = 442
_AT_FDCWD = -100
_AT_SYMLINK_NOFOLLOW = 0x100
_AT_RECURSIVE = 0x8000
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MOUNT_ATTR_RDONLY = 0x1
_MOUNT_ATTR_NOSUID = 0x2
_MOUNT_ATTR_NODEV = 0x4


class _OpenHow(ctypes.Structure):
    _fields_ = (
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    )


class _MountAttr(ctypes.Structure):
    _fields_ = (
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    )


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def _check(result: int, path: str) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path)
    return result


def open_no_symlinks(path: str) -> int:
    """An O_PATH descriptor of path, resolved with no symlink in any component
    (openat2 with RESOLVE_NO_SYMLINKS): OSError ELOOP if there is one."""
    how = _OpenHow(
        flags=os.O_PATH | os.O_CLOEXEC, resolve=_RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS
    )
    result = _libc().syscall(
        ctypes.c_long(_SYS_OPENAT2),
        ctypes.c_long(_AT_FDCWD),
        ctypes.c_char_p(os.fsencode(path)),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    return _check(result, path)


def bind_descriptor(fd: int, target: Path, *, read_only: bool) -> None:
    """Bind-mount what fd is open on (and what is mounted below it) at target,
    nosuid and nodev (and read-only if asked) all through. The kernel mounts
    the opened object itself: no path is resolved again."""
    libc = _libc()
    source = f"/proc/self/fd/{fd}".encode()
    _check(libc.mount(source, os.fsencode(target), None, _MS_BIND | _MS_REC, None), str(target))
    flags = _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV | (_MOUNT_ATTR_RDONLY if read_only else 0)
    attr = _MountAttr(attr_set=flags)
    result = libc.syscall(
        ctypes.c_long(_SYS_MOUNT_SETATTR),
        ctypes.c_long(_AT_FDCWD),
        ctypes.c_char_p(os.fsencode(target)),
        ctypes.c_uint(_AT_RECURSIVE | _AT_SYMLINK_NOFOLLOW),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    try:
        _check(result, str(target))
    except OSError:
        unmount_under(target)
        raise


_SYS_OPEN_TREE = 428
_OPEN_TREE_CLONE = 0x1
_AT_EMPTY_PATH = 0x1000
_MOUNT_ATTR_IDMAP = 0x00100000
_CLONE_NEWUSER = 0x10000000
_PR_SET_PDEATHSIG = 1


_MS_NODEV = 0x4
_MNT_DETACH = 0x2


def detach(target: Path) -> None:
    """Detach the mount at target (umount2 with MNT_DETACH): gone from the
    tree at once, whoever still holds a descriptor of it (a child another
    thread forked holds copies of every descriptor for a moment)."""
    _check(_libc().umount2(os.fsencode(target), _MNT_DETACH), str(target))


def mount_overlay(options: str, target: Path) -> None:
    """Mount an overlay with options (``commands.overlay_options``) at target,
    nodev, by mount(2) itself: the same mount as mount(8) makes, without a
    process to start."""
    result = _libc().mount(
        b"pymachine", os.fsencode(target), b"overlay", _MS_NODEV, os.fsencode(options)
    )
    _check(result, str(target))


_SYS_MOVE_MOUNT = 429
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_PROBE_BASE = 4293918720  # far from any machine's range


def _idmapped_tree(libc: ctypes.CDLL, path: Path, userns: int) -> int:
    """A descriptor of a detached copy of the mount at path (open_tree(2)),
    ID-mapped through userns's mapping (mount_setattr(2), MOUNT_ATTR_IDMAP)."""
    tree = _check(
        libc.syscall(
            ctypes.c_long(_SYS_OPEN_TREE),
            ctypes.c_long(_AT_FDCWD),
            ctypes.c_char_p(os.fsencode(path)),
            ctypes.c_uint(_OPEN_TREE_CLONE | os.O_CLOEXEC),
        ),
        f"open_tree {path}",
    )
    attr = _MountAttr(attr_set=_MOUNT_ATTR_IDMAP, userns_fd=userns)
    result = libc.syscall(
        ctypes.c_long(_SYS_MOUNT_SETATTR),
        ctypes.c_long(tree),
        ctypes.c_char_p(b""),
        ctypes.c_uint(_AT_EMPTY_PATH),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    if result < 0:
        code = ctypes.get_errno()
        os.close(tree)
        raise OSError(code, os.strerror(code), str(path))
    return tree


def idmap_problem(path: Path) -> str | None:
    """Why the filesystem holding path cannot be mounted ID-mapped (as nspawn's
    ``:idmap`` binds and ID-mapped layers are), or None if it can: a detached
    copy of its mount is given a throwaway user namespace's mapping and dropped."""
    libc = _libc()
    try:
        userns = _userns(libc, _PROBE_BASE)
    except OSError as exc:
        return exc.strerror
    try:
        os.close(_idmapped_tree(libc, path, userns))
    except OSError as exc:
        return exc.strerror if exc.filename == str(path) else f"open_tree: {exc.strerror}"
    finally:
        os.close(userns)
    return None


def mount_idmapped(sources: Sequence[Path], targets: Sequence[Path], base: int) -> None:
    """Mount each source directory (a copy of its mount, so never the host's
    own mount) at the matching target, with its IDs shown moved up by base:
    owner 0 on disk is base, as in a user namespace mapping ``0 base 65536``,
    and a file created through it with base's IDs is stored with 0's. One user
    namespace serves all; a mount made before a failure is left for the
    caller's unmount."""
    libc = _libc()
    userns = _userns(libc, base)
    try:
        for source, target in zip(sources, targets, strict=True):
            tree = _idmapped_tree(libc, source, userns)
            try:
                result = libc.syscall(
                    ctypes.c_long(_SYS_MOVE_MOUNT),
                    ctypes.c_long(tree),
                    ctypes.c_char_p(b""),
                    ctypes.c_long(_AT_FDCWD),
                    ctypes.c_char_p(os.fsencode(target)),
                    ctypes.c_uint(_MOVE_MOUNT_F_EMPTY_PATH),
                )
                _check(result, str(target))
            finally:
                os.close(tree)
    finally:
        os.close(userns)


def idmap_problem_cached(cache: Path, path: Path) -> str | None:
    """idmap_problem of path's filesystem, probed once per device and boot:
    the answer is kept under cache (a directory on the run tmpfs)."""
    kept = cache / str(path.stat().st_dev)
    try:
        answer = kept.read_text()
    except FileNotFoundError:
        answer = idmap_problem(path) or ""
        cache.mkdir(parents=True, exist_ok=True)
        atomic_write(kept, answer, durable=False)
    return answer or None


_forking = threading.Lock()


def _userns(libc: ctypes.CDLL, base: int) -> int:
    """A descriptor of a new user namespace mapping IDs 0 to 65535 to base's
    range: a forked child unshares it, the parent maps and opens it, and the
    child exits (the descriptor keeps the namespace). The child is told to
    go by a byte, not by the end of a pipe: a child another thread forked
    meanwhile holds copies of every descriptor, those pipes' ends among them,
    so an end-of-file may never come. One thread forks at a time.

    A parent killed before its byte (kill -9 mid-apply) must not leave the
    child waiting: it would hold the parent's output open, so that whoever
    reads it never sees its end. The child closes its copies of the parent's
    ends, so the parent's death reaches it as the end of the pipe, and asks
    the kernel to kill it with the forking thread besides."""
    with _forking:
        ready, told = os.pipe()
        hold, release = os.pipe()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the child runs only syscalls, then leaves
            os.close(release)
            os.close(ready)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent:  # it died before the request took
                os._exit(1)
            code = 0 if libc.unshare(_CLONE_NEWUSER) == 0 else 1
            os.write(told, b"x" if code == 0 else b"-")
            os.read(hold, 1)  # the byte, or the end of the pipe: the parent is gone
            os._exit(code)
        os.close(told)
        os.close(hold)
        try:
            if os.read(ready, 1) != b"x":
                raise OSError(errno.EPERM, "cannot make a user namespace")
            for kind in ("uid_map", "gid_map"):
                Path(f"/proc/{pid}/{kind}").write_text(f"0 {base} 65536\n")
            return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        finally:
            os.write(release, b"x")
            os.close(release)
            os.close(ready)
            os.waitpid(pid, 0)


def stage_binds(layout: Layout, machine: str, binds: Sequence[BindSource]) -> list[bool]:
    """Mount each bind source of a machine afresh at its staging path
    (``Layout.bind_staging``), where nspawn binds it from, under the lock its
    root is mounted under: the source opened with no symlink in its path and
    mounted from that descriptor, so a source swapped for a symlink since the
    spec was checked fails the start instead of binding the symlink's target.
    Staging mounts of binds no longer declared are taken away. Whether each
    source is a directory, in order."""
    kinds: list[bool] = []
    directory = Path(layout.bind_dir(machine))
    with locked(Path(layout.mount_lock(machine))):
        if not binds and not os.path.lexists(directory):
            return kinds
        with contextlib.suppress(FileExistsError):
            directory.mkdir()
        if not stat.S_ISDIR(os.lstat(directory).st_mode):
            raise PymachineError(f"machine {machine}: {directory} is not a directory")
        for index, bind in enumerate(binds):
            kinds.append(_stage(Path(layout.bind_staging(machine, index)), bind, machine))
        declared = {Path(layout.bind_staging(machine, i)) for i in range(len(binds))}
        for entry in sorted(directory.iterdir()):
            if entry not in declared:
                _unstage(entry)
    return kinds


def _stage(staging: Path, bind: BindSource, machine: str) -> bool:
    try:
        fd = open_no_symlinks(bind.source)
    except OSError as exc:
        # What an earlier start staged goes too: nothing stays mounted of a
        # source the spec no longer reaches.
        _unstage(staging)
        if exc.errno == errno.ELOOP:
            raise PymachineError(
                f"machine {machine}: bind source {bind.source} is a symlink, or passes "
                "through one: it is not bound",
                hint="name the real path in the spec, or put the directory back",
            ) from exc
        if exc.errno == errno.ENOENT:
            raise PymachineError(
                f"machine {machine}: bind source {bind.source} does not exist",
                hint="create it, or remove the bind from the spec",
            ) from exc
        raise PymachineError(
            f"machine {machine}: cannot open bind source {bind.source}: {exc.strerror}"
        ) from exc
    try:
        is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
        _unstage(staging)
        if is_dir:
            staging.mkdir()
        else:
            os.close(os.open(staging, _NEW_FILE, 0o600))
        bind_descriptor(fd, staging, read_only=bind.read_only)
    finally:
        os.close(fd)
    return is_dir


def _unstage(staging: Path) -> None:
    """Take away a staging mount point: unmounted, then removed if it is an
    empty directory or a file, never recursively (a mount left there would
    lose its source's content)."""
    if not os.path.lexists(staging):
        return
    unmount_under(staging)
    if stat.S_ISDIR(os.lstat(staging).st_mode):
        staging.rmdir()
    else:
        staging.unlink()
