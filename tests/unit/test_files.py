"""Writes into a machine's root, on a directory standing in for one: only
regular files pymachine made itself are written, and nothing planted there is
opened, followed or waited on. FIFOs and symlinks need no root to plant."""

from __future__ import annotations

import errno
import os
import signal
import stat
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest

from pymachined import files
from pymachined.errors import PymachineError


@pytest.fixture(autouse=True)
def no_hang() -> Iterator[None]:
    """A FIFO opened for writing blocks for ever: fail the test instead."""

    def hung(signum: int, frame: FrameType | None) -> None:
        raise AssertionError("blocked on something planted in the root")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "root/etc").mkdir(parents=True)
    return tmp_path / "root"


@pytest.fixture
def host_file(tmp_path: Path) -> Iterator[Path]:
    target = tmp_path / "host-file"
    target.write_text("host\n")
    yield target
    assert target.read_text() == "host\n"


@pytest.mark.parametrize("plant", ["fifo", "symlink", "stale", "dangling"])
def test_a_planted_temporary_name_is_replaced_never_opened(
    root: Path, host_file: Path, plant: str
) -> None:
    temp = root / "etc/.motd.pymachine-tmp"
    if plant == "fifo":
        os.mkfifo(temp)
    elif plant == "symlink":
        temp.symlink_to(host_file)
    elif plant == "dangling":
        temp.symlink_to(host_file.parent / "nothing")
    else:
        temp.write_text("left by a killed apply\n")
    files.write_in_root(root, "/etc/motd", "hello\n", 0o640, machine="m")
    motd = root / "etc/motd"
    assert stat.S_ISREG(motd.lstat().st_mode)
    assert motd.read_text() == "hello\n"
    assert stat.S_IMODE(motd.stat().st_mode) == 0o640
    assert not os.path.lexists(temp)
    assert not (host_file.parent / "nothing").exists()


def test_a_symlink_at_the_path_is_replaced_not_followed(root: Path, host_file: Path) -> None:
    (root / "etc/motd").symlink_to(host_file)
    files.write_in_root(root, "/etc/motd", "hello\n", 0o644, machine="m")
    assert not (root / "etc/motd").is_symlink()
    assert (root / "etc/motd").read_text() == "hello\n"


@pytest.mark.parametrize(
    ("plant", "words"), [("fifo", "a FIFO"), ("dir", "a directory"), ("socket", "a socket")]
)
def test_a_path_that_is_not_a_regular_file_is_refused_by_name(
    root: Path, tmp_path: Path, plant: str, words: str
) -> None:
    path = root / "etc/motd"
    if plant == "fifo":
        os.mkfifo(path)
    elif plant == "dir":
        path.mkdir()
    else:
        import socket

        # A socket's path is short: bind from inside the directory.
        cwd = Path.cwd()
        os.chdir(path.parent)
        try:
            socket.socket(socket.AF_UNIX).bind("motd")
        finally:
            os.chdir(cwd)
    with pytest.raises(PymachineError) as caught:
        files.write_in_root(root, "/etc/motd", "hello\n", 0o644, machine="web")
    assert caught.value.message == (
        f"machine web: /etc/motd in its root is {words}, not a regular file"
    )
    assert not os.path.lexists(root / "etc/.motd.pymachine-tmp")


def test_a_parent_that_is_a_fifo_or_symlink_is_refused(root: Path, host_file: Path) -> None:
    os.mkfifo(root / "srv")
    (root / "opt").symlink_to(host_file.parent)
    with pytest.raises(PymachineError, match=r"machine m: cannot make /srv/x .*/srv is a FIFO"):
        files.write_in_root(root, "/srv/x", "x", 0o644, machine="m")
    with pytest.raises(PymachineError, match="/opt is a symlink, not a directory"):
        files.write_in_root(root, "/opt/host-file", "x", 0o644, machine="m")


@pytest.mark.parametrize(
    ("plant", "directory", "words"),
    [
        ("fifo", False, "a FIFO"),
        ("symlink", False, "a symlink"),
        ("dir", False, "a directory"),
        ("symlink", True, "a symlink"),
        ("file", True, "a regular file"),
    ],
)
def test_a_mount_point_of_the_wrong_kind_is_refused_unopened(
    root: Path, host_file: Path, plant: str, directory: bool, words: str
) -> None:
    point = root / "etc/point"
    if plant == "fifo":
        os.mkfifo(point)
    elif plant == "symlink":
        point.symlink_to(host_file if not directory else host_file.parent)
    elif plant == "dir":
        point.mkdir()
    else:
        point.write_text("x")
    with pytest.raises(PymachineError, match=f"machine m: .*/etc/point.* is {words}"):
        files.make_mount_point(root, "/etc/point", directory, machine="m")


def test_mount_points_are_made_where_missing_and_kept_where_right(root: Path) -> None:
    files.make_mount_point(root, "/mnt/a/dir", directory=True, machine="m")
    files.make_mount_point(root, "/mnt/file", directory=False, machine="m")
    assert (root / "mnt/a/dir").is_dir()
    assert stat.S_ISREG((root / "mnt/file").lstat().st_mode)
    files.make_mount_point(root, "/mnt/a/dir", directory=True, machine="m")
    files.make_mount_point(root, "/mnt/file", directory=False, machine="m")


def test_open_no_symlinks_refuses_a_symlink_in_any_component(tmp_path: Path) -> None:
    (tmp_path / "real/sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "real/last").symlink_to(tmp_path / "real/sub")
    fd = files.open_no_symlinks(str(tmp_path / "real/sub"))
    try:
        assert os.path.samestat(os.fstat(fd), (tmp_path / "real/sub").stat())
    finally:
        os.close(fd)
    for path in (tmp_path / "link/sub", tmp_path / "real/last"):
        with pytest.raises(OSError) as caught:
            files.open_no_symlinks(str(path))
        assert caught.value.errno == errno.ELOOP


def test_tree_usage_never_follows_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "tree/dir").mkdir(parents=True)
    (tmp_path / "tree/dir/file").write_bytes(b"x" * 8192)
    (tmp_path / "big").mkdir()
    (tmp_path / "big/file").write_bytes(b"y" * (1 << 20))
    (tmp_path / "tree/link").symlink_to(tmp_path / "big")
    assert 8192 <= files.tree_usage(tmp_path / "tree") < (1 << 20)
    assert files.tree_usage(tmp_path / "missing") == 0
