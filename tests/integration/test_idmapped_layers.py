"""ID-mapped image layers with real nspawn: a machine with a user namespace
gets a root already owned by its range, with nothing copied up or chowned (a
fresh upper directory holds no data), its image files 0:0 inside and its
uid_map its recorded range; a machine moved to another range, out of its
user namespace and back keeps reading and owning its files; a root nspawn
shifted before ranges were recorded keeps its range and its files."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import pytest

from pymachined import files, rootfs
from pymachined.core import idshift
from pymachined.core.layout import Layout
from pymachined.images import ImageRecord
from tests.waiting import wait_until

if TYPE_CHECKING:
    from tests.integration.conftest import Host

pytestmark = pytest.mark.integration

WRITE = (
    "test -e /srv/mine || { echo mine > /srv/mine; mkdir /srv/u; echo theirs > /srv/u/f; "
    "chown -R 100:102 /srv/u; chmod 4755 /srv/u/f; }; exec sleep infinity"
)

SPECS = """\
name: "@m"
image: debian-bookworm-slim
network: none
stop_timeout: 1s
PRIVATE
command: [sh, -c, "WRITE"]
"""


def declare(host: Host, *, private_users: bool = True) -> None:
    security = "" if private_users else "security: {private_users: false}"
    host.declare(SPECS.replace("PRIVATE", security).replace("WRITE", WRITE))


def machine_dir(host: Host) -> Path:
    return host.root / f"var/lib/pymachine/machines/{host.prefix}m"


def record(host: Host) -> dict[str, object]:
    data: dict[str, object] = json.loads((machine_dir(host) / rootfs.RECORD).read_text())
    return data


def inside(host: Host, *argv: str) -> str:
    return host.pymachine("exec", f"{host.prefix}m", "--", *argv).stdout


def owners(host: Host) -> str:
    """Owners and modes of image files and of the machine's own, seen inside."""
    return inside(
        host, "stat", "-c", "%n %u:%g %a", "/etc/passwd", "/usr/bin/su", "/srv/mine", "/srv/u/f"
    )


def written(host: Host) -> None:
    host.payload("m")

    def done() -> bool:
        return "/srv/u/f" in inside(host, "sh", "-c", "ls /srv/u/f 2>/dev/null || true")

    wait_until(done, "the machine's files", 60)


def test_a_fresh_root_is_owned_by_its_range_with_nothing_copied(host: Host) -> None:
    host.declare(SPECS.replace("PRIVATE", "").replace('[sh, -c, "WRITE"]', "[sleep, infinity]"))
    host.apply()
    host.payload("m")
    base = record(host)["uid_base"]
    assert isinstance(base, int)
    assert base % idshift.RANGE == 0 and idshift.BASE_MIN <= base <= idshift.BASE_MAX
    # Before the payload writes: image files are root's inside, nothing copied up.
    seen = inside(host, "stat", "-c", "%u:%g", "/etc/passwd", "/usr/bin/su", "/")
    assert seen.split() == ["0:0", "0:0", "0:0"]
    assert inside(host, "cat", "/proc/self/uid_map").split() == ["0", str(base), "65536"]
    upper = machine_dir(host) / "upper"
    copied = [
        str(p.relative_to(upper))
        for p in upper.rglob("*")
        if p.is_file() and not p.is_symlink() and p.stat().st_size
    ]
    assert copied == [], copied
    assert rootfs.written(Layout(PurePosixPath(host.root)), f"{host.prefix}m") == 0
    assert upper.stat().st_uid == base
    assert sorted(str(p.relative_to(upper)) for p in upper.rglob("*")) == []
    # What it writes is stored with the range's IDs.
    inside(host, "sh", "-c", WRITE.replace("exec sleep infinity", "true"))
    assert (upper / "srv/mine").stat().st_uid == base
    assert (upper / "srv/u/f").stat().st_uid == base + 100
    assert (upper / "srv/u/f").stat().st_gid == base + 102


def test_a_machine_moved_between_ranges_keeps_its_files(host: Host) -> None:
    declare(host)
    host.apply()
    written(host)
    before = owners(host)
    assert "/srv/u/f 100:102 4755" in before and "/srv/mine 0:0" in before
    name = f"{host.prefix}m"

    # Out of its user namespace: the host's IDs, the same owners.
    declare(host, private_users=False)
    host.apply()
    host.payload("m")
    assert owners(host) == before
    assert (machine_dir(host) / "upper/srv/u/f").stat().st_uid == 100
    assert inside(host, "cat", "/proc/self/uid_map").split() == ["0", "0", "4294967295"]

    # Back in, then moved to another range (as a root brought from another host).
    declare(host)
    host.apply()
    host.payload("m")
    assert owners(host) == before
    old = record(host)["uid_base"]
    assert isinstance(old, int)
    moved = idshift.pick(f"elsewhere {name}", {old})
    data = record(host) | {"uid_base": moved}
    (machine_dir(host) / rootfs.RECORD).write_text(json.dumps(data))
    host.apply()
    host.payload("m")
    assert owners(host) == before
    assert inside(host, "cat", "/proc/self/uid_map").split() == ["0", str(moved), "65536"]
    assert (machine_dir(host) / "upper/srv/u/f").stat().st_uid == moved + 100
    assert inside(host, "cat", "/srv/u/f") == "theirs\n"


def test_a_root_nspawn_shifted_before_ranges_were_recorded_keeps_its_range(
    host: Host,
) -> None:
    """A root made before pymachine chose ranges: no range in its record,
    nspawn's pick shifted it (``PrivateUsersOwnership=chown``, a copy-up of
    every inode). An apply keeps the range nspawn chose and the files."""
    declare(host)
    host.apply()
    written(host)
    before = owners(host)
    name = f"{host.prefix}m"
    host.pymachine("stop", name)
    subprocess.run(["umount", "-R", str(machine_dir(host) / "rootfs")], check=True)
    data = record(host)
    del data["uid_base"]
    (machine_dir(host) / rootfs.RECORD).write_text(json.dumps(data))
    # As pymachine once made it: the layers mounted as they are over an
    # upper directory of the host's IDs, then nspawn's pick and chown.
    base = machine_dir(host)
    upper = base / "upper"
    for path in [upper, *upper.rglob("*")]:
        info = path.lstat()
        uid, gid = info.st_uid % idshift.RANGE, info.st_gid % idshift.RANGE
        os.chown(path, uid, gid, follow_symlinks=False)
        if not path.is_symlink():
            os.chmod(path, stat.S_IMODE(info.st_mode))
    layer = data["layers"]
    assert isinstance(layer, list)
    tree = host.root / f"var/lib/pymachine/images/{layer[0]}/rootfs"
    options = (
        f"lowerdir={tree},upperdir={upper},workdir={base / 'work'},metacopy=on,redirect_dir=on"
    )
    subprocess.run(["mount", "-t", "overlay", "-o", options, "x", str(base / "rootfs")], check=True)
    subprocess.run(
        [
            "systemd-nspawn",
            "--quiet",
            "--register=no",
            "--keep-unit",
            f"--machine={name}",
            f"--directory={machine_dir(host) / 'rootfs'}",
            "--private-users=pick",
            "--private-users-ownership=chown",
            "--private-network",
            "true",
        ],
        check=True,
        timeout=120,
    )
    picked = (machine_dir(host) / "upper").stat().st_uid
    assert picked % idshift.RANGE == 0 and picked != 0
    host.apply()
    host.payload("m")
    assert record(host)["uid_base"] == picked
    assert owners(host) == before


def test_layers_that_cannot_be_mapped_are_shifted_once_with_a_notice(
    host: Host, slim_image: ImageRecord, tmp_path: Path
) -> None:
    """Image layers on ramfs, which has no ID-mapped mounts: the start says
    so once and shifts the root (metacopy copy-ups, no file data), and the
    machine sees what it sees with mapped layers."""
    images = host.root / "var/lib/pymachine/images"
    images.unlink()  # the shared cache, as the fixture links it
    images.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "-o", "mode=0700", "ramfs", str(images)], check=True)
    try:
        source = slim_image.tree.parent
        subprocess.run(["cp", "-a", str(source), str(images / source.name)], check=True)
        host.declare(SPECS.replace("PRIVATE", "").replace('[sh, -c, "WRITE"]', "[sleep, infinity]"))
        done = host.apply()
        assert "cannot be mounted ID-mapped" in done.stderr, done.stderr
        host.payload("m")
        seen = inside(host, "stat", "-c", "%u:%g", "/etc/passwd", "/usr/bin/su", "/")
        assert seen.split() == ["0:0", "0:0", "0:0"]
        base = record(host)["uid_base"]
        assert inside(host, "cat", "/proc/self/uid_map").split() == ["0", str(base), "65536"]
        upper = machine_dir(host) / "upper"
        assert (upper / "etc/passwd").stat().st_uid == base  # copied up, shifted
        assert rootfs.written(Layout(PurePosixPath(host.root)), f"{host.prefix}m") == 0
        # A second start walks nothing: the root's top says it is shifted.
        host.pymachine("restart", f"{host.prefix}m")
        host.payload("m")
        assert inside(host, "stat", "-c", "%u:%g", "/usr/bin/su").split() == ["0:0"]
        host.pymachine("destroy", "--yes", f"{host.prefix}m")
    finally:
        subprocess.run(["umount", "--lazy", str(images)], check=False)


@pytest.mark.timeout(120)
def test_user_namespaces_made_by_many_threads_at_once_never_hang(tmp_path: Path) -> None:
    """An apply mounts roots in parallel: each ID-mapped mount forks a child
    for its user namespace, and a child forked by one thread holds copies of
    another's pipes. None may wait for an end of file that never comes."""
    if os.geteuid() != 0:
        pytest.skip("needs root: a user namespace's map of another range")

    def probe(_: int) -> str | None:
        return files.idmap_problem(tmp_path)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(probe, range(400)))
    assert answers == [None] * 400


# Makes user namespaces without end, from 4 threads, until it is killed.
_FORKER = """
import concurrent.futures, os, sys
from pymachined import files
libc = files._libc()
def forever(_):
    while True:
        os.close(files._userns(libc, files._PROBE_BASE))
pool = concurrent.futures.ThreadPoolExecutor(4)
for index in range(4):
    pool.submit(forever, index)
print("forking", flush=True)
pool.shutdown()
"""


@pytest.mark.timeout(300)
def test_a_process_killed_while_making_user_namespaces_leaves_no_child(tmp_path: Path) -> None:
    """kill -9 of an apply while one of its threads is between the fork of a
    user namespace's child and the byte that lets the child go: the child
    ends too. Left waiting, it would hold the apply's output open, and
    whoever reads it (a test, a unit's journal) would never see its end."""
    if os.geteuid() != 0:
        pytest.skip("needs root: a user namespace's map of another range")
    marker = f"# {tmp_path}"  # in each child's command line too: they are forks
    for _ in range(12):
        forker = subprocess.Popen(
            [sys.executable, "-c", _FORKER + marker],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert forker.stdout is not None
            assert forker.stdout.readline() == b"forking\n"
            time.sleep(random.uniform(0.01, 0.1))
            forker.kill()
            # The end of its output comes once no child of it holds the pipes.
            forker.communicate(timeout=10)
        finally:
            left = [
                pid
                for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
                if _cmdline_has(pid, marker)
            ]
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            forker.kill()
            forker.wait()
        assert left == [], f"children left waiting after a kill -9: {left}"


def _cmdline_has(pid: int, text: str) -> bool:
    try:
        return text.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def test_many_machines_mounted_at_once_all_start(host: Host) -> None:
    """The executor mounts roots in parallel threads: each forks for its user
    namespace while others mount, and the staging mounts of its layers go
    however many descriptors of them other threads' children hold."""
    names = [f"p{index}" for index in range(16)]
    host.declare(
        "---\n".join(
            f'name: "@{name}"\nimage: debian-bookworm-slim\nnetwork: none\nstop_timeout: 1s\n'
            # Ends at once on SIGTERM: the teardown stops 16 machines.
            "command: [sh, -c, \"trap 'exit 0' TERM; while :; do sleep 1 & wait; done\"]\n"
            for name in names
        )
    )
    host.apply()
    for name in names:
        host.payload(name)
    assert not list(host.root.glob("var/lib/pymachine/machines/*/lower"))
