"""The pure parts of the verbs and of output: CPU % from two samples, df's
totals, which images may go, uptimes, --since windows, and how rows, sizes
and events print."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from pymachined import output
from pymachined.cgroups import Stats
from pymachined.core import wire
from pymachined.errors import PymachineError, UsageError
from pymachined.images import ImageRecord
from pymachined.supervise.base import LogLine
from pymachined.supervise.builtin import _last_line_end, console_output
from pymachined.verbs import disk, inspect, logs, stats


def _stats(cpu_ns: int | None, memory: int | None = 100) -> Stats:
    return Stats(cpu_ns=cpu_ns, memory=memory, memory_limit=None, pids=3, io_bytes=7)


@pytest.mark.parametrize(
    ("before", "after", "elapsed", "percent"),
    [
        (0, 1_000_000_000, 1.0, 100.0),  # one CPU, the whole second
        (0, 1_000_000_000, 2.0, 50.0),
        (5, 3_000_000_005, 1.5, 200.0),  # two CPUs busy
        (10, 10, 2.0, 0.0),
        (0, 123_456_789, 1.0, 12.3),  # to one decimal
        (None, 1_000, 1.0, None),  # no cpuacct in one of the samples
        (1_000, None, 1.0, None),
    ],
)
def test_cpu_percent_from_two_samples(
    before: int | None, after: int | None, elapsed: float, percent: float | None
) -> None:
    assert stats.cpu_percent(before, after, elapsed) == percent


def test_usage_takes_levels_from_the_later_sample_and_traffic_from_the_veth() -> None:
    found = stats.usage("web", _stats(0, 1), _stats(500_000_000, 2), 1.0, (10, 20))
    assert wire.dump(found) == {
        "name": "web",
        "cpu_percent": 50.0,
        "memory": 2,
        "memory_limit": None,
        "pids": 3,
        "net_rx": 10,
        "net_tx": 20,
        "block_io": 7,
        "oom_kills": None,
    }
    alone = stats.usage("web", _stats(0), _stats(0), 1.0, None)
    assert (alone.net_rx, alone.net_tx) == (None, None)


def test_df_totals_split_images_in_use_from_reclaimable() -> None:
    rows = [
        {"type": "image", "size": 1000, "users": 2},
        {"type": "image", "size": 300, "users": 0},
        {"type": "machine", "size": 40, "users": 1},
        {"type": "machine", "size": 2, "users": 1},
    ]
    totals = disk.totals(rows)
    assert (totals.images, totals.shared, totals.own, totals.reclaimable) == (1300, 1000, 42, 300)
    assert disk.totals([]) == disk.Totals(0, 0, 0)


def _image(key: str, name: str, parent: str | None = None) -> ImageRecord:
    return ImageRecord(key, name, parent, "", "", None, Path("/nowhere") / key)


RECORDS = [_image("k1", "base"), _image("k2", "web", "k1"), _image("k3", "other")]


def test_images_resolve_by_name_or_key() -> None:
    assert disk.resolve(RECORDS, ["web", "k1"]) == ["k2", "k1"]
    with pytest.raises(PymachineError, match="no image 'nope'"):
        disk.resolve(RECORDS, ["web", "nope"])


def test_an_image_in_use_or_a_parent_left_behind_is_refused() -> None:
    used = disk.refusal(["k3"], {"k3": ["m1", "m2"]}, RECORDS)
    assert used is not None and used.message == "image k3 is used by m1, m2"
    parent = disk.refusal(["k1"], {}, RECORDS)
    assert parent is not None and "parent of image k2" in parent.message
    assert parent.hint == "remove k2 too"
    # With its child, the parent may go; an unused image alone may go.
    assert disk.refusal(["k1", "k2"], {}, RECORDS) is None
    assert disk.refusal(["k3"], {"k3": []}, RECORDS) is None


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (59, "59s"), (60, "1m"), (3599, "59m"), (3600, "1h"), (86400 * 3 + 5, "3d")],
)
def test_uptime_in_its_largest_whole_unit(seconds: int, text: str) -> None:
    assert inspect.uptime(1000.0, 1000.0 + seconds) == text
    assert inspect.uptime(None, 5.0) is None


def test_first_host_is_a_networks_default_gateway() -> None:
    assert inspect.first_host("10.7.0.0/24") == "10.7.0.1"


NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def test_since_windows() -> None:
    assert logs.parse_since(None, NOW) is None
    assert logs.parse_since("1h30m", NOW) == NOW - timedelta(minutes=90)
    assert logs.parse_since("2026-11-28T10:00:00", NOW) == datetime(2026, 11, 28, 10, tzinfo=UTC)
    assert logs.parse_since("2026-11-28T10:00:00Z", NOW) == datetime(2026, 11, 28, 10, tzinfo=UTC)
    assert logs.parse_since("2026-11-28T12:00:00+02:00", NOW) == datetime(
        2026, 11, 28, 10, tzinfo=UTC
    )
    with pytest.raises(UsageError, match="--since"):
        logs.parse_since("soon", NOW)


def test_console_output_from_the_rotated_part_on_with_tail_and_since(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    assert console_output(log, None, None, follow=False) is None
    (tmp_path / "console.log.1").write_text("2020-01-01T00:00:00Z first\n")
    log.write_text("2026-11-28T11:00:00Z second\nunstamped\n2026-11-28T12:00:00Z last\n")
    found = console_output(log, None, None, follow=False)
    assert found is not None and list(found) == [
        LogLine("2020-01-01T00:00:00Z", "first\n"),
        LogLine("2026-11-28T11:00:00Z", "second\n"),
        LogLine(None, "unstamped\n"),
        LogLine("2026-11-28T12:00:00Z", "last\n"),
    ]
    tail = console_output(log, 2, None, follow=False)
    assert tail is not None and [line.text for line in tail] == ["unstamped\n", "last\n"]
    # An unstamped line has no time to be within the window.
    since = console_output(log, None, NOW.timestamp() - 3600, follow=False)
    assert since is not None and [line.text for line in since] == ["second\n", "last\n"]


def test_a_line_still_being_written_is_shown_once_whole(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_text("2026-11-28T11:00:00Z one\n2026-11-2")  # the stamper mid-write
    tail = console_output(log, 1, None, follow=False)
    assert tail is not None and list(tail) == [LogLine("2026-11-28T11:00:00Z", "one\n")]
    with log.open("a") as more:
        more.write("8T11:00:01Z two\n")
    tail = console_output(log, 1, None, follow=False)
    assert tail is not None and list(tail) == [LogLine("2026-11-28T11:00:01Z", "two\n")]
    # Following starts after the last whole line, so the one being written
    # comes whole, never as its second half.
    assert _last_line_end(log, len(b"2026-11-28T11:00:00Z one\n2026-11-2")) == 25
    assert _last_line_end(log, 10) == 0
    assert _last_line_end(log, log.stat().st_size, window=4) == log.stat().st_size


def test_log_lines_print_with_their_stamp_only_if_asked(
    capsys: pytest.CaptureFixture[str],
) -> None:
    output.log_line(LogLine("2026-11-28T11:00:00Z", "up\n"), timestamps=True)
    output.log_line(LogLine(None, "bare\n"), timestamps=True)
    output.log_line(LogLine("2026-11-28T11:00:00Z", "plain\n"), timestamps=False)
    assert capsys.readouterr().out == "2026-11-28T11:00:00Z up\nbare\nplain\n"


def test_rows_print_as_an_aligned_table(capsys: pytest.CaptureFixture[str]) -> None:
    rows: list[dict[str, Any]] = [
        {"name": "web", "used_by": ["a", "b"], "size": None},
        {"name": "db", "used_by": []},
    ]
    output.rows(rows, ["name", "used_by", "size"], output.Format.TABLE)
    assert capsys.readouterr().out == "NAME  USED_BY  SIZE\nweb   a,b      -\ndb    -        -\n"


def test_sizes_are_humanized_only_for_tables() -> None:
    assert [output.human(n) for n in (0, 1023, 1024, 1536, 5 * 2**30, 3 * 2**40)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "1.5 KiB",
        "5.0 GiB",
        "3072.0 GiB",
    ]
    rows: list[dict[str, Any]] = [{"size": 2048, "other": 1}, {"size": None, "other": 2}]
    assert output.humanized(rows, ["size"], output.Format.TABLE) == [
        {"size": "2.0 KiB", "other": 1},
        {"size": None, "other": 2},
    ]
    assert output.humanized(rows, ["size"], output.Format.JSON) == rows


def test_event_lines() -> None:
    event = {"time": "T", "machine": "web", "event": "die", "exit_code": 3, "restarts": 1}
    assert output.event_line(event) == "T  web  die  exit_code=3 restarts=1"
    assert output.event_line({"time": "T", "machine": "web", "event": "start"}) == "T  web  start"


def test_each_supervisor_names_a_machines_group_and_its_output(tmp_path: Path) -> None:
    from pymachined.core.layout import Layout
    from pymachined.supervise.builtin import BuiltinSupervisor
    from pymachined.supervise.systemd import SystemdSupervisor

    layout = Layout(PurePosixPath(tmp_path))
    supervisor = BuiltinSupervisor(layout)
    assert supervisor.cgroup("web") == layout.cgroup_name("web") == f"pymachine/{layout.scope}-web"
    assert SystemdSupervisor(Layout()).cgroup("web") == "machine.slice/pymachine-web.service"
    assert supervisor.events(None) == []
    assert supervisor.output("web", None, None, follow=False) is None
    log = tmp_path / "var/lib/pymachine/machines/web/console.log"
    log.parent.mkdir(parents=True)
    log.write_text("2026-11-28T11:00:00Z hello\n")
    found = supervisor.output("web", None, None, follow=False)
    assert found is not None and list(found) == [LogLine("2026-11-28T11:00:00Z", "hello\n")]
