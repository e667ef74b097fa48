"""Integration fixtures: a minbase Debian root, built once and cached across sessions.

The root is built with debootstrap into a temporary directory beside the cache and
renamed into place only once debootstrap succeeded, so an interrupted or failed
build is never mistaken for a finished one. Tests must treat the root as read-only
(start machines with ``--read-only``): every session and test shares it.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

CACHE_ENV = "PYMACHINE_TEST_CACHE"
"""Directory for roots the integration tests build; ``slim-root`` lives in it."""

DEFAULT_CACHE = Path("/var/tmp/pymachine-test-cache")
SLIM_ROOT = "slim-root"
SUITE = "bookworm"
BUILD_TIMEOUT = 1800.0
PARTIAL_PREFIX = f".{SLIM_ROOT}.partial-"


def cache_dir() -> Path:
    """Where built roots are kept: $PYMACHINE_TEST_CACHE or /var/tmp/pymachine-test-cache."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured) if configured else DEFAULT_CACHE


def _is_complete(root: Path) -> bool:
    # Only a finished build is ever renamed to this name; os-release guards against
    # something else having been put there by hand.
    return (root / "etc" / "os-release").is_file() and (root / "usr" / "bin" / "env").is_file()


def _mount_points() -> list[Path]:
    """Every mount point of this mount namespace (mountinfo's octal escapes undone)."""
    points = []
    for line in Path("/proc/self/mountinfo").read_bytes().splitlines():
        field = line.split(b" ")[4]
        raw = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)
        points.append(Path(os.fsdecode(raw)))
    return points


def _remove_partial(path: Path) -> None:
    """Remove an unfinished build, unless something is still mounted inside it
    (debootstrap mounts /proc, /sys and sometimes binds /dev into its target:
    deleting through such a mount would delete host files)."""
    if not path.exists():
        return
    if any(point == path or path in point.parents for point in _mount_points()):
        return
    shutil.rmtree(path, ignore_errors=True)


@contextmanager
def _locked(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive lock, so parallel sessions do not build the root twice."""
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def slim_root() -> Path:
    """A Debian bookworm minbase root (debootstrap --variant=minbase), built on first
    use into the cache and reused afterwards. Skips unless run as root, and, when
    the root is not cached yet, unless debootstrap is installed."""
    if os.geteuid() != 0:
        pytest.skip("needs root: debootstrap and systemd-nspawn only work as root")
    cache = cache_dir()
    root = cache / SLIM_ROOT
    if _is_complete(root):
        return root
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None:
        pytest.skip(
            f"debootstrap is not installed and no root is cached at {root} "
            "(install it with: apt-get install debootstrap)"
        )
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / f".{SLIM_ROOT}.lock"):
        if _is_complete(root):  # another session built it while we waited
            return root
        if os.path.lexists(root):
            pytest.fail(f"{root} exists but is not a finished root: remove it and run again")
        for stale in cache.glob(f"{PARTIAL_PREFIX}*"):
            _remove_partial(stale)
        partial = Path(tempfile.mkdtemp(prefix=PARTIAL_PREFIX, dir=cache))
        # Build one level down: mkdtemp's directory is mode 0700, a root's / is 0755.
        target = partial / SLIM_ROOT
        try:
            result = subprocess.run(
                [debootstrap, "--variant=minbase", SUITE, str(target)],
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT,
                check=False,
            )
            if result.returncode != 0 or not _is_complete(target):
                pytest.fail(
                    f"debootstrap --variant=minbase {SUITE} failed "
                    f"(exit {result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
                )
            target.rename(root)
        finally:
            _remove_partial(partial)
    return root
