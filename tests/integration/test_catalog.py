"""The shipped catalog: debian-bookworm boots with systemd as init."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from pymachined import rootfs
from pymachined.core.layout import Layout
from pymachined.core.recipes import layers
from pymachined.core.spec import RootfsMode
from pymachined.core.validate import SpecSet
from pymachined.images import ImageRecord, ImageStore

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bookworm(cache_store: ImageStore, catalog: SpecSet) -> ImageRecord:
    """debian-bookworm (minbase plus systemd), built by pymachine or cached."""
    return cache_store.ensure(layers(catalog, "debian-bookworm", cache_store.salts()))[0]


@pytest.fixture
def machine(cache_layout: Layout) -> Iterator[str]:
    name = f"pmt-boot-{uuid.uuid4().hex[:8]}"
    yield name
    rootfs.remove(cache_layout, name)


def run_on_a_terminal(argv: list[str], timeout: float) -> tuple[int, str]:
    """argv with a pseudo-terminal as its console (systemd in a container prints
    its boot status only to a terminal); its exit code and output."""
    leader, follower = os.openpty()
    try:
        proc = subprocess.Popen(argv, stdin=follower, stdout=follower, stderr=follower)
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's last writer is gone
                break
            if not chunk:
                break
            chunks.append(chunk)
        code = proc.wait(timeout=timeout)
    finally:
        os.close(leader)
    return code, b"".join(chunks).decode(errors="replace")


def test_debian_bookworm_boots_and_powers_off(
    bookworm: ImageRecord, cache_store: ImageStore, cache_layout: Layout, machine: str
) -> None:
    assert (bookworm.tree / "lib/systemd/systemd").is_file()
    root = rootfs.create(cache_layout, machine, RootfsMode.OVERLAY, cache_store.chain(bookworm.key))
    merged = rootfs.mount(cache_layout, cache_store, root)
    code, output = run_on_a_terminal(
        [
            "timeout",
            "120",
            "systemd-nspawn",
            "--register=no",
            "--keep-unit",
            f"--directory={merged}",
            f"--machine={machine}",
            "--boot",
            "--",
            "systemd.unit=poweroff.target",
        ],
        timeout=150,
    )
    assert code == 0, output
    assert "running in system mode" in output
    assert "Detected virtualization systemd-nspawn" in output
    assert "Powering off." in output
