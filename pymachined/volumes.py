"""Volumes on the host: each declared volume is a directory under the state
root, ``volumes/NAME/`` with its ``data/`` and its record, made once by apply
and bound into the machines that use it (``render.all_binds``, ID-mapped).

A volume outlives every root: no plan removes one, and neither do
``destroy``, ``apply --prune`` nor ``pymachine prune``; ``pymachine volume rm``
does, and only while no machine's record names it. What a volume holds is
stored with the machine's own IDs (its files as seen inside), so a machine
moved to another UID range, another image or ``private_users: false`` reads
the same files as the same owners. The first machine to use a volume seeds
an empty one from its image's content at the volume's path, as Docker fills
an empty named volume; a volume that holds data is never written by
pymachine again.
"""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import replace
from pathlib import Path, PurePosixPath

from pymachined import files, quota, run
from pymachined.core import commands
from pymachined.core.layout import Layout
from pymachined.core.records import VolumeRecord
from pymachined.core.sizes import format_size
from pymachined.core.spec import Volume
from pymachined.errors import CommandError, PymachineError
from pymachined.images import ImageRecord
from pymachined.state import StateStore

OWNER = ".pymachine-owner"  # the mark on every directory pymachine may remove
SEEDING = "data.seeding"  # a first copy from an image, renamed to data/ when whole
VIEW = "image.view"  # a read-only overlay of the image, for that copy
_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _owner(spec: Volume) -> tuple[int, int]:
    uid, _, gid = (spec.owner or "0:0").partition(":")
    return int(uid), int(gid)


def _lock(layout: Layout, name: str) -> Path:
    return Path(layout.run_dir) / "volumes" / f"{name}.lock"


def create(layout: Layout, state: StateStore, spec: Volume, created: str) -> VolumeRecord:
    """Make a volume's directory, its empty ``data/`` (owned by the declared
    owner, 0:0 without one, as seen inside a machine; a project with the
    declared size as its limit) and its record, written last. The volumes
    directory is root's alone (0700): a file a machine's root made setuid
    there is a setuid file of the host's root."""
    top = Path(layout.volumes_dir)
    top.mkdir(mode=0o700, parents=True, exist_ok=True)
    top.chmod(0o700)
    with files.locked(_lock(layout, spec.name)):
        found = state.volume(spec.name)
        if found is not None:
            return found
        base = Path(layout.volume_dir(spec.name))
        base.mkdir(mode=0o700, exist_ok=True)
        (base / OWNER).write_text("pymachine\n")
        data = base / "data"
        data.mkdir(mode=0o755, exist_ok=True)
        # Again after a create killed before its record: no machine has had it.
        os.chown(data, *_owner(spec), follow_symlinks=False)
        project = 0 if spec.size is None else _limit(layout, state, spec.name, spec.size, 0)
        record = VolumeRecord(spec.name, spec, created=created, project=project)
        state.put_volume(record)
        return record


def resize(layout: Layout, state: StateStore, spec: Volume) -> VolumeRecord:
    """Make a recorded volume's quota the declared size: a volume made without
    one becomes a project first (all it holds is given the id), and a size
    dropped leaves the project without a limit. A size below what the volume
    holds is set all the same, as XFS and Podman do: its machines' writes fail
    (EDQUOT) until it holds less. The record, written last, keeps the size."""
    with files.locked(_lock(layout, spec.name)):
        record = state.volume(spec.name)
        if record is None:
            raise PymachineError(
                f"volume {spec.name} is not on record",
                hint="run pymachine apply, which makes the declared volumes",
            )
        project = record.project
        if spec.size is not None or project:
            project = _limit(layout, state, spec.name, spec.size or 0, project)
        updated = replace(
            record, spec=record.spec.model_copy(update={"size": spec.size}), project=project
        )
        state.put_volume(updated)
        return updated


def _limit(layout: Layout, state: StateStore, name: str, size: int, project: int) -> int:
    """Put a volume's data under a project with size (0: none) as its block
    limit, and give the project's id: the recorded one, else the one ``data/``
    carries (a create or a resize killed before its record), else a new one
    that no other volume, /etc/projid or the filesystem uses. Whatever the
    data holds without the id is given it."""
    data = Path(layout.volume_data(name))
    found, _ = state.scan_volumes()
    others = {r.project for n, r in found.items() if n != name and r.project}
    carried = quota.project_of(data)
    if not project and carried and carried not in others:
        project = carried
    if not project or project in others:
        chosen = quota.choose(data, layout.scope, name, others)
        if chosen is None:
            raise PymachineError(
                f"no free project id for volume {name} on the filesystem of {data}",
                hint="free project ids in /etc/projid, or drop size",
            )
        project = chosen
    if carried != project:
        quota.assign_tree(data, project)
    quota.set_limit(data, project, size)
    return project


def seed(
    layout: Layout,
    state: StateStore,
    name: str,
    target: str,
    machine: str,
    chain: list[ImageRecord],
) -> None:
    """At a volume's first use, copy into it what the machine's image holds at
    the volume's path (owners, modes, links, xattrs). Only an empty volume
    that has taken nothing yet is seeded; the copy is made beside ``data/``
    and renamed into place whole, so a crash leaves either nothing or all of
    it. A path the image does not hold as a directory, or reaches through a
    symlink, seeds nothing."""
    with files.locked(_lock(layout, name)):
        record = state.volume(name)
        if record is None:
            raise PymachineError(
                f"machine {machine} uses volume {name}, which is not on record",
                hint="run pymachine apply, which makes the declared volumes",
            )
        if record.seeded:
            return
        base = Path(layout.volume_dir(name))
        data = base / "data"
        if any(os.scandir(data)):
            state.put_volume(_seeded(record, machine, target))
            return
        staging = base / SEEDING
        files.remove_tree(staging)
        if _copy_from_image(base, chain, target, staging, record):
            owner = data.stat()
            if record.spec.owner is not None:  # the declared owner wins
                os.chown(staging, owner.st_uid, owner.st_gid)
            staging.rename(data)  # over the empty data/ in one step; refused if not empty
            files.fsync_dir(base)
        state.put_volume(_seeded(record, machine, target))


def _seeded(record: VolumeRecord, machine: str, target: str) -> VolumeRecord:
    return replace(record, seeded=f"{machine}:{target}")


def _copy_from_image(
    base: Path, chain: list[ImageRecord], target: str, staging: Path, record: VolumeRecord
) -> bool:
    """Copy the image's directory at target to staging (in the volume's
    project, so the copy counts against its size); whether there was one."""
    view = base / VIEW
    if len(chain) == 1:
        tree = Path(chain[0].tree)
    else:
        files.unmount_under(view)
        view.mkdir(exist_ok=True)
        run.run(
            commands.overlay_mount_argv([PurePosixPath(r.tree) for r in chain], PurePosixPath(view))
        )
        tree = view
    try:
        if not _real_directory(tree, target):
            return False
        staging.mkdir(mode=0o755)
        if record.project:
            quota.assign(staging, record.project)
        source = tree / target.lstrip("/")
        try:
            run.run(commands.copy_tree_argv(PurePosixPath(source), PurePosixPath(staging)))
        except CommandError as exc:
            if not record.project:
                raise
            said = (exc.stderr.strip().splitlines() or [f"exit code {exc.returncode}"])[-1]
            raise PymachineError(
                f"volume {record.name} cannot take what the image holds at {target}: {said}",
                hint=f"raise its size (now {format_size(record.spec.size or 0)}), or seed it "
                "another way",
            ) from exc
        # The top of the copy takes the source directory's owner and mode.
        info = source.lstat()
        os.chown(staging, info.st_uid, info.st_gid)
        staging.chmod(stat.S_IMODE(info.st_mode))
        return True
    finally:
        if tree == view:
            files.unmount_under(view)
            view.rmdir()


def _real_directory(tree: Path, target: str) -> bool:
    """Whether target names a directory in tree through directories alone."""
    fd = os.open(tree, _DIRECTORY)
    try:
        for part in PurePosixPath(target).parts[1:]:
            try:
                child = os.open(part, _DIRECTORY, dir_fd=fd)
            except OSError:
                return False  # missing, a symlink, or not a directory
            os.close(fd)
            fd = child
        return True
    finally:
        os.close(fd)


def size(layout: Layout, name: str) -> int:
    """The bytes on disk a volume's data takes (never following a symlink)."""
    return files.tree_usage(Path(layout.volume_data(name)))


def remove(layout: Layout, name: str) -> None:
    """Remove a volume and what it holds: its record first, so that a removal
    killed half-way leaves no volume that looks whole."""
    base = Path(layout.volume_dir(name))
    if not (base / OWNER).exists():
        raise PymachineError(
            f"{base} is not marked as pymachine's; not removing it",
            hint="remove it by hand if it is really a volume",
        )
    with files.locked(_lock(layout, name)):
        record = StateStore(layout).volume(name)
        StateStore(layout).volume_path(name).unlink(missing_ok=True)
        files.unmount_under(base)
        for entry in sorted(base.iterdir()):
            if entry.name != OWNER:
                files.remove_tree(entry)
        if record is not None and record.project:  # its id free for another volume
            with contextlib.suppress(OSError):  # a filesystem without quotas now
                quota.set_limit(base, record.project, 0)
        (base / OWNER).unlink()
        base.rmdir()


IMPORTING = "data.importing"  # an archive being unpacked, renamed to data/ when whole


def export(layout: Layout, name: str, file: str) -> None:
    """Write a volume's data as a tar to file ("-": stdout), its owners as
    its machines see them. A file is written beside itself and renamed into
    place whole, so an export that fails leaves no truncated archive."""
    data = PurePosixPath(layout.volume_data(name))
    if file == "-":
        _interactive(commands.archive_create_argv(data, "-"))
        return
    target = Path(file)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        run.run(commands.archive_create_argv(data, str(partial)))
        with partial.open("rb") as written:
            os.fsync(written.fileno())
        partial.rename(target)
    finally:
        partial.unlink(missing_ok=True)
    files.fsync_dir(target.parent)


def import_archive(
    layout: Layout, state: StateStore, name: str, file: str, created: str
) -> VolumeRecord:
    """Unpack the tar file ("-": stdin) as a volume's data. Only an empty
    volume takes an archive (and is never seeded after): it is unpacked beside
    ``data/`` and renamed into place whole, so a bad or cut archive leaves the
    volume as it was. A volume without a record is made first, as an empty
    declared one would be; the archive's top directory gives ``data/`` its
    owner and mode."""
    found = state.volume(name)
    record = found or create(layout, state, Volume(kind="volume", name=name), created)
    with files.locked(_lock(layout, name)):
        record = state.volume(name) or record
        base = Path(layout.volume_dir(name))
        data = base / "data"
        if any(os.scandir(data)):
            raise PymachineError(
                f"volume {name} holds data; an import never writes over a volume",
                hint=f"import into a new volume, or remove this one first (volume rm {name})",
            )
        staging = base / IMPORTING
        files.remove_tree(staging)
        staging.mkdir(mode=0o755)
        if record.project:  # what is unpacked counts against its size
            quota.assign(staging, record.project)
        try:
            argv = commands.archive_extract_argv(file, PurePosixPath(staging))
            if file == "-":
                _interactive(argv)
            else:
                run.run(argv)
            files.sync_filesystem(staging)
            staging.rename(data)  # over the empty data/ in one step; refused if not empty
            files.fsync_dir(base)
        finally:
            files.remove_tree(staging)
        source = "standard input" if file == "-" else str(Path(file).resolve())
        imported = replace(record, seeded=f"import of {source}")
        state.put_volume(imported)
        return imported


def _interactive(argv: list[str]) -> None:
    """Run a command with pymachine's own standard streams; an error if it fails."""
    code = run.interactive(argv)
    if code != 0:
        raise PymachineError(f"{argv[0]} exited with status {code}", hint="see its message above")
