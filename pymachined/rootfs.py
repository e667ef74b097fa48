"""Machine roots made from image layers: overlay (the default), copy, ephemeral.

Overlay: the image layers are read-only lower directories; the machine writes
to its own upper directory, so deletions are whiteouts and the image never
changes. Copy: a full copy (reflinks where the filesystem has them). Ephemeral:
an overlay whose upper directory lives on a tmpfs and is gone at unmount.
A machine with a user namespace (``private_users``) has a range of 65536 IDs
of its own, chosen once and kept in its root record. Its overlay's image
layers are mounted ID-mapped to that range (an owner 0 on disk shows as the
range's base) and its upper directory holds the range's IDs as they are, so
its root is already owned by its range with nothing copied or chowned, and
nspawn is told to leave ownership alone. Where layers cannot be mounted
ID-mapped, pymachine shifts the root's owners itself, as nspawn's own
``PrivateUsersOwnership=chown`` would: overlays are mounted with metacopy, so
that this copies up inodes, not file data. The same walk moves a root between
ranges, and back to the host's IDs for ``private_users: false``.
A root is removed only after everything mounted under it is unmounted, and the
removal never crosses into another filesystem. Every root is mounted nodev
(a copy is bound onto itself with nodev), so a device node an image holds
opens nothing even where a machine's device cgroup would allow it.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pymachined import files, run
from pymachined.core import commands, idshift
from pymachined.core.layout import Layout
from pymachined.core.parsers import Mount, mounts_at
from pymachined.core.plan import Kept
from pymachined.core.spec import Machine, RootfsMode
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

PARTS = ("rootfs", "upper", "work", "ephemeral", "lower", "rootfs.partial", "rootfs.view")
"""What a root is made of in a machine's directory, besides its record."""


@dataclass(frozen=True)
class Root:
    """A machine's root: how it is made and from which layers (topmost first)."""

    name: str
    mode: RootfsMode
    layers: tuple[str, ...]
    uid_base: int | None = None
    """The base of the machine's user-namespace range (None: a record from
    before pymachine chose ranges, whose machine nspawn gives one)."""


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
        base = data.get("uid_base")
        if base is not None and not isinstance(base, int):
            raise TypeError(f"uid_base is {base!r}")
        return Root(name, RootfsMode(data["mode"]), tuple(data["layers"]), base)
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
    uid_base: int | None = None,
    durable: bool = True,
) -> Root:
    """Make a machine's root directories from an image chain (topmost first),
    for the user-namespace range at uid_base; the record is written last, so
    a root without one is never taken as complete (durably, unless the caller
    syncs the filesystem later)."""
    base = _dir(layout, name)
    fresh = not base.exists()  # nothing can be mounted below a directory made now
    base.mkdir(parents=True, exist_ok=True)
    (base / OWNER).write_text("pymachine\n")
    if not fresh and not (base / RECORD).exists():
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
    root = Root(name, mode, tuple(r.key for r in chain), uid_base)
    _write_record(base, root, durable=durable)
    return root


def _write_record(base: Path, root: Root, *, durable: bool = True) -> None:
    record: dict[str, object] = {"mode": root.mode.value, "layers": list(root.layers)}
    if root.uid_base is not None:
        record["uid_base"] = root.uid_base
    files.atomic_write_json(base / RECORD, record, durable=durable)


def adopt(
    layout: Layout,
    name: str,
    mode: RootfsMode,
    layers: tuple[str, ...],
    *,
    uid_base: int | None = None,
) -> Root:
    """Write a root record for the writes a machine kept (see ``kept``), so
    that they are its root again, over ``layers``."""
    base = _dir(layout, name)
    (base / OWNER).write_text("pymachine\n")
    if mode is RootfsMode.OVERLAY:
        (base / "rootfs").mkdir(exist_ok=True)
        (base / "work").mkdir(exist_ok=True)
    root = Root(name, mode, layers, uid_base)
    _write_record(base, root)
    return root


def claim_range(layout: Layout, root: Root, uid_base: int) -> Root:
    """The root with its record naming the range at uid_base (a record from
    before ranges were recorded gets the one chosen for it)."""
    if root.uid_base == uid_base:
        return root
    claimed = Root(root.name, root.mode, root.layers, uid_base)
    _write_record(_dir(layout, root.name), claimed)
    return claimed


def ranges(layout: Layout, names: list[str]) -> dict[str, int]:
    """The user-namespace range base of each named machine: the one its root
    record keeps; for a root from before ranges were recorded, the range
    nspawn shifted it to (its top's owner); otherwise a new one
    (``idshift.pick``), never one another of this host's machines holds, nor
    one a running systemd-nspawn picked (its lock files)."""
    held: dict[str, int] = {}
    machines = Path(layout.machines_dir)
    for entry in sorted(machines.iterdir()) if machines.is_dir() else []:
        found = _recorded_range(layout, entry.name) if entry.is_dir() else None
        if found is not None:
            held[entry.name] = found
    taken = set(held.values()) | _nspawn_picks()
    out: dict[str, int] = {}
    for name in names:
        if name in held:
            out[name] = held[name]
        else:
            out[name] = idshift.pick(f"{layout.root}\0{name}", taken)
            taken.add(out[name])
    return out


NSPAWN_PICKS = Path("/run/systemd/nspawn-uid")


def _nspawn_picks() -> set[int]:
    try:
        return {int(entry.name) for entry in NSPAWN_PICKS.iterdir() if entry.name.isdigit()}
    except OSError:
        return set()


def _recorded_range(layout: Layout, name: str) -> int | None:
    try:
        root = read(layout, name)
    except PymachineError:
        return None
    if root is None:
        return None
    if root.uid_base is not None:
        return root.uid_base
    top = _dir(layout, name) / ("rootfs" if root.mode is RootfsMode.COPY else "upper")
    try:
        return idshift.range_of(top.lstat().st_uid)
    except OSError:
        return None


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
    return bool(mounts_at(text, PurePosixPath(path.resolve())))


def mount(layout: Layout, store: ImageStore, root: Root, ids: int = 0) -> Path:
    """Assemble the root at machines/NAME/rootfs (idempotent), its image layers
    shown in the range at ``ids`` (0: the host's IDs); return that path. A
    root mounted for another range is mounted again (its machine is stopped).
    A lock per machine keeps two mounters (apply, and a unit's ExecStartPre
    at boot) from stacking two overlays."""
    with files.locked(Path(layout.mount_lock(root.name))):
        return _mount(layout, store, root, ids)


def shown_ids(root: Root, machine: Machine | None) -> int:
    """The range a machine's overlay shows its image layers in: its own, with
    a user namespace (a copied root is nspawn's to map, and a root from
    before ranges were recorded is nspawn's to shift); the host's without.
    ``machine`` None (its spec is not on record): as the default, with one."""
    if root.mode is RootfsMode.COPY or root.uid_base is None:
        return 0
    if machine is not None and not machine.security.private_users:
        return 0
    return root.uid_base


def _lower_dir(base: Path, ids: int, index: int) -> Path:
    """Where an image layer is mounted ID-mapped to the range at ids, for the
    overlay to take it (named so that the overlay's options tell the range)."""
    return base / "lower" / f"{ids}.{index}"


def mounted_ids(layout: Layout, name: str) -> int | None:
    """The range a machine's mounted overlay shows its image layers in (0: the
    host's IDs), or None if its root is not mounted as an overlay."""
    return _shown_by(layout, name, _mounts_at_root(layout, name))


def _mounts_at_root(layout: Layout, name: str) -> list[Mount]:
    """What is mounted at a machine's rootfs directory, the last on top."""
    target = PurePosixPath(Path(layout.rootfs(name)).resolve())
    return mounts_at(Path("/proc/self/mountinfo").read_text(), target)


def _shown_by(layout: Layout, name: str, found: list[Mount]) -> int | None:
    """The range the overlay on top of found shows its image layers in, as
    mounted_ids says."""
    if not found or found[-1].fstype != "overlay":
        return None
    lower = PurePosixPath(Path(layout.machine_dir(name)).resolve()) / "lower"
    for option in found[-1].options.split(","):
        if option.startswith("lowerdir="):
            first = PurePosixPath(option.removeprefix("lowerdir=").split(":")[0])
            if first.parent == lower:
                return int(first.name.split(".")[0])
    return 0


_fallback_warned: set[str] = set()


def _mount(layout: Layout, store: ImageStore, root: Root, ids: int) -> Path:
    base = _dir(layout, root.name)
    rootfs = base / "rootfs"
    if root.mode is RootfsMode.COPY:
        if not is_mounted(rootfs):
            run.run(commands.nodev_bind_argv(PurePosixPath(rootfs)))
        return rootfs
    found = _mounts_at_root(layout, root.name)  # one look at the mount table, not two
    current = _shown_by(layout, root.name, found)
    if current == ids:
        return rootfs
    if found:
        files.unmount_under(rootfs)
    trees = [Path(r.tree) for r in store.chain(root.layers[0])]
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
    lowers = _map_layers(base, trees, ids) if ids else trees
    try:
        if lowers is not trees and not any(os.scandir(upper)):
            # A fresh upper directory: the root's top, owned by the range.
            os.chown(upper, ids, ids)
        options = commands.overlay_options(
            [PurePosixPath(p) for p in lowers],
            PurePosixPath(upper),
            PurePosixPath(work),
            metacopy=True,
        )
        try:
            files.mount_overlay(options, rootfs)
        except OSError as exc:
            raise PymachineError(
                f"cannot mount the root of {root.name} at {rootfs}: {exc.strerror}",
                hint="dmesg says why overlayfs refused it",
            ) from exc
    finally:
        if lowers is not trees:  # the overlay holds its own clones of them
            for lower in lowers:
                files.detach(lower)
            files.remove_tree(base / "lower")
    return rootfs


def _map_layers(base: Path, trees: list[Path], ids: int) -> list[Path]:
    """The image layers mounted ID-mapped to the range at ids, at their
    ``_lower_dir`` paths; the trees themselves (with a one-line notice, once
    per process) where the kernel or their filesystem cannot, so that the
    root is shifted by a walk instead (``reown``)."""
    files.unmount_under(base / "lower")
    files.remove_tree(base / "lower")
    staged = [_lower_dir(base, ids, index) for index in range(len(trees))]
    for path in staged:
        path.mkdir(parents=True)
    try:
        files.mount_idmapped(trees, staged, ids)
    except OSError as exc:
        files.unmount_under(base / "lower")
        files.remove_tree(base / "lower")
        where = str(trees[0].parent.parent)
        if where not in _fallback_warned:
            _fallback_warned.add(where)
            print(
                f"notice: image layers in {where} cannot be mounted ID-mapped "
                f"({exc.strerror or exc}); machines' roots are shifted to their ranges "
                "instead (a copy-up of every inode at a first start)",
                file=sys.stderr,
            )
        return trees
    return staged


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
    """The ID range a machine's root is owned by (kept in its top's owner),
    or None if its IDs are the host's."""
    try:
        owner = Path(layout.rootfs(name)).lstat()
    except FileNotFoundError:
        return None
    base = idshift.range_of(owner.st_uid)
    if base is None:
        return None
    return {"uid_base": base, "gid_base": base, "size": idshift.RANGE}


def reown(root: Path, target: int, lowers: int) -> int:
    """Move the owners of a mounted root to the range at ``target`` (0: the
    host's IDs) from the ranges ``idshift.sources`` names: where its last walk
    (or nspawn's shift) left it, and the range its image layers show in
    (``lowers``). A root already in target is left alone: nothing is walked.
    Every owner, named ACL entry and file capability's root ID of those ranges
    moves, as nspawn's own shift does. The walk opens each directory by
    descriptor, follows no symlink and stays on the root's filesystem;
    setuid and setgid bits and file capabilities, which chown(2) drops, are
    set again; the top goes last, so a walk cut short is walked again. How
    many entries it moved."""
    moves = idshift.sources(root.lstat().st_uid, lowers, target)
    if not moves:
        return 0
    moved = 0
    for _, dirs, names, fd in os.fwalk(root, follow_symlinks=False):
        device = os.fstat(fd).st_dev
        dirs[:] = [d for d in dirs if os.lstat(d, dir_fd=fd).st_dev == device]
        for name in [*dirs, *names]:
            moved += _reown_entry(fd, name, moves, target)
    moved += _reown_entry(None, str(root), moves, target)
    return moved


def _reown_entry(fd: int | None, name: str, moves: tuple[int, ...], target: int) -> int:
    info = os.stat(name, dir_fd=fd, follow_symlinks=False)
    uid, gid = (_moved(value, moves, target) for value in (info.st_uid, info.st_gid))
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
        for source in moves:  # each moves only its own range's IDs, never target's
            caps = idshift.shift_caps(caps, source, target)
        os.setxattr(path, idshift.CAPABILITY_XATTR, caps)
    for key in idshift.ACL_XATTRS:
        acl = _xattr(path, key)
        if acl is not None:
            for source in moves:
                acl = idshift.shift_acl(acl, source, target)
            os.setxattr(path, key, acl)
    return 1


def _moved(value: int, moves: tuple[int, ...], target: int) -> int:
    base = idshift.range_of(value)
    source = 0 if base is None else base
    return idshift.shifted(value, source, target) if source in moves else value


def _xattr(path: str, key: str) -> bytes | None:
    try:
        return os.getxattr(path, key)
    except OSError:
        return None  # none, or none on this kind of file
