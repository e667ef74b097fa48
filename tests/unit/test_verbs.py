"""Which machines need another, as stop and destroy ask before they act."""

from __future__ import annotations

from pymachined.core.records import MachineRecord
from pymachined.core.spec import Machine
from pymachined.verbs import needed_by


def _record(name: str, *needs: str) -> MachineRecord:
    spec = Machine.model_validate({"name": name, "command": ["true"], "depends_on": list(needs)})
    return MachineRecord(name=name, config_hash="", layers=(), created="", spec=spec)


def test_needed_by_follows_dependencies_through_others() -> None:
    records = {
        r.name: r
        for r in (
            _record("db"),
            _record("app", "db"),
            _record("web", "app"),
            _record("cron", "db", "web"),
            _record("other"),
        )
    }
    assert needed_by(records, "db") == ["app", "cron", "web"]
    assert needed_by(records, "web") == ["cron"]
    assert needed_by(records, "other") == []


def test_needed_by_stops_on_a_cycle_and_knows_records_without_a_spec() -> None:
    records = {
        "a": _record("a", "b"),
        "b": _record("b", "a"),
        "c": MachineRecord(name="c", config_hash="", layers=(), created=""),
    }
    assert needed_by(records, "a") == ["b"]
