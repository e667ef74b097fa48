"""Integration fixtures: real images built by pymachine itself, cached across runs.

The image cache lives under a test root ($PYMACHINE_TEST_CACHE, default
/var/tmp/pymachine-test-cache), so a second run reuses the first run's build;
on a fresh machine (as in CI) the first test that needs an image builds it
for real. Tests treat shared image trees as read-only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from pymachined.core.layout import Layout
from pymachined.core.recipes import layers
from pymachined.core.validate import SpecSet, load_set
from pymachined.images import ImageRecord, ImageStore, Progress
from pymachined.procs import leader_pid, payload_running
from tests.waiting import wait_until

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


@dataclass
class Host:
    """A host root for one test, and the CLI pointed at it."""

    root: Path
    specs: Path
    prefix: str

    def argv(self, *args: str) -> list[str]:
        """The command line of pymachine on this host with args."""
        return [sys.executable, "-m", "pymachined", "--root", str(self.root), *args]

    def pymachine(
        self, *args: str, env: dict[str, str] | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self.argv(*args),
            capture_output=True,
            text=True,
            env={**os.environ, **(env or {})},
            check=False,
            timeout=600,
        )
        if check and result.returncode != 0:
            pytest.fail(f"pymachine {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
        return result

    def declare(self, text: str) -> None:
        """Replace the specs with text (machine names get the test's prefix)."""
        for old in self.specs.glob("*.yaml"):
            old.unlink()
        (self.specs / "machines.yaml").write_text(text.replace("@", self.prefix))

    def apply(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return self.pymachine("apply", str(self.specs), "--yes", *args, **kwargs)

    def machines(self) -> dict[str, dict[str, Any]]:
        rows = json.loads(self.pymachine("ls", "-o", "json").stdout)
        return {row["name"].removeprefix(self.prefix): row for row in rows}

    def wait_for(self, check: Callable[[dict[str, dict[str, Any]]], bool], what: str) -> None:
        """Wait (60 s at most) until check holds of the machines' rows."""
        wait_until(lambda: check(self.machines()), what, 60, detail=self.machines)

    def payload(self, name: str) -> int:
        """The host PID of a machine's payload, once its nspawn has made the
        machine's PID 1 and exec'd the command in it (a first start shifts the
        root to the machine's user namespace before that)."""

        def running() -> int | None:
            nspawn = self.machines()[name]["pid"]
            leader = leader_pid(nspawn) if nspawn else None
            if leader is not None and payload_running(nspawn, leader):
                return leader
            return None

        return wait_until(running, f"the payload of {name}", 60, interval=0.1, detail=self.machines)

    def wait_for_output(self, name: str, text: str) -> str:
        """A machine's console log, once it holds text (a first start shifts the
        root to the machine's user namespace before the command runs)."""
        log = self.root / f"var/lib/pymachine/machines/{self.prefix}{name}/console.log"

        def output() -> str:
            return log.read_text() if log.exists() else ""

        def holding() -> str | None:
            read = output()
            return read if text in read else None

        return wait_until(
            holding,
            f"{text!r} from {name}",
            60,
            interval=0.1,
            detail=output,
        )

    def mounts(self) -> list[str]:
        text = Path("/proc/self/mountinfo").read_text()
        points = [line.split()[4] for line in text.splitlines()]
        return [p for p in points if p.startswith(f"{self.root}/")]

    def daemon_pid(self) -> int:
        return int((self.root / "run/pymachine/pymachined.lock").read_text().split()[1])


@contextlib.contextmanager
def made_host(base: Path, cache_layout: Layout, prefix: str) -> Iterator[Host]:
    """A host root under base sharing the image cache; its machines destroyed
    and its pymachined stopped afterwards."""
    root = base / "host"
    state = root / "var/lib/pymachine"
    state.mkdir(parents=True)
    (state / "images").symlink_to(Path(cache_layout.images_dir))
    specs = base / "specs"
    specs.mkdir()
    test_host = Host(root, specs, prefix)
    yield test_host
    for name in test_host.machines():
        test_host.pymachine("destroy", "--yes", test_host.prefix + name, check=False)
    lock = root / "run/pymachine/pymachined.lock"
    if lock.exists() and lock.read_text().strip():
        daemon = test_host.daemon_pid()
        with contextlib.suppress(ProcessLookupError):
            os.kill(daemon, signal.SIGTERM)
        wait_until(
            lambda: not Path(f"/proc/{daemon}").exists(),
            "pymachined to end on SIGTERM",
            10,
            interval=0.05,
        )
    assert test_host.mounts() == []


@pytest.fixture
def host(tmp_path: Path, cache_layout: Layout, slim_image: ImageRecord) -> Iterator[Host]:
    with made_host(tmp_path, cache_layout, f"t{uuid.uuid4().hex[:6]}-") as test_host:
        yield test_host


@pytest.fixture
def other_host(
    host: Host, tmp_path: Path, cache_layout: Layout, slim_image: ImageRecord
) -> Iterator[Host]:
    """A second host root whose machines have the same names as host's."""
    with made_host(tmp_path / "other", cache_layout, host.prefix) as test_host:
        yield test_host
