"""Choosing machines' user-namespace ranges: a recorded range is kept, a new
one never collides with another machine's, and the choice is stable."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from pymachined import rootfs
from pymachined.core import idshift
from pymachined.core.layout import Layout


def _layout(tmp_path: Path) -> Layout:
    return Layout(PurePosixPath(tmp_path))


def _record(layout: Layout, name: str, **fields: object) -> None:
    base = Path(layout.machine_dir(name))
    (base / "upper").mkdir(parents=True)
    data = {"mode": "overlay", "layers": ["k"], **fields}
    (base / rootfs.RECORD).write_text(json.dumps(data))


def test_a_recorded_range_is_kept_and_a_new_one_avoids_it(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    fresh = rootfs.ranges(layout, ["a", "b"])
    assert fresh == rootfs.ranges(layout, ["a", "b"])  # the same plan, the same ranges
    _record(layout, "a", uid_base=fresh["b"])  # a holds what b would have picked
    again = rootfs.ranges(layout, ["a", "b", "c"])
    assert again["a"] == fresh["b"]
    assert len(set(again.values())) == 3
    assert all(idshift.BASE_MIN <= b <= idshift.BASE_MAX for b in again.values())


def test_a_root_without_a_recorded_range_and_none_on_disk_gets_a_new_one(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    _record(layout, "old")  # a record from before ranges; its upper is the host's
    found = rootfs.ranges(layout, ["old"])["old"]
    assert found % idshift.RANGE == 0 and found >= idshift.BASE_MIN


def test_an_unreadable_root_record_holds_no_range(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    _record(layout, "bad")
    (Path(layout.machine_dir("bad")) / rootfs.RECORD).write_text("{")
    assert set(rootfs.ranges(layout, ["x"])) == {"x"}
