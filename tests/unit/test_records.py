"""Records and event lines that cannot be read: each is its own problem,
reported with where it is, never an internal error."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

import pytest

from pymachined import events
from pymachined.core.layout import Layout
from pymachined.core.records import MachineRecord, NetworkRecord, VolumeRecord
from pymachined.core.spec import Network, Volume
from pymachined.errors import StateError
from pymachined.state import StateStore


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (b'{"time": "2026-12-01T10:00:00+00:00", "machine": "a", "event": "\xff"}', "UTF-8"),
        (b"not json", "not valid JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"machine": "a", "event": "start"}', "no valid time"),
        (b'{"time": "yesterday", "machine": "a", "event": "start"}', "no valid time"),
        (b'{"time": 5, "machine": "a", "event": "start"}', "no valid time"),
        (b'{"time": "2026-12-01T10:00:00", "event": "start"}', "no machine or event"),
    ],
)
def test_bad_event_lines_are_skipped_with_a_reason(line: bytes, why: str) -> None:
    event, problem = events.parse_event(line)
    assert event is None
    assert problem is not None and why in problem


def test_events_read_past_bad_lines(tmp_path: Path) -> None:
    layout = Layout(PurePosixPath(tmp_path))
    path = Path(layout.state_dir) / "events.jsonl"
    path.parent.mkdir(parents=True)
    path.write_bytes(
        b'{"time": "2026-12-01T10:00:00", "machine": "a", "event": "start"}\n'
        b"\xff\xfe\n"
        b'{"machine": "a", "event": "die"}\n'
        b'{"time": "2026-12-01T11:00:00+00:00", "machine": "a", "event": "stop"}\n'
    )
    skipped: list[str] = []
    since = datetime(2026, 12, 1, 9, tzinfo=UTC)
    found = list(events.read(layout, since, skipped))
    assert [e["event"] for e in found] == ["start", "stop"]
    assert found[0]["time"] == "2026-12-01T10:00:00.000+00:00"  # a naive time is UTC
    assert skipped == [f"{path}:2: not valid UTF-8; skipped", f"{path}:3: no valid time; skipped"]


def test_one_unreadable_record_is_set_apart(tmp_path: Path) -> None:
    layout = Layout(PurePosixPath(tmp_path))
    store = StateStore(layout)
    store.put(MachineRecord(name="good", config_hash="h", layers=("k",)))
    for name, content in (
        ("utf", b'{"version": 1, "\xff": 1}'),
        (
            "list",
            b'{"version": 1, '
            b'"owner": "pymachine", "name": "list", "config_hash": "h", '
            b'"layers": [], "files": [1]}',
        ),
    ):
        store.path(name).parent.mkdir(parents=True)
        store.path(name).write_bytes(content)
    records, bad = store.scan()
    assert list(records) == ["good"]
    assert sorted(bad) == ["list", "utf"]
    assert f"state record {store.path('utf')} is not valid UTF-8 (at byte 16)" in str(bad["utf"])
    assert "is broken: files: Input should be a valid dictionary" in str(bad["list"])
    assert list(store.all()) == ["good"]
    with pytest.raises(StateError, match="not valid UTF-8"):
        store.get("utf")


def test_unreadable_network_and_volume_records_are_set_apart(tmp_path: Path) -> None:
    layout = Layout(PurePosixPath(tmp_path))
    store = StateStore(layout)
    net = Network.model_validate({"kind": "network", "name": "lan", "subnet": "10.9.0.0/24"})
    store.put_network(NetworkRecord("lan", "pmbr-lan", "h", net))
    store.network_path("bad").write_text('{"version": 1, "owner": "pymachine", "name": 5}')
    store.put_volume(VolumeRecord("data", Volume(kind="volume", name="data")))
    store.volume_path("old").parent.mkdir(parents=True)
    store.volume_path("old").write_text('{"version": 0, "owner": "pymachine"}')
    (Path(layout.volumes_dir) / "empty").mkdir()  # a directory without a record: no volume
    networks, bad_networks = store.scan_networks()
    assert list(networks) == ["lan"] and list(bad_networks) == ["bad"]
    assert "is broken" in str(bad_networks["bad"])
    volumes, bad_volumes = store.scan_volumes()
    assert volumes == {"data": VolumeRecord("data", Volume(kind="volume", name="data"))}
    assert list(bad_volumes) == ["old"]
    assert "has version 0; this pymachine reads version 1" in str(bad_volumes["old"])
    assert "pymachine never removes a volume it cannot read" in str(bad_volumes["old"].hint)


def test_events_from_many_threads_rotate_once_and_stay_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    monkeypatch.setattr(events, "MAX_BYTES", 4000)
    layout = Layout(PurePosixPath(tmp_path))

    def write(thread: int) -> None:
        for index in range(20):
            events.record(layout, f"m{thread}", "start", index=index)

    threads = [threading.Thread(target=write, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    path = Path(layout.state_dir) / "events.jsonl"
    rotated = path.with_name("events.jsonl.1")
    assert rotated.exists()  # 160 lines of about 100 bytes passed 4000 bytes
    skipped: list[str] = []
    found = list(events.read(layout, None, skipped))
    assert skipped == []
    assert path.stat().st_size <= 4000 + 8 * 200  # each writer at most one line past the check
    assert found[-1]["event"] == "start"
