"""Machine roots made from image layers: overlay (the default), copy, ephemeral.

Overlay: the image layers are read-only lower directories; the machine writes
to its own upper directory, so deletions are whiteouts and the image never
changes. Copy: a full copy (reflinks where the filesystem has them). Ephemeral:
an overlay whose upper directory lives on a tmpfs and is gone at unmount.
Overlays are mounted with metacopy, so that systemd-nspawn's shift of a root to
a user namespace's ids (``private_users``) copies up inodes, not file data.
A root is removed only after everything mounted under it is unmounted, and the
removal never crosses into another filesystem. Every root is mounted nodev
(a copy is bound onto itself with nodev), so a device node an image holds
opens nothing even where a machine's device cgroup would allow it.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pymachined import files, run
from pymachined.core import commands, idshift
from pymachined.core.layout import Layout
from pymachined.core.parsers import parse_mountinfo
from pymachined.core.plan import Kept
from pymachined.core.spec import RootfsMode
from pymachined.errors import PymachineError
from pymachined.images import ImageRecord, ImageStore

RECORD = "rootfs.json"
OWNER = ".pymachine-owner"
"""Written into a machine directory before anything else, so that a directory
left by a create that was killed half-way is still known as pymachine's."""


REMOVING = ".pymachine-removing"
"""Written before a root's record goes when the root is removed, and removed
last: a directory with it holds what a removal killed half-way left, which is
cleared, never kept."""

PARTS = ("rootfs", "upper", "work", "ephemeral", "rootfs.partial", "rootfs.view")
"""What a root is made of in a machine's directory, besides its record."""


@dataclass(frozen=True)
class Root:
    """A machine's root: how it is made and from which layers (topmost first)."""

    name: str
    mode: RootfsMode
    layers: tuple[str, ...]


def _dir(layout: Layout, name: str) -> Path:
    return Path(layout.machine_dir(name))


def _entries(path: Path) -> Iterator[tuple[str, os.stat_result]]:
    """Every entry under a directory but the directories it descends into,
    with its lstat (never following a symlink, the top one included, or
    crossing into another filesystem)."""
    try:
        top = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(top.st_mode):
        return
    pending = [path]
    while pending:
        directory = pending.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(info.st_mode) and info.st_dev == top.st_dev:
                pending.append(Path(entry.path))
            else:
                yield entry.path, info


def _tree_size(path: Path) -> tuple[bool, int]:
    """Whether a directory holds anything, and the bytes its files take."""
    try:
        found = stat.S_ISDIR(path.lstat().st_mode) and any(True for _ in os.scandir(path))
    except OSError:
        found = False
    total = sum(
        info.st_blocks * 512 for _, info in _entries(path) if not stat.S_ISDIR(info.st_mode)
    )
    return found, total


def written(layout: Layout, name: str) -> int | None:
    """The bytes a machine wrote in its root, which making it again or removing
    it throws away: the data in its overlay's upper directory (``_data_size``),
    0 for an ephemeral root or none, None for a copied root (all of it is the
    machine's: what it wrote is not told apart)."""
    try:
        root = read(layout, name)
    except PymachineError:
        return None  # nothing tells what it holds: take it as all the machine's
    if root is not None and root.mode is RootfsMode.EPHEMERAL:
        return 0
    if root is not None and root.mode is RootfsMode.COPY:
        return None
    return _data_size(_dir(layout, name) / "upper")


METACOPY = "trusted.overlay.metacopy"


def _data_size(upper: Path) -> int:
    """The bytes on disk of the regular files in an overlay's upper directory
    that hold data of their own: a metacopy copy-up (an owner or mode change,
    such as nspawn's shift of a root into a user namespace) holds none, only
    the xattrs that point at the lower file's data."""
    return sum(
        info.st_blocks * 512
        for path, info in _entries(upper)
        if stat.S_ISREG(info.st_mode) and not _metacopy(path)
    )


def _metacopy(path: str) -> bool:
    try:
        os.getxattr(path, METACOPY, follow_symlinks=False)
    except OSError:
        return False
    return True


def kept(layout: Layout, name: str) -> Kept | None:
    """What a machine without a readable root record has written, or None if
    there is nothing to keep: no upper directory, an empty unmounted one (a
    create killed half-way), or what a removal killed half-way left."""
    base = _dir(layout, name)
    if (base / REMOVING).exists():
        return None
    upper = base / "upper"
    if upper.is_dir() and not upper.is_symlink():
        found, size = _tree_size(upper)
        # Mounted: a running machine's root (a create mounts only after its
        # record is written), kept even before it wrote anything.
        if found or is_mounted(base / "rootfs"):
            return Kept(RootfsMode.OVERLAY, size)
    rootfs = base / "rootfs"
    if rootfs.is_dir() and not rootfs.is_symlink() and not is_mounted(rootfs):
        found, size = _tree_size(rootfs)
        if found:  # a copy is renamed into place whole, so this one is complete
            return Kept(RootfsMode.COPY, size)
    return None


def read(layout: Layout, name: str) -> Root | None:
    """The root record of a machine, or None if it has no root."""
    path = _dir(layout, name) / RECORD
    try:
        data = json.loads(path.read_text())
        return Root(name, RootfsMode(data["mode"]), tuple(data["layers"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PymachineError(
            f"root record {path} is unreadable: {exc}",
            hint=f"remove the machine's root with: pymachine destroy {name}",
        ) from exc


def create(
    layout: Layout,
    name: str,
    mode: RootfsMode,
    chain: list[ImageRecord],
    *,
    durable: bool = True,
) -> Root:
    """Make a machine's root directories from an image chain (topmost first); the
    record is written last, so a root without one is never taken as complete
    (durably, unless the caller syncs the filesystem later)."""
    base = _dir(layout, name)
    base.mkdir(parents=True, exist_ok=True)
    (base / OWNER).write_text("pymachine\n")
    if not (base / RECORD).exists():
        # Whatever a create or a removal killed half-way left is never mixed
        # into the new root (the record goes first when a root is removed).
        # A machine's own writes are never cleared here: plan adopts them.
        if kept(layout, name) is not None:
            raise PymachineError(
                f"{base} holds a machine's writes but no root record; not removing them",
                hint=f"run pymachine apply to keep them, or pymachine destroy {name}",
            )
        files.unmount_under(base)
        for part in PARTS:
            files.remove_tree(base / part)
        (base / REMOVING).unlink(missing_ok=True)
    rootfs = base / "rootfs"
    if mode is RootfsMode.COPY:
        _copy(base, chain)
    else:
        rootfs.mkdir(exist_ok=True)
        if mode is RootfsMode.OVERLAY:
            (base / "upper").mkdir(exist_ok=True)
            (base / "work").mkdir(exist_ok=True)
    root = Root(name, mode, tuple(r.key for r in chain))
    record = {"mode": mode.value, "layers": list(root.layers)}
    files.atomic_write_json(base / RECORD, record, durable=durable)
    return root


def adopt(layout: Layout, name: str, mode: RootfsMode, layers: tuple[str, ...]) -> Root:
    """Write a root record for the writes a machine kept (see ``kept``), so
    that they are its root again, over ``layers``."""
    base = _dir(layout, name)
    (base / OWNER).write_text("pymachine\n")
    if mode is RootfsMode.OVERLAY:
        (base / "rootfs").mkdir(exist_ok=True)
        (base / "work").mkdir(exist_ok=True)
    files.atomic_write_json(base / RECORD, {"mode": mode.value, "layers": list(layers)})
    return Root(name, mode, layers)


def _copy(base: Path, chain: list[ImageRecord]) -> None:
    partial = base / "rootfs.partial"
    files.remove_tree(partial)
    partial.mkdir()
    if len(chain) == 1:
        source = chain[0].tree
        run.run(commands.copy_tree_argv(PurePosixPath(source), PurePosixPath(partial)))
    else:
        view = base / "rootfs.view"
        view.mkdir(exist_ok=True)
        lowers = [PurePosixPath(r.tree) for r in chain]
        run.run(commands.overlay_mount_argv(lowers, PurePosixPath(view)))
        try:
            run.run(commands.copy_tree_argv(PurePosixPath(view), PurePosixPath(partial)))
        finally:
            files.unmount_under(view)
        view.rmdir()
    partial.rename(base / "rootfs")


def is_mounted(path: Path) -> bool:
    """Whether something is mounted exactly at path."""
    text = Path("/proc/self/mountinfo").read_text()
    target = PurePosixPath(path.resolve())
    return any(m.target == target for m in parse_mountinfo(text))


def mount(layout: Layout, store: ImageStore, root: Root) -> Path:
    """Assemble the root at machines/NAME/rootfs (idempotent); return that path.
    A lock per machine keeps two mounters (apply, and a unit's ExecStartPre at
    boot) from stacking two overlays."""
    with files.locked(Path(layout.mount_lock(root.name))):
        return _mount(layout, store, root)


def _mount(layout: Layout, store: ImageStore, root: Root) -> Path:
    base = _dir(layout, root.name)
    rootfs = base / "rootfs"
    if is_mounted(rootfs):
        return rootfs
    if root.mode is RootfsMode.COPY:
        run.run(commands.nodev_bind_argv(PurePosixPath(rootfs)))
        return rootfs
    lowers = [PurePosixPath(r.tree) for r in store.chain(root.layers[0])]
    if root.mode is RootfsMode.EPHEMERAL:
        scratch = base / "ephemeral"
        scratch.mkdir(exist_ok=True)
        if not is_mounted(scratch):
            run.run(commands.tmpfs_mount_argv(PurePosixPath(scratch)))
        upper, work = scratch / "upper", scratch / "work"
    else:
        upper, work = base / "upper", base / "work"
    upper.mkdir(exist_ok=True)
    work.mkdir(exist_ok=True)
    run.run(
        commands.overlay_mount_argv(
            lowers, PurePosixPath(rootfs), PurePosixPath(upper), PurePosixPath(work), metacopy=True
        )
    )
    return rootfs


def unmount(layout: Layout, name: str) -> None:
    """Unmount everything under a machine's directory (an ephemeral layer is gone)."""
    base = _dir(layout, name)
    if base.exists():
        files.unmount_under(base)


def remove(layout: Layout, name: str) -> None:
    """Remove a machine's root, its record first (so a removal killed half-way
    leaves no root taken as complete), after unmounting everything under it."""
    base = _dir(layout, name)
    unmount(layout, name)
    if base.is_dir():
        files.atomic_write(base / REMOVING, "pymachine\n", 0o644)
    (base / RECORD).unlink(missing_ok=True)
    for part in PARTS:
        files.remove_tree(base / part)
    (base / REMOVING).unlink(missing_ok=True)


def users(layout: Layout) -> dict[str, list[str]]:
    """Image keys and the machines whose roots use them."""
    out: dict[str, list[str]] = {}
    machines = Path(layout.machines_dir)
    if not machines.is_dir():
        return out
    for entry in sorted(machines.iterdir()):
        root = read(layout, entry.name) if entry.is_dir() else None
        for key in root.layers if root else ():
            out.setdefault(key, []).append(entry.name)
    return out


def user_namespace(layout: Layout, name: str) -> dict[str, int] | None:
    """The ID range a machine's root is shifted to (nspawn keeps it in the
    root's ownership), or None if its ids are the host's."""
    try:
        owner = Path(layout.rootfs(name)).lstat()
    except FileNotFoundError:
        return None
    if owner.st_uid == 0:
        return None
    return {"uid_base": owner.st_uid, "gid_base": owner.st_gid, "size": 65536}


def unshift(root: Path) -> int:
    """Give a root nspawn shifted to a user namespace's range back the host's
    IDs, for a machine that now runs without one (``private_users: false``):
    every owner and every named ACL entry of the range moves to the range at
    0, as nspawn's own shift does the other way. A root whose top is owned by
    the host's 0 is left alone. The walk opens each directory by descriptor,
    follows no symlink and stays on the root's filesystem; setuid and setgid
    bits and file capabilities, which chown(2) drops, are set again. How many
    entries it moved."""
    top = root.lstat()
    base = top.st_uid
    if base == 0 or base % idshift.RANGE:
        return 0
    moved = 0
    for _, dirs, names, fd in os.fwalk(root, follow_symlinks=False):
        device = os.fstat(fd).st_dev
        dirs[:] = [d for d in dirs if os.lstat(d, dir_fd=fd).st_dev == device]
        for name in [*dirs, *names]:
            moved += _unshift_entry(fd, name, base)
    moved += _unshift_entry(None, str(root), base)
    return moved


def _unshift_entry(fd: int | None, name: str, base: int) -> int:
    info = os.stat(name, dir_fd=fd, follow_symlinks=False)
    uid, gid = idshift.shifted(info.st_uid, base, 0), idshift.shifted(info.st_gid, base, 0)
    if (uid, gid) == (info.st_uid, info.st_gid):
        return 0
    if stat.S_ISLNK(info.st_mode):
        os.chown(name, uid, gid, dir_fd=fd, follow_symlinks=False)
        return 1
    path = name if fd is None else f"/proc/self/fd/{fd}/{name}"
    caps = _xattr(path, idshift.CAPABILITY_XATTR) if stat.S_ISREG(info.st_mode) else None
    os.chown(name, uid, gid, dir_fd=fd, follow_symlinks=False)
    if info.st_mode & (stat.S_ISUID | stat.S_ISGID):
        os.chmod(name, stat.S_IMODE(info.st_mode), dir_fd=fd)  # not a symlink: lstat said
    if caps is not None:
        os.setxattr(path, idshift.CAPABILITY_XATTR, idshift.shift_caps(caps, base, 0))
    for key in idshift.ACL_XATTRS:
        acl = _xattr(path, key)
        if acl is not None:
            os.setxattr(path, key, idshift.shift_acl(acl, base, 0))
    return 1


def _xattr(path: str, key: str) -> bytes | None:
    try:
        return os.getxattr(path, key)
    except OSError:
        return None  # none, or none on this kind of file
