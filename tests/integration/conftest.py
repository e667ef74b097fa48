"""Integration fixtures: real images built by pymachine itself, cached across runs.

The image cache lives under a test root ($PYMACHINE_TEST_CACHE, default
/var/tmp/pymachine-test-cache), so a second run reuses the first run's build;
on a fresh machine (as in CI) the first test that needs an image builds it
for real. Tests treat shared image trees as read-only.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path, PurePosixPath

import pytest

from pymachined.images import ImageRecord, ImageStore, Progress
from pymachined.layout import Layout
from pymachined.recipes import layers
from pymachined.validate import SpecSet, load_set

REPO = Path(__file__).resolve().parents[2]
CACHE_ENV = "PYMACHINE_TEST_CACHE"
DEFAULT_CACHE = Path("/var/tmp/pymachine-test-cache")


def cache_dir() -> Path:
    """Where the integration tests keep their image cache."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured) if configured else DEFAULT_CACHE


def require_root_tools(*tools: str) -> None:
    """Skip unless running as root with the given commands installed."""
    if os.geteuid() != 0:
        pytest.skip("needs root: debootstrap, mount and systemd-nspawn only work as root")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (scripts/setup installs them)")


@pytest.fixture(scope="session")
def catalog() -> SpecSet:
    """The shipped image catalog as a spec set."""
    return load_set([], REPO / "machines")


@pytest.fixture(scope="session")
def cache_layout() -> Layout:
    """The layout of the shared test cache."""
    return Layout(PurePosixPath(cache_dir() / "root"))


@pytest.fixture(scope="session")
def cache_store(cache_layout: Layout) -> ImageStore:
    """The image store of the shared test cache."""
    require_root_tools("debootstrap", "systemd-nspawn", "unshare", "setpriv")
    return ImageStore(cache_layout, REPO / "templates", Progress())


@pytest.fixture(scope="session")
def slim_image(cache_store: ImageStore, catalog: SpecSet) -> ImageRecord:
    """debian-bookworm-slim, built by pymachine (or reused from an earlier run)."""
    return cache_store.ensure(layers(catalog, "debian-bookworm-slim", cache_store.salts()))[0]


@pytest.fixture(scope="session")
def slim_root(slim_image: ImageRecord) -> Path:
    """The tree of debian-bookworm-slim: a complete minbase root, read-only for tests."""
    return slim_image.tree
