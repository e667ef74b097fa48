"""Fixtures of the end-to-end tests: a booted systemd host with pymachine
installed from this checkout and the images of given specs in its cache.

``booted_host`` (module scope) is the host for specs/; ``make_host`` builds
another one for other spec directories. Both power the host off and remove
it afterwards. See tests/e2e/README.md.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Generator, Iterator
from pathlib import Path, PurePosixPath

import pytest

from pymachined.core.recipes import machine_layers
from pymachined.core.validate import load_set
from pymachined.images import ImageStore, Progress
from tests.e2e.harness import (
    PREFIX,
    REPO,
    BootedHost,
    _run,
    cache_dir,
    dependency_wheels,
    host_root,
)

pytestmark = pytest.mark.e2e

E2E_TIMEOUT = 1800  # seconds: a first run builds the host root (mmdebstrap) in its first test


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The e2e tests boot hosts: give each a longer timeout than the default."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.timeout(E2E_TIMEOUT))


# How each e2e test of this run ended, by (module, test name): "passed",
# "failed" or "skipped". A stage marked needs_stages(...) skips unless the
# stages it names passed, so one failure does not fail every stage after it
# for the same reason.
_outcomes: dict[tuple[Path, str], str] = {}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Record each test's outcome (a failed setup, call or teardown is a failure)."""
    report = yield
    key = (Path(item.path), item.name)
    if report.failed:
        _outcomes[key] = "failed"
    elif report.skipped:
        _outcomes.setdefault(key, "skipped")
    elif report.when == "call":
        _outcomes.setdefault(key, "passed")
    return report


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip a stage whose needed earlier stages (needs_stages marker) did not pass."""
    for marker in item.iter_markers("needs_stages"):
        for name in marker.args:
            outcome = _outcomes.get((Path(item.path), name), "did not run")
            if outcome != "passed":
                pytest.skip(f"needs stage {name}, which {outcome}")


MakeHost = Callable[[Path], BootedHost]


def _require() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: the e2e host is booted with systemd-nspawn")
    missing = [t for t in ("systemd-nspawn", "mmdebstrap", "nsenter") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (scripts/setup installs them)")


def image_cache_dir() -> Path:
    """The integration tests' shared image cache (the same variable and default)."""
    return Path(os.environ.get("PYMACHINE_TEST_CACHE", "/var/tmp/pymachine-test-cache"))


def images_for(spec_dir: Path) -> tuple[ImageStore, list[Path]]:
    """The image layers the machines of spec_dir need, built (or reused) in the
    integration tests' shared cache on the outer host, where there is network."""
    from pymachined.core.layout import Layout
    from pymachined.resources import data_dir

    store = ImageStore(
        Layout(PurePosixPath(image_cache_dir() / "root")), data_dir("templates"), Progress()
    )
    spec_set = load_set([spec_dir], data_dir("machines"))
    salts = store.salts()
    trees: dict[str, Path] = {}
    for machine in spec_set.machines.values():
        layers = machine_layers(spec_set, machine, salts)
        store.ensure(layers)
        for layer in layers:
            trees[layer.key] = store.path(layer.key)
    return store, list(trees.values())


@pytest.fixture(scope="module")
def make_host() -> Iterator[MakeHost]:
    """A factory of booted hosts: make_host(spec_dir) builds (or reuses) the
    host root, copies spec_dir to /root/specs and its images into the inner
    cache, installs pymachine, boots, and returns the host."""
    _require()
    made: list[BootedHost] = []

    def make(spec_dir: Path) -> BootedHost:
        store, trees = images_for(spec_dir)
        root = host_root(store.mirror())
        run_dir = cache_dir() / "runs" / f"{PREFIX}-{os.getpid()}-{len(made)}"
        if run_dir.exists():
            shutil.rmtree(run_dir)
        wheel_dir = run_dir / "wheel"
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "-q",
                "--no-deps",
                "-w",
                str(wheel_dir),
                str(REPO),
            ]
        )
        host = BootedHost(
            root=root,
            run_dir=run_dir,
            name=f"{PREFIX}-{os.getpid()}-host{len(made)}",  # apart from other runs' hosts
            wheels=(dependency_wheels(), wheel_dir),
        )
        made.append(host)
        host.assemble()
        host.add_images(trees)
        shutil.copytree(spec_dir, host.merged / "root" / "specs")
        host.boot()
        return host

    yield make
    errors = []
    for host in made:
        try:
            host.close()
        except Exception as exc:  # every host is closed even if one fails
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture(scope="module")
def booted_host(make_host: MakeHost) -> BootedHost:
    """A booted systemd host with the example specs at /root/specs."""
    return make_host(REPO / "specs")
