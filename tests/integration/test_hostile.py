"""A hostile image and a hostile host path against pymachine running as root.

The image plants block and character devices, FIFOs and symlinks (to a host
file) at every name pymachine writes or mounts on inside a root: the
temporary names of ``files:``, the files themselves, bind and tmpfs targets.
``apply`` must not hang on them, follow them or write into them: it makes
fresh regular files of its own, or refuses with an error naming the machine
and the path. A bind source swapped for a symlink after apply is never
followed at the next start, by hand or by restart policy.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from tests.waiting import wait_until

if TYPE_CHECKING:
    from tests.integration.conftest import Host

pytestmark = pytest.mark.integration

APPLY_TIMEOUT = 120  # a FIFO opened for writing would block apply for ever

# What the image plants, at each name (inside the root) pymachine uses. The
# symlinks point at HOST_TARGET, a host path each test makes and checks.
HOST_TARGET = "/tmp/pymachine-hostile-target"
PLANTED = {
    "/etc/.motd.pymachine-tmp": "b",
    "/etc/.chr-file.pymachine-tmp": "c",
    "/etc/.fifo-file.pymachine-tmp": "p",
    "/etc/.link-file.pymachine-tmp": "l",
    "/srv/.nested.pymachine-tmp": "p",
    # At the paths themselves.
    "/etc/dest-fifo": "p",
    "/etc/dest-block": "b",
    "/etc/dest-dir": "d",
    "/mnt/file-target-link": "l",
    "/mnt/file-target-fifo": "p",
    "/mnt/file-target-chr": "c",
    "/mnt/dir-target-link": "l",
    "/mnt/tmpfs-target-link": "l",
    "/mnt/dir-target-file": "f",
}
PLANT_COMMANDS = {
    "b": "mknod {path} b 7 0",
    "c": "mknod {path} c 1 3",
    "p": "mkfifo {path}",
    "l": f"ln -s {HOST_TARGET} {{path}}",
    "d": "mkdir {path}",
    "f": "echo planted > {path}",
}
SCRIPT = "set -e\nmkdir -p /srv /mnt\n" + "".join(
    PLANT_COMMANDS[kind].format(path=path) + "\n" for path, kind in PLANTED.items()
)
IMAGE = {"kind": "image", "name": "@hostile", "from": "debian-bookworm-slim", "script": SCRIPT}
# Written over planted temporary names: each one must succeed.
FILES = [
    {"path": "/etc/motd", "content": "motd from the spec\n"},
    {"path": "/etc/chr-file", "content": "chr from the spec\n"},
    {"path": "/etc/fifo-file", "content": "fifo from the spec\n"},
    {"path": "/etc/link-file", "content": "link from the spec\n"},
    {"path": "/srv/nested", "content": "nested from the spec\n"},
]


def apply(host: Host) -> subprocess.CompletedProcess[str]:
    """apply, killed if it hangs (the test then fails)."""
    argv = [sys.executable, "-m", "pymachined", "--root", str(host.root)]
    try:
        return subprocess.run(
            [*argv, "apply", str(host.specs), "--yes"],
            capture_output=True,
            text=True,
            timeout=APPLY_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"apply hung for {APPLY_TIMEOUT} s on what the image planted")


def declare(host: Host, *machines: dict[str, Any]) -> None:
    host.declare(yaml.safe_dump_all([IMAGE, *machines], sort_keys=False))


def machine(name: str, **fields: Any) -> dict[str, Any]:
    return {
        "name": f"@{name}",
        "image": "@hostile",
        "network": "none",
        "restart": "no",
        "command": ["sleep", "infinity"],
        **fields,
    }


def root_of(host: Host, name: str) -> Path:
    return host.root / f"var/lib/pymachine/machines/{host.prefix}{name}/rootfs"


@pytest.fixture
def host_target() -> Any:
    """The host file the planted symlinks point at, checked untouched after."""
    target = Path(HOST_TARGET)
    target.unlink(missing_ok=True)
    target.write_text("host file\n")
    target.chmod(0o600)
    before = target.stat()
    yield target
    after = target.lstat()
    assert stat.S_ISREG(after.st_mode)
    assert target.read_text() == "host file\n"
    assert (after.st_ino, after.st_mtime_ns, stat.S_IMODE(after.st_mode)) == (
        before.st_ino,
        before.st_mtime_ns,
        0o600,
    )
    target.unlink()


def kind_at(root: Path, path: str) -> str:
    mode = os.lstat(root / path.lstrip("/")).st_mode
    for test, kind in (
        (stat.S_ISBLK, "b"),
        (stat.S_ISCHR, "c"),
        (stat.S_ISFIFO, "p"),
        (stat.S_ISLNK, "l"),
        (stat.S_ISDIR, "d"),
        (stat.S_ISREG, "f"),
    ):
        if test(mode):
            return kind
    return "?"


@pytest.mark.parametrize("private_users", [True, False], ids=["userns", "no-userns"])
def test_planted_temporary_names_are_replaced_never_opened(
    host: Host, host_target: Path, tmp_path: Path, private_users: bool
) -> None:
    source = tmp_path / "data"
    source.mkdir()
    (source / "seen").write_text("bound\n")
    declare(
        host,
        machine(
            "h",
            files=FILES,
            binds=[f"{source}:/data:ro"],
            tmpfs=["/scratch"],
            security={"private_users": private_users},
        ),
    )
    result = apply(host)
    assert result.returncode == 0, result.stderr
    root = root_of(host, "h")
    # The image really planted them (the test would prove nothing otherwise).
    image_root = next(Path(host.root, "var/lib/pymachine/images").glob("*/rootfs/etc/dest-fifo"))
    assert stat.S_ISFIFO(image_root.lstat().st_mode)
    assert stat.S_ISBLK(os.lstat(image_root.parent / ".motd.pymachine-tmp").st_mode)
    for file in FILES:
        written = root / file["path"].lstrip("/")
        assert stat.S_ISREG(written.lstat().st_mode), file["path"]
        assert written.read_text() == file["content"]
        name = Path(file["path"])
        assert not os.path.lexists(
            root / f"{name.parent.relative_to('/')}/.{name.name}.pymachine-tmp"
        )
    host.wait_for(lambda m: m["h"]["state"] == "running", "h running")
    assert host.machines()["h"]["state"] == "running"
    assert "nothing to do" in host.pymachine("plan", str(host.specs)).stdout


def test_a_device_planted_in_a_root_is_never_written(
    host: Host, host_target: Path, tmp_path: Path
) -> None:
    """A loop device of the test's own, planted at a temporary name while the
    machine is stopped: the next start writes the file, and the device's
    backing file keeps its zeros."""
    backing = tmp_path / "disk.img"
    backing.write_bytes(bytes(1 << 20))
    loop = subprocess.run(
        ["losetup", "--find", "--show", "--", str(backing)],
        capture_output=True,
        text=True,
        check=False,
    )
    if loop.returncode != 0:
        pytest.skip(f"no loop device: {loop.stderr.strip()}")
    device = loop.stdout.strip()
    try:
        rdev = os.stat(device).st_rdev
        declare(host, machine("d", files=FILES[:1], state="stopped"))
        assert apply(host).returncode == 0
        host.pymachine("mount-root", host.prefix + "d")
        temp = root_of(host, "d") / "etc/.motd.pymachine-tmp"
        temp.unlink(missing_ok=True)
        os.mknod(temp, 0o666 | stat.S_IFBLK, rdev)
        changed = [{"path": "/etc/motd", "content": "changed\n"}]
        declare(host, machine("d", files=changed))
        result = apply(host)
        assert result.returncode == 0, result.stderr
        assert (root_of(host, "d") / "etc/motd").read_text() == "changed\n"
        assert stat.S_ISREG((root_of(host, "d") / "etc/motd").lstat().st_mode)
        with Path(device).open("rb") as handle:
            assert handle.read(1 << 20) == bytes(1 << 20)
        assert backing.read_bytes() == bytes(1 << 20)
    finally:
        subprocess.run(["losetup", "--detach", device], check=False)


REFUSED = [
    (
        "dest-fifo",
        {"files": [{"path": "/etc/dest-fifo", "content": "x"}]},
        "/etc/dest-fifo",
        "a FIFO",
    ),
    (
        "dest-block",
        {"files": [{"path": "/etc/dest-block", "content": "x"}]},
        "/etc/dest-block",
        "a block device",
    ),
    (
        "dest-dir",
        {"files": [{"path": "/etc/dest-dir", "content": "x"}]},
        "/etc/dest-dir",
        "a directory",
    ),
    (
        "file-link",
        {"binds": ["{file}:/mnt/file-target-link"]},
        "/mnt/file-target-link",
        "a symlink",
    ),
    ("file-fifo", {"binds": ["{file}:/mnt/file-target-fifo"]}, "/mnt/file-target-fifo", "a FIFO"),
    (
        "file-chr",
        {"binds": ["{file}:/mnt/file-target-chr"]},
        "/mnt/file-target-chr",
        "a character device",
    ),
    ("dir-link", {"binds": ["{dir}:/mnt/dir-target-link"]}, "/mnt/dir-target-link", "a symlink"),
    (
        "dir-file",
        {"binds": ["{dir}:/mnt/dir-target-file"]},
        "/mnt/dir-target-file",
        "a regular file",
    ),
    ("tmpfs-link", {"tmpfs": ["/mnt/tmpfs-target-link"]}, "/mnt/tmpfs-target-link", "a symlink"),
    (
        "under-fifo",
        {"files": [{"path": "/etc/dest-fifo/x", "content": "x"}]},
        "/etc/dest-fifo",
        "a FIFO",
    ),
]


def test_planted_paths_and_mount_points_are_refused_by_name(
    host: Host, host_target: Path, tmp_path: Path
) -> None:
    bind_file = tmp_path / "bound-file"
    bind_file.write_text("bound\n")
    bind_dir = tmp_path / "bound-dir"
    bind_dir.mkdir()
    for case, fields, path, kind in REFUSED:
        fields = yaml.safe_load(
            yaml.safe_dump(fields).replace("{file}", str(bind_file)).replace("{dir}", str(bind_dir))
        )
        declare(host, machine(case, **fields))
        result = apply(host)
        said = result.stdout + result.stderr
        assert result.returncode == 1, (case, said)
        line = next(x for x in said.splitlines() if f"failed: {host.prefix}{case}: " in x)
        assert f"machine {host.prefix}{case}: " in line and path in line and kind in line, line
        assert "Traceback" not in said and "internal error" not in said
        # Nothing was made of what was planted: it is as the image left it.
        planted = PLANTED[path]
        assert kind_at(root_of(host, case), path) == planted, case
        assert host.machines()[case]["state"] != "running"
    assert bind_file.read_text() == "bound\n"


def test_a_bind_source_swapped_for_a_symlink_is_never_followed(host: Host, tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    (source / "real").write_text("real\n")
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "secret").write_text("secret\n")
    declare(
        host,
        {
            "name": "@s",
            "image": "debian-bookworm-slim",
            "network": "none",
            "restart": "always",
            "command": ["sh", "-c", "echo LISTING $(ls /data); sleep 4; exit 3"],
            "binds": [f"{source}:/data:ro"],
        },
    )
    result = apply(host)
    assert result.returncode == 0, result.stderr
    host.wait_for_output("s", "LISTING real")
    assert "nothing to do" in host.pymachine("plan", str(host.specs)).stdout
    staging = host.root / f"var/lib/pymachine/machines/{host.prefix}s/binds/0"
    options = [
        line.split()[5]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split()[4] == str(staging)
    ]
    assert len(options) == 1 and {"ro", "nosuid", "nodev"} <= set(options[0].split(","))
    # The swap: the directory moves away and a symlink to another takes its name.
    source.rename(tmp_path / "moved")
    source.symlink_to(secret)
    # Under pymachined, its restart policy starts it again on its own: never
    # with the symlink's target bound.
    daemon_log = host.root / "run/pymachine/pymachined.log"
    refused = f"{host.prefix}s: cannot restart: machine {host.prefix}s: bind source {source} is a"
    wait_until(lambda: refused in daemon_log.read_text(), "the refused restart in the log", 60)
    assert host.machines()["s"]["state"] == "dead"
    log = host.root / f"var/lib/pymachine/machines/{host.prefix}s/console.log"
    assert "secret" not in log.read_text()
    # Nor by hand.
    started = host.pymachine("start", host.prefix + "s", check=False)
    assert started.returncode == 1
    assert f"bind source {source} is a symlink" in started.stderr
    assert "Traceback" not in started.stderr
    # What the first start staged is taken away with the refused restage.
    mounted = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    assert str(staging) not in mounted and not staging.exists()
    planned = host.pymachine("plan", str(host.specs), check=False)
    assert planned.returncode == 1
    assert f"bind source {source} is a symlink" in planned.stderr
