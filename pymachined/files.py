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
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from pymachined import run
from pymachined.errors import PymachineError
from pymachined.layout import Layout
from pymachined.parsers import mounts_under, parse_mountinfo


def host_layout(root: Path) -> Layout:
    """The layout under --root, resolved once for the CLI and pymachined alike:
    relative to the working directory and through symlinks, so every way of
    naming one root gives the same scope (and so the same host-wide names)."""
    return Layout(PurePosixPath(os.path.realpath(root)))


def device_nodes(root: Path) -> Iterator[tuple[str, bool, int, int]]:
    """Every device node in a tree, as (path inside it, whether a block device,
    major, minor); symlinks are not followed, nor other file systems entered."""
    device = root.lstat().st_dev
    for directory, dirs, names in os.walk(root):
        here = Path(directory)
        dirs[:] = [d for d in dirs if (here / d).lstat().st_dev == device]
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                info = (here / name).lstat()
                if stat.S_ISBLK(info.st_mode) or stat.S_ISCHR(info.st_mode):
                    yield (
                        "/" + str((here / name).relative_to(root)),
                        stat.S_ISBLK(info.st_mode),
                        os.major(info.st_rdev),
                        os.minor(info.st_rdev),
                    )


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
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if deadline is not None and time.monotonic() > deadline:
                        raise PymachineError(
                            f"timed out after {timeout:g} s waiting for {path}, held by {holder}",
                            hint="wait for the other pymachine to finish, or raise the timeout",
                        ) from None
                    time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
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

    for target in mounts_under(parse_mountinfo(text), PurePosixPath(root.resolve())):
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
    filesystems not entered)."""
    if not root.exists():
        return 0
    seen = set() if seen is None else seen
    device = os.lstat(root).st_dev
    total = 0
    stack = [root]
    while stack:
        current = stack.pop()
        try:
            entries = list(os.scandir(current))
        except OSError:
            continue
        for entry in entries:
            info = entry.stat(follow_symlinks=False)
            if info.st_dev != device:
                continue
            key = (info.st_dev, info.st_ino)
            if key in seen:
                continue
            seen.add(key)
            total += info.st_blocks * 512
            if stat.S_ISDIR(info.st_mode):
                stack.append(Path(entry.path))
    return total


def _open_in_root(root: Path, parts: list[str], path: str, owner: os.stat_result) -> int:
    """An fd of the directory parts name inside root, made where missing (owned
    by owner), never following a symlink."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    for index, part in enumerate(parts):
        where = "/" + "/".join(parts[: index + 1])
        try:
            try:
                child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                os.mkdir(part, 0o755, dir_fd=fd)
                child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                os.fchown(child, owner.st_uid, owner.st_gid)
        except OSError as exc:
            os.close(fd)
            raise PymachineError(
                f"cannot make {path} in the machine: {where} is a symlink or not a directory",
                hint="name the path by its real path inside the machine",
            ) from exc
        os.close(fd)
        fd = child
    return fd


def write_in_root(root: Path, path: str, content: str, mode: int) -> None:
    """Write content at the absolute path inside root, atomically, never following
    a symlink: a path through a symlink is refused, so nothing is written
    outside root whatever the root holds. What is made belongs to the owner of
    root, which is root inside the machine also when its ids are shifted to a
    user namespace's range."""
    parts = [p for p in path.split("/") if p]
    owner = root.lstat()
    fd = _open_in_root(root, parts[:-1], path, owner)
    try:
        name = parts[-1]
        temp = f".{name}.pymachine-tmp"
        out = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode, dir_fd=fd)
        try:
            os.write(out, content.encode())
            os.fchown(out, owner.st_uid, owner.st_gid)
            os.fchmod(out, mode)
            os.fsync(out)
        finally:
            os.close(out)
        os.rename(temp, name, src_dir_fd=fd, dst_dir_fd=fd)
    finally:
        os.close(fd)


def make_mount_point(root: Path, path: str, directory: bool) -> None:
    """Make the directory, or empty file, that something is mounted on at path
    inside root, unless it exists; as write_in_root, never through a symlink.
    A read-only root needs its mount points made beforehand."""
    parts = [p for p in path.split("/") if p]
    owner = root.lstat()
    fd = _open_in_root(root, parts if directory else parts[:-1], path, owner)
    try:
        if not directory:
            with contextlib.suppress(FileExistsError):
                out = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fd)
                os.fchown(out, owner.st_uid, owner.st_gid)
                os.close(out)
    finally:
        os.close(fd)
