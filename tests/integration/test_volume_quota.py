"""Volume sizes with real nspawn and the default user namespace, on a
loop-mounted ext4 made with ``-O quota,project`` and mounted ``prjquota``
that holds the whole state root: a machine writes under its volume's size and
is stopped past it (EDQUOT); a size grows, shrinks below what the volume
holds, and is added to a volume that has data; the machine cannot take its
files out of the project (``chattr -p``/``-P``, which are FS_IOC_FSSETXATTR,
fail inside its user namespace) nor link files in from outside. Where the
volumes' filesystem enforces no project quotas, a size is refused at plan
time, naming the spec's line, and nothing is made.

The enforcing tests skip on a kernel that cannot mount ext4 with the quota
feature read-write (one built without CONFIG_QFMT_V2), saying so.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from pymachined import quota
from pymachined.core.layout import Layout
from pymachined.images import ImageRecord
from tests.integration.conftest import made_host, require_root_tools

if TYPE_CHECKING:
    from tests.integration.conftest import Host

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
FS_SIZE = 768 * MIB  # sparse: room for a machine's shifted root and the volumes


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False)


@contextlib.contextmanager
def loop_ext4(base: Path, features: list[str], options: list[str]) -> Iterator[Path]:
    """An ext4 in a sparse file under base, on a loop device, mounted at
    base/qt-fs with options; unmounted and detached afterwards, whatever
    happened. Skips if the kernel cannot mount it."""
    require_root_tools("mkfs.ext4", "losetup")
    image = base / "qt-fs.img"
    with image.open("wb") as sparse:
        sparse.truncate(FS_SIZE)
    made = _run("mkfs.ext4", "-q", "-F", *features, str(image))
    assert made.returncode == 0, made.stderr
    attached = _run("losetup", "--find", "--show", "--", str(image))
    assert attached.returncode == 0, attached.stderr
    loop = attached.stdout.strip()
    point = base / "qt-fs"
    point.mkdir()
    try:
        mounted = _run("mount", "-t", "ext4", *options, "--", loop, str(point))
        if mounted.returncode != 0:
            pytest.skip(
                f"this kernel cannot mount ext4 {' '.join(features + options)} "
                f"({mounted.stderr.strip()}); a kernel built without CONFIG_QFMT_V2 "
                "mounts ext4 with the quota feature read-only only"
            )
        try:
            yield point
        finally:
            if _run("umount", "--recursive", str(point)).returncode != 0:
                _run("umount", "--recursive", "--lazy", str(point))
    finally:
        _run("losetup", "--detach", loop)
        image.unlink()


@pytest.fixture
def quota_host(tmp_path: Path, cache_layout: Layout, slim_image: ImageRecord) -> Iterator[Host]:
    """A host whose state root is on an ext4 that enforces project quotas."""
    features = ["-O", "quota,project"]
    with (
        loop_ext4(tmp_path, features, ["-o", "prjquota"]) as point,
        made_host(point, cache_layout, f"qt{uuid.uuid4().hex[:6]}-") as test_host,
    ):
        yield test_host


@pytest.fixture
def plain_host(tmp_path: Path, cache_layout: Layout, slim_image: ImageRecord) -> Iterator[Host]:
    """A host whose state root is on a filesystem without project quotas (the
    test's own directory: ext4 without the quota feature here)."""
    with made_host(tmp_path, cache_layout, f"qt{uuid.uuid4().hex[:6]}-") as test_host:
        yield test_host


SPECS = """\
kind: volume
name: "@data"
size: SIZE
---
name: "@vm"
image: debian-bookworm-slim
network: none
volumes: ["@data:/v"]
command: [sleep, infinity]
"""


def specs(size: str | None) -> str:
    if size is None:
        return SPECS.replace("size: SIZE\n", "")
    return SPECS.replace("SIZE", size)


def in_machine(host: Host, script: str) -> subprocess.CompletedProcess[str]:
    """A shell script run in the machine (pymachine exec: its user namespace,
    cgroup and confinement), not checked."""
    return host.pymachine("exec", f"{host.prefix}vm", "--", "sh", "-c", script, check=False)


def data_dir(host: Host) -> Path:
    return host.root / f"var/lib/pymachine/volumes/{host.prefix}data/data"


def recorded_project(host: Host) -> int:
    """The project id the volume's record holds."""
    path = host.root / f"var/lib/pymachine/volumes/{host.prefix}data/volume.json"
    project = json.loads(path.read_text())["project"]
    assert isinstance(project, int)
    return project


def plan_text(host: Host) -> str:
    """What plan prints (it exits 2 when there is something to do)."""
    shown = host.pymachine("plan", str(host.specs), check=False)
    assert shown.returncode in (0, 2), shown.stderr
    return shown.stdout


def project_of(path: Path) -> int:
    """The project id of a file or directory, never through a symlink."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        return quota.attributes(fd).projid
    finally:
        os.close(fd)


def write(host: Host, name: str, mib: int) -> subprocess.CompletedProcess[str]:
    return in_machine(host, f"dd if=/dev/zero of=/v/{name} bs=1M count={mib} conv=fsync")


def test_a_size_is_refused_where_the_filesystem_enforces_no_project_quotas(
    plain_host: Host,
) -> None:
    host, p = plain_host, plain_host.prefix
    problem = quota.problem(host.root / "var/lib/pymachine/volumes")
    if problem is None:
        pytest.skip(f"{host.root} is on a filesystem that enforces project quotas")
    host.declare(specs("8M"))
    spec = host.specs / "machines.yaml"
    for verb in ("plan", "apply"):
        argv = (verb, str(host.specs)) + (("--yes",) if verb == "apply" else ())
        refused = host.pymachine(*argv, check=False)
        assert refused.returncode == 1, refused
        assert f"error: {spec}:3:1: size: volume {p}data cannot be limited: " in refused.stderr
        assert problem in refused.stderr, refused.stderr
        assert "(hint: keep the volumes on ext4 made with -O quota,project and mounted with " in (
            refused.stderr
        )
    # Nothing was made: no volume, no machine, no record.
    state = host.root / "var/lib/pymachine"
    assert sorted(p.name for p in state.iterdir()) == ["images"]
    assert json.loads(host.pymachine("volume", "ls", "-o", "json").stdout) == []
    assert host.machines() == {}
    # Without the size the same specs plan as usual.
    host.declare(specs(None))
    planned = plan_text(host)
    assert f"create volume {p}data: new volume" in planned, planned


def test_counted_but_not_enforced_project_quotas_are_refused(
    tmp_path: Path, cache_layout: Layout, slim_image: ImageRecord
) -> None:
    # ext4 with the quota feature counts project blocks, but enforces limits
    # only when mounted with prjquota.
    with (
        loop_ext4(tmp_path, ["-O", "quota,project"], []) as point,
        made_host(point, cache_layout, f"qt{uuid.uuid4().hex[:6]}-") as host,
    ):
        host.declare(specs("8M"))
        refused = host.pymachine("plan", str(host.specs), check=False)
        assert refused.returncode == 1, refused
        assert "counts project quotas but does not enforce them" in refused.stderr, refused.stderr


def test_a_machine_writes_under_its_volumes_size_and_is_stopped_past_it(quota_host: Host) -> None:
    host, p = quota_host, quota_host.prefix
    host.declare(specs("8M"))
    planned = plan_text(host)
    assert f"create volume {p}data: new volume" in planned, planned
    host.apply()
    host.payload("vm")
    project = recorded_project(host)
    assert project >= 1 << 20
    assert project_of(data_dir(host)) == project
    assert quota.usage(data_dir(host), project).limit == 8 * MIB

    under = write(host, "under", 4)
    assert under.returncode == 0, under.stderr
    over = write(host, "over", 16)
    assert over.returncode != 0, over
    assert "Disk quota exceeded" in over.stderr, over.stderr
    used = quota.usage(data_dir(host), project)
    assert 4 * MIB <= used.used <= 8 * MIB, used
    assert (data_dir(host) / "under").stat().st_size == 4 * MIB
    # Reading what it holds still works, and so does writing once room is made.
    in_machine(host, "rm /v/over")
    assert in_machine(host, "cmp -n 4194304 /v/under /dev/zero").returncode == 0
    assert write(host, "again", 2).returncode == 0
    assert "nothing to do" in plan_text(host)

    # A bigger size: in place, the same project, the machine not restarted.
    pid = host.payload("vm")
    host.declare(specs("32M"))
    planned = plan_text(host)
    assert f"resize volume {p}data: size: 8M -> 32M" in planned, planned
    assert "restart" not in planned, planned
    host.apply()
    assert host.payload("vm") == pid
    assert recorded_project(host) == project
    assert quota.usage(data_dir(host), project).limit == 32 * MIB
    assert write(host, "big", 16).returncode == 0
    docs = json.loads(host.pymachine("volume", "inspect", f"{p}data").stdout)
    assert docs["limit"] == 32 * MIB, docs

    # Smaller than what it holds (22M): set all the same; writes fail until it
    # holds less, reads go on.
    host.declare(specs("4M"))
    host.apply()
    assert quota.usage(data_dir(host), project).limit == 4 * MIB
    stopped = write(host, "more", 1)
    assert stopped.returncode != 0 and "Disk quota exceeded" in stopped.stderr, stopped
    assert in_machine(host, "cat /v/big > /dev/null").returncode == 0
    in_machine(host, "rm /v/big /v/under /v/again /v/more")
    assert write(host, "small", 1).returncode == 0

    # A limit changed behind pymachine's back is set again by the next apply.
    quota.set_limit(data_dir(host), project, 64 * MIB)
    planned = plan_text(host)
    assert f"resize volume {p}data: its quota's limit on disk is 64M, not 4M" in planned, planned
    host.apply()
    assert quota.usage(data_dir(host), project).limit == 4 * MIB
    assert "nothing to do" in plan_text(host)

    # Without a size: no limit, the project kept (it still counts).
    host.declare(specs(None))
    host.apply()
    assert quota.usage(data_dir(host), project).limit == 0
    assert write(host, "free", 16).returncode == 0
    assert recorded_project(host) == project


def test_a_size_added_to_a_volume_with_data_counts_what_it_holds(quota_host: Host) -> None:
    host, p = quota_host, quota_host.prefix
    host.declare(specs(None))
    host.apply()
    host.payload("vm")
    made = "mkdir -p /v/d/e && dd if=/dev/zero of=/v/d/e/old bs=1M count=3 && mkfifo /v/fifo"
    assert in_machine(host, made + " && ln -s /etc /v/link").returncode == 0
    assert recorded_project(host) == 0
    host.declare(specs("8M"))
    planned = plan_text(host)
    assert f"resize volume {p}data: size: none -> 8M" in planned, planned
    host.apply()
    project = recorded_project(host)
    assert project
    for inside in ("d", "d/e", "d/e/old"):
        assert project_of(data_dir(host) / inside) == project, inside
    # The FIFO and the symlink are never opened: they stay out, an inode each.
    assert os.path.islink(data_dir(host) / "link")
    assert quota.usage(data_dir(host), project).used >= 3 * MIB
    # 3M held: 5M more is refused, 2M is not.
    assert write(host, "over", 6).returncode != 0
    in_machine(host, "rm -f /v/over")
    assert write(host, "fits", 2).returncode == 0


def test_a_machine_cannot_take_its_files_out_of_its_volumes_project(quota_host: Host) -> None:
    host, p = quota_host, quota_host.prefix
    host.declare(specs("8M"))
    host.apply()
    host.payload("vm")
    project = recorded_project(host)
    assert in_machine(host, "mkdir /v/mine && echo x > /v/mine/f").returncode == 0

    # Its root owns these files, but FS_IOC_FSSETXATTR may not change a
    # project id or the inherit flag from inside a user namespace: the kernel
    # says EINVAL (fileattr_set_prepare).
    for attempt in ("chattr -p 0 /v/mine/f", "chattr -p 0 /v/mine", "chattr -P /v/mine"):
        tried = in_machine(host, attempt)
        assert tried.returncode != 0, (attempt, tried)
        assert "Invalid argument" in tried.stderr, (attempt, tried.stderr)
    for inside in ("mine", "mine/f"):
        assert project_of(data_dir(host) / inside) == project, inside
    shown = in_machine(host, "lsattr -p -d /v/mine; lsattr -p /v/mine/f").stdout
    assert shown.count(str(project)) == 2, shown

    # A hard link from its root into the volume crosses a mount: EXDEV, as it
    # would be for another project's file on the same mount.
    linked = in_machine(host, "ln /etc/passwd /v/passwd")
    assert linked.returncode != 0 and "Invalid cross-device link" in linked.stderr, linked
    # A move from its root is a copy, and counts.
    moved = in_machine(host, "dd if=/dev/zero of=/root/big bs=1M count=16 && mv /root/big /v/")
    assert moved.returncode != 0 and "Disk quota exceeded" in moved.stderr, moved

    # From the host's side: a file of the same filesystem outside the project
    # cannot be linked or renamed into it (ext4 refuses with EXDEV).
    outside = host.root / "qt-outside"
    outside.write_bytes(b"x" * 65536)
    for move in (os.link, os.rename):
        with pytest.raises(OSError) as refused:
            move(outside, data_dir(host) / "from-outside")
        assert refused.value.errno == errno.EXDEV, move
    outside.unlink()
    host.pymachine("destroy", "--yes", f"{p}vm")
    host.pymachine("volume", "rm", "--yes", f"{p}data")
    assert quota.usage(host.root, project).limit == 0  # the id is free again
