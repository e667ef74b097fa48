"""Project quotas on the host: what limits a volume's ``size``.

A volume with a size is a project: ``data/`` gets a project id and the
inherit flag (FS_IOC_FSSETXATTR), so all that is made below it takes the id,
and the id gets a block hard limit (quotactl_fd(2), Q_SETQUOTA on PRJQUOTA).
That needs a filesystem that enforces project quotas: ext4 made with
``-O quota,project`` (or ``tune2fs -O project,quota``) and mounted with
``prjquota``, or XFS mounted with ``pquota``; ``problem`` says why another
cannot, before anything is made.

Inside a user namespace the kernel refuses to change an inode's project id
or its inherit flag (fileattr_set_prepare), and a hard link or a rename into
a directory of another project fails with EXDEV, so a machine with a user
namespace cannot take its files out of the project. Calls go through ctypes
and fcntl; failures are OSError with the kernel's errno.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from pymachined.core import quotas
from pymachined.core.quotas import Attributes, Usage

SYS_QUOTACTL_FD = 443  # the same on every architecture (a syscall of 5.14)
_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PINNED = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_REOPEN = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _quotactl(fd: int, command: int, project: int, buffer: ctypes.Array[ctypes.c_char]) -> None:
    result = _libc.syscall(
        ctypes.c_long(SYS_QUOTACTL_FD),
        ctypes.c_uint(fd),
        ctypes.c_uint(quotas.qcmd(command)),
        ctypes.c_uint(project),
        buffer,
    )
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


@contextlib.contextmanager
def _opened(directory: Path) -> Iterator[int]:
    fd = os.open(directory, _DIRECTORY)
    try:
        yield fd
    finally:
        os.close(fd)


def nearest(path: Path) -> Path:
    """The deepest existing directory on the way to path: where it would be made."""
    while not path.is_dir() and path != path.parent:
        path = path.parent
    return path


def problem(path: Path) -> str | None:
    """Why project quotas cannot limit what is made at path (its nearest
    existing directory's filesystem), or None where they are enforced."""
    where = nearest(path)
    buffer = ctypes.create_string_buffer(quotas.pack_statv_request(), quotas.STATV.size)
    try:
        # Only asked of: a symlinked state directory is followed, as mkdir will.
        fd = os.open(where, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            _quotactl(fd, quotas.Q_XGETQSTATV, 0, buffer)
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno in (errno.ENOSYS, errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
            return f"the filesystem of {where} has no quota support"
        return f"the quotas of the filesystem of {where} cannot be read: {exc.strerror}"
    accounted, enforced = quotas.parse_statv(buffer.raw)
    if enforced:
        return None
    if accounted:
        return f"the filesystem of {where} counts project quotas but does not enforce them"
    return f"the filesystem of {where} has no project quotas"


def attributes(fd: int) -> Attributes:
    """An open inode's flags and project id (FS_IOC_FSGETXATTR)."""
    buffer = bytearray(quotas.FSXATTR.size)
    fcntl.ioctl(fd, quotas.FS_IOC_FSGETXATTR, buffer, True)
    return quotas.parse_fsxattr(bytes(buffer))


def _assign(fd: int, project: int, *, inherit: bool) -> None:
    found = attributes(fd)
    xflags = found.xflags | quotas.FS_XFLAG_PROJINHERIT if inherit else found.xflags
    if found.projid == project and xflags == found.xflags:
        return
    fcntl.ioctl(fd, quotas.FS_IOC_FSSETXATTR, quotas.pack_fsxattr(xflags, project, found.rest))


def project_of(directory: Path) -> int:
    """The project id a directory carries (0: none), never through a symlink."""
    with _opened(directory) as fd:
        return attributes(fd).projid


def assign(directory: Path, project: int) -> None:
    """Give a directory (opened without following a symlink) the project id
    and the inherit flag: what is made below it from now on takes the id."""
    with _opened(directory) as fd:
        _assign(fd, project, inherit=True)


def assign_tree(directory: Path, project: int) -> None:
    """Give the project id to directory and to every directory and regular
    file below it (what ``chattr -R -p`` does), for a volume made before it
    had a size. The top is assigned first, so what is made meanwhile takes
    the id by inheritance. Each entry is pinned with O_PATH and checked before
    it is opened for the ioctl: a FIFO, a device or a symlink is never
    opened, and takes at most an inode outside the project. Other filesystems
    are not entered."""
    with _opened(directory) as top:
        _assign(top, project, inherit=True)
        device = os.fstat(top).st_dev
        stack = [os.dup(top)]
    while stack:
        fd = stack.pop()
        try:
            for name in os.listdir(fd):  # noqa: PTH208 - a directory descriptor
                child = _pinned(fd, name, device)
                if child is None:
                    continue
                kind, opened = child
                try:
                    _assign(opened, project, inherit=kind == stat.S_IFDIR)
                except OSError:
                    os.close(opened)
                    raise
                if kind == stat.S_IFDIR:
                    stack.append(opened)
                else:
                    os.close(opened)
        finally:
            os.close(fd)


def _pinned(fd: int, name: str, device: int) -> tuple[int, int] | None:
    """A directory or regular file below fd opened for an ioctl, with its
    kind; None for anything else or gone meanwhile."""
    try:
        path_fd = os.open(name, _PINNED, dir_fd=fd)
    except FileNotFoundError:
        return None
    try:
        info = os.fstat(path_fd)
        kind = stat.S_IFMT(info.st_mode)
        if kind not in (stat.S_IFDIR, stat.S_IFREG) or info.st_dev != device:
            return None
        # The O_PATH descriptor holds this inode: reopened, it is the same one.
        return kind, os.open(f"/proc/self/fd/{path_fd}", _REOPEN)
    finally:
        os.close(path_fd)


def usage(directory: Path, project: int) -> Usage:
    """A project's limit and what it holds, on the filesystem of directory."""
    buffer = ctypes.create_string_buffer(quotas.DQBLK.size)
    try:
        with _opened(directory) as fd:
            _quotactl(fd, quotas.Q_GETQUOTA, project, buffer)
    except OSError as exc:
        if exc.errno in (errno.ESRCH, errno.ENOENT):
            return Usage(0, 0, 0)  # no quota structure: nothing uses the id
        raise
    return quotas.parse_dqblk(buffer.raw)


def set_limit(directory: Path, project: int, size: int) -> None:
    """Set a project's block hard limit (size in bytes, rounded up to KiB; 0
    removes it) on the filesystem of directory. A limit below what the
    project holds is set all the same: writes then fail until it is below."""
    buffer = ctypes.create_string_buffer(quotas.pack_limit(size), quotas.DQBLK.size)
    with _opened(directory) as fd:
        _quotactl(fd, quotas.Q_SETQUOTA, project, buffer)


def reserved(projid: Path = Path("/etc/projid")) -> set[int]:
    """The project ids the host's /etc/projid names (empty without one)."""
    try:
        return set(quotas.parse_projid(projid.read_text(errors="replace")))
    except FileNotFoundError:
        return set()


def choose(directory: Path, scope: str, name: str, taken: set[int]) -> int | None:
    """A free project id for volume name, on the filesystem of directory:
    the first of its candidates that no record holds (taken), /etc/projid
    does not name, and nothing on the filesystem uses. None if all are used."""
    skip = taken | reserved()
    for candidate in quotas.project_candidates(scope, name):
        if candidate not in skip and not usage(directory, candidate).taken:
            return candidate
    return None
