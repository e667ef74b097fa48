"""What a step that throws a machine's root away says it discards, and how
much a root holds of the machine's own writes (real directories under a
temporary root; no subprocess)."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

import pytest

from pymachined import rootfs
from pymachined.core.actions import (
    RemoveMachine,
    ReplaceRoot,
    StartMachine,
    discarded,
    discards_data,
)
from pymachined.core.layout import Layout
from pymachined.core.spec import RootfsMode


@pytest.mark.parametrize(
    ("discards", "said"),
    [
        (0, "replace the root of pg: its image changed"),
        (
            412 * 1024 * 1024,
            "replace the root of pg: its image changed (discards 412 MiB written in its root)",
        ),
        (
            None,
            "replace the root of pg: its image changed "
            "(discards its copied root and everything written in it)",
        ),
    ],
)
def test_a_replaced_root_says_what_it_discards(discards: int | None, said: str) -> None:
    step = ReplaceRoot("pg", "its image changed", discards=discards)
    assert step.describe() == said
    assert discards_data(step) is (discards != 0)
    assert step.as_json()["discards"] == discards


def test_a_removal_says_it_too_and_other_steps_discard_nothing() -> None:
    step = RemoveMachine("old", "no spec declares it", discards=3 * 1024)
    assert (
        step.describe() == "remove old: no spec declares it (discards 3.0 KiB written in its root)"
    )
    assert discards_data(step)
    assert not discards_data(RemoveMachine("old", "no spec declares it"))
    assert not discards_data(StartMachine("web", "not running"))
    assert discarded(0) is None


def made(layout: Layout, name: str) -> None:
    Path(layout.machine_dir(name)).mkdir(parents=True)


def test_written_is_the_data_in_an_overlay_upper_directory(tmp_path: Path) -> None:
    layout = Layout(PurePosixPath(tmp_path))
    made(layout, "pg")
    rootfs.adopt(layout, "pg", RootfsMode.OVERLAY, ("k1",))
    upper = Path(layout.machine_dir("pg")) / "upper"
    assert rootfs.written(layout, "pg") == 0  # no upper directory yet
    (upper / "var/lib/db").mkdir(parents=True)
    assert rootfs.written(layout, "pg") == 0  # directories alone hold no data
    (upper / "var/lib/db/table").write_bytes(os.urandom(64 * 1024))
    with (upper / "var/lib/db/sparse").open("wb") as sparse:
        sparse.truncate(1 << 20)  # a size, no data blocks
    os.symlink("/etc/shadow", upper / "var/lib/db/link")  # never followed
    os.mkfifo(upper / "var/lib/db/fifo")  # never opened
    assert 64 * 1024 <= rootfs.written(layout, "pg") <= 80 * 1024  # type: ignore[operator]
    # (A metacopy copy-up, which counts nothing, needs overlayfs: test_apply.)


def test_written_for_other_roots(tmp_path: Path) -> None:
    layout = Layout(PurePosixPath(tmp_path))
    for name in ("tmp", "copy", "bad"):
        made(layout, name)
    rootfs.adopt(layout, "tmp", RootfsMode.EPHEMERAL, ("k1",))
    rootfs.adopt(layout, "copy", RootfsMode.COPY, ("k1",))
    assert rootfs.written(layout, "tmp") == 0
    assert rootfs.written(layout, "copy") is None  # all of it is the machine's
    assert rootfs.written(layout, "none") == 0
    bad = Path(layout.machine_dir("bad"))
    (bad / rootfs.RECORD).write_text("{not json")
    assert rootfs.written(layout, "bad") is None
