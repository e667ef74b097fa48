"""The one serialiser: records and messages to JSON and back, typed on the way in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pymachined.core import wire
from pymachined.core.limits import Limits
from pymachined.core.records import MachineRecord, parse_record, stored
from pymachined.core.spec import Machine
from pymachined.errors import StateError
from pymachined.supervise import messages
from pymachined.supervise.base import BindSource, RunSpec, RunState, Status

SPEC = Machine.model_validate(
    {"name": "web", "command": ["sleep", "1"], "network": "backend", "ports": ["8080:80"]}
)
RUN = RunSpec(
    "web",
    ("systemd-nspawn", "--", "sleep", "1"),
    "on-failure",
    "/var/log/web",
    5.0,
    Limits(memory=1 << 20, cpus=0.5),
    (BindSource("/srv/data", read_only=True),),
)

# A record exactly as the pymachine before this serialiser wrote it: every
# record on a host must still read.
EARLIER = {
    "version": 1,
    "owner": "pymachine",
    "name": "web",
    "config_hash": "abc",
    "layers": ["k1", "k2"],
    "files": {"/etc/x": "h"},
    "address": "10.70.0.2",
    "network": "backend",
    "run": {
        "name": "web",
        "argv": ["systemd-nspawn", "--", "sleep", "1"],
        "restart": "on-failure",
        "log": "/var/log/web",
        "stop_timeout": 5,
        "limits": {
            "memory": 1048576,
            "memory_soft": None,
            "cpus": 0.5,
            "pids": None,
            "cpu_weight": None,
            "io_weight": None,
        },
        "binds": [{"source": "/srv/data", "read_only": True}],
        "log_max": 10485760,
    },
    "spec": SPEC.model_dump(mode="json", by_alias=True),
    "created": "2026-11-01T00:00:00+00:00",
    "history": ["created"],
}


def test_a_record_round_trips_with_its_spec_and_run_spec_typed() -> None:
    record = MachineRecord(
        "web", "abc", ("k1", "k2"), {"/etc/x": "h"}, "10.70.0.2", "backend", RUN, SPEC
    )
    text = json.dumps(stored(record))
    again = parse_record(text, Path("state.json"))
    assert again == record
    assert again.spec is not None and again.spec.ports[0].host == 8080
    assert again.run is not None and again.run.binds[0].read_only is True


def test_a_record_the_earlier_pymachine_wrote_still_reads() -> None:
    record = parse_record(json.dumps(EARLIER), Path("state.json"))
    assert record.run == RUN
    assert record.spec == SPEC
    assert record.layers == ("k1", "k2") and record.history == ("created",)
    # And is written back in the same shape.
    assert stored(record) == EARLIER


def test_a_field_of_the_wrong_type_is_named_by_its_path() -> None:
    broken = {**EARLIER, "run": {**EARLIER["run"], "limits": {"memory": "lots"}}}  # type: ignore[dict-item]
    with pytest.raises(StateError) as caught:
        parse_record(json.dumps(broken), Path("/state/web.json"))
    assert caught.value.message == (
        "state record /state/web.json is broken: run.limits.memory: "
        "Input should be a valid integer, unable to parse string as an integer"
    )
    assert caught.value.hint and "remove the file" in caught.value.hint
    spec = {**EARLIER, "spec": {**EARLIER["spec"], "ports": ["no"]}}  # type: ignore[dict-item]
    with pytest.raises(StateError, match=r"is broken: spec\.ports\.0"):
        parse_record(json.dumps(spec), Path("web.json"))


@pytest.mark.parametrize(
    "request_",
    [
        messages.Ping(),
        messages.ListStatus(),
        messages.ListStatus(names=("web",)),
        messages.Start(RUN),
        messages.Stop("web"),
        messages.Stop("web", "forget"),
        messages.Pause("web"),
        messages.Pause("web", "unpause"),
        messages.SetLimits("web", Limits(pids=9)),
    ],
)
def test_every_request_round_trips(request_: messages.Request) -> None:
    line = messages.encode(request_)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert messages.decode_request(line) == request_


def test_replies_decode_as_the_type_asked_for_or_as_a_refusal() -> None:
    status = Status("web", RunState.RUNNING, pid=7, started=1.5, restarts=2)
    line = messages.encode(messages.Changed(status, stop_timeout=5.0))
    assert messages.decode_reply(line, messages.Changed) == messages.Changed(status, 5.0)
    refusal = messages.encode(messages.Failed("web is running", "stop it first"))
    assert messages.decode_reply(refusal, messages.Changed) == messages.Failed(
        "web is running", "stop it first"
    )
    with pytest.raises(ValueError, match=r"^machines: Field required"):
        messages.decode_reply(line, messages.Statuses)


def test_dump_gives_plain_json_data() -> None:
    data = wire.dump(Status("web", RunState.PAUSED))
    assert data["state"] == "paused" and json.loads(json.dumps(data)) == data
    assert wire.dump(RUN)["argv"] == list(RUN.argv)
