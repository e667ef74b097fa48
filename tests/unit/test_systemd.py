"""The systemd supervisor's pure parts: systemctl command lines, the parser of
``systemctl show`` and the mapping of unit states to machine states (tables of
recorded output)."""

from __future__ import annotations

import socket
from pathlib import Path, PurePosixPath

import pytest

from pymachined.core import commands
from pymachined.core.layout import Layout
from pymachined.core.limits import Limits, unit_properties
from pymachined.core.parsers import parse_systemctl_show, parse_unix_timestamp
from pymachined.core.render import APPLY_UNIT, apply_unit_files
from pymachined.core.units import parse_unit, split_words
from pymachined.supervise.base import RunState, Status
from pymachined.supervise.systemd import PROPERTIES, journal_event, machine_of, unit_status

# Recorded from systemd 252 (systemctl show --timestamp=unix -p ... A B C).
RECORDED = """\
Id=pymachine-hello.service
LoadState=loaded
ActiveState=active
SubState=running
Result=success
MainPID=93
ExecMainStartTimestamp=@1795919690
ExecMainCode=0
ExecMainStatus=0
NRestarts=1

Id=pymachine-base.service
LoadState=loaded
ActiveState=activating
SubState=auto-restart
Result=signal
MainPID=0
ExecMainStartTimestamp=@1795919600
ExecMainCode=2
ExecMainStatus=9
NRestarts=0

Id=pymachine-gone.service
LoadState=not-found
ActiveState=inactive
SubState=dead
Result=success
MainPID=0
ExecMainStartTimestamp=
ExecMainCode=0
ExecMainStatus=0
NRestarts=0
"""


def test_show_output_splits_into_one_block_per_unit() -> None:
    blocks = parse_systemctl_show(RECORDED)
    assert [b["Id"] for b in blocks] == [
        "pymachine-hello.service",
        "pymachine-base.service",
        "pymachine-gone.service",
    ]
    assert blocks[0]["ExecMainStartTimestamp"] == "@1795919690"
    assert blocks[2]["ExecMainStartTimestamp"] == ""
    assert parse_systemctl_show("") == []
    assert parse_systemctl_show("A=b=c\n\n\n") == [{"A": "b=c"}]
    with pytest.raises(ValueError, match="not a systemctl show line"):
        parse_systemctl_show("garbage")


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("@1795919690", 1795919690.0), ("", None), ("n/a", None), ("@0", None), ("@x", None)],
)
def test_unix_timestamps(value: str, seconds: float | None) -> None:
    assert parse_unix_timestamp(value) == seconds


def _unit(**properties: str) -> dict[str, str]:
    base = {
        "Id": "pymachine-web.service",
        "LoadState": "loaded",
        "ActiveState": "inactive",
        "SubState": "dead",
        "Result": "success",
        "MainPID": "0",
        "ExecMainStartTimestamp": "",
        "ExecMainCode": "0",
        "ExecMainStatus": "0",
        "NRestarts": "0",
    }
    return {**base, **properties}


STARTED = {"ExecMainStartTimestamp": "@1795919690"}


@pytest.mark.parametrize(
    ("properties", "status"),
    [
        # never started
        (_unit(), Status("web", RunState.CREATED)),
        # running
        (
            _unit(ActiveState="active", SubState="running", MainPID="42", NRestarts="2", **STARTED),
            Status("web", RunState.RUNNING, 42, 1795919690.0, None, 2),
        ),
        # starting (ExecStartPre, or nspawn before READY=1)
        (
            _unit(ActiveState="activating", SubState="start", MainPID="42", **STARTED),
            Status("web", RunState.STARTING, 42, 1795919690.0),
        ),
        # frozen
        (
            _unit(ActiveState="active", SubState="frozen", MainPID="42", **STARTED),
            Status("web", RunState.PAUSED, 42, 1795919690.0),
        ),
        # waiting to be restarted after SIGKILL
        (
            _unit(
                ActiveState="activating",
                SubState="auto-restart",
                ExecMainCode="2",
                ExecMainStatus="9",
                **STARTED,
            ),
            Status("web", RunState.RESTARTING, None, 1795919690.0, 137),
        ),
        # exited cleanly (restart: no)
        (
            _unit(ExecMainCode="1", ExecMainStatus="0", **STARTED),
            Status("web", RunState.EXITED, None, 1795919690.0, 0),
        ),
        # failed with exit code 3
        (
            _unit(ActiveState="failed", Result="exit-code", ExecMainCode="1", ExecMainStatus="3"),
            Status("web", RunState.EXITED, None, None, 3),
        ),
        # restarted too often: systemd's start limit is pymachined's "dead"
        (
            _unit(
                ActiveState="failed", Result="start-limit-hit", ExecMainCode="1", ExecMainStatus="1"
            ),
            Status("web", RunState.DEAD, None, None, 1),
        ),
        # systemd 252 after the start limit: failed, Result=exit-code, restarts made
        (
            _unit(
                ActiveState="failed",
                Result="exit-code",
                ExecMainCode="1",
                ExecMainStatus="1",
                Restart="always",
                NRestarts="5",
            ),
            Status("web", RunState.DEAD, None, None, 1, 5),
        ),
        # failed once with a restart policy, and stopped by hand before any restart
        (
            _unit(ActiveState="failed", Result="timeout", Restart="on-failure", NRestarts="0"),
            Status("web", RunState.EXITED),
        ),
        # file removed and unit stopped: gone
        (_unit(LoadState="not-found"), None),
        # not a machine's unit
        (_unit(Id="pymachine-apply.service"), None),
        (_unit(Id="sshd.service"), None),
    ],
)
def test_unit_states_map_to_machine_states(
    properties: dict[str, str], status: Status | None
) -> None:
    assert unit_status(properties) == status


def test_recorded_output_gives_the_statuses() -> None:
    statuses = [unit_status(b) for b in parse_systemctl_show(RECORDED)]
    assert statuses == [
        Status("hello", RunState.RUNNING, 93, 1795919690.0, None, 1),
        Status("base", RunState.RESTARTING, None, 1795919600.0, 137, 0),
        None,
    ]


@pytest.mark.parametrize(
    ("unit", "name"),
    [
        ("pymachine-web.service", "web"),
        ("pymachine-web-1.service", "web-1"),
        ("pymachine-apply.service", None),
        ("pymachine-.service", None),
        ("pymachine-web.path", None),
        ("web.service", None),
    ],
)
def test_machine_of_unit(unit: str, name: str | None) -> None:
    assert machine_of(unit) == name


def test_systemctl_command_lines() -> None:
    assert commands.systemctl_argv("enable", ["a.service", "b.service"], "--no-reload") == [
        "systemctl",
        "enable",
        "--no-reload",
        "--",
        "a.service",
        "b.service",
    ]
    assert commands.daemon_reload_argv() == ["systemctl", "daemon-reload"]
    show = commands.systemctl_show_argv(["a.service", "b.service"], PROPERTIES)
    assert show[:3] == ["systemctl", "show", "--timestamp=unix"]
    assert show[3] == "--property=" + ",".join(PROPERTIES)
    assert show[4:] == ["--", "a.service", "b.service"]
    assert commands.set_property_argv("a.service", [("MemoryMax", "1024"), ("CPUQuota", "")]) == [
        "systemctl",
        "set-property",
        "--runtime",
        "--",
        "a.service",
        "MemoryMax=1024",
        "CPUQuota=",
    ]


def test_unit_properties_lift_unset_limits() -> None:
    limits = Limits(memory=1024**3, cpus=0.5, io_weight=50)
    assert unit_properties(limits) == [
        ("MemoryMax", str(1024**3)),
        ("MemoryHigh", "infinity"),
        ("CPUQuota", "50%"),
        ("TasksMax", "infinity"),
        ("CPUWeight", ""),
        ("IOWeight", "50"),
    ]
    assert unit_properties(Limits())[0] == ("MemoryMax", "infinity")


def test_the_apply_unit_runs_apply_before_machines_target(repo: Path) -> None:
    files = apply_unit_files(
        PurePosixPath("/etc/pymachine/my specs"),
        Layout(),
        repo / "templates",
        ("/opt/pm/bin/python3", "-m", "pymachined"),
        watch=True,
    )
    assert [f.path.name for f in files] == [APPLY_UNIT, "pymachine-apply.path"]
    service, path = ({(e.section, e.key): e.value for e in parse_unit(f.content)} for f in files)
    assert files[0].content.startswith("# pymachine-owner:")
    assert service["Unit", "Before"] == "machines.target"
    # Ready once the files are in place, before the starts (machine units are
    # ordered after it): as a oneshot its own starts would wait for it.
    assert service["Service", "Type"] == "notify"
    assert service["Service", "NotifyAccess"] == "main"
    assert "RemainAfterExit" not in {key for _, key in service}
    assert service["Install", "WantedBy"] == "machines.target"
    assert split_words(service["Service", "ExecStart"]) == [
        "/opt/pm/bin/python3",
        "-m",
        "pymachined",
        "--root=/",
        "apply",
        "--yes",
        "--supervisor=systemd",
        "--",
        "/etc/pymachine/my specs",
    ]
    assert path["Path", "PathChanged"] == "/etc/pymachine/my specs"
    assert path["Path", "Unit"] == APPLY_UNIT


@pytest.mark.parametrize(
    ("entry", "event"),
    [
        (
            {
                "UNIT": "pymachine-web.service",
                "MESSAGE_ID": "98e322203f7a4ed290d09fe03c09fe15",
                "EXIT_CODE": "killed",
                "EXIT_STATUS": "9",
                "COMMAND": "ExecStart",
                "time": "T",
            },
            {"time": "T", "machine": "web", "event": "die", "exit_code": 137},
        ),
        (
            {
                "UNIT": "pymachine-web.service",
                "MESSAGE_ID": "98e322203f7a4ed290d09fe03c09fe15",
                "EXIT_CODE": "exited",
                "EXIT_STATUS": "3",
                "COMMAND": "ExecStart",
                "time": "T",
            },
            {"time": "T", "machine": "web", "event": "die", "exit_code": 3},
        ),
        (
            {
                "UNIT": "pymachine-web.service",
                "MESSAGE_ID": "98e322203f7a4ed290d09fe03c09fe15",
                "EXIT_CODE": "exited",
                "EXIT_STATUS": "1",
                "COMMAND": "ExecStartPre",
                "time": "T",
            },
            None,
        ),
        (
            {
                "UNIT": "pymachine-web.service",
                "MESSAGE_ID": "5eb03494b6584870a536b337290809b3",
                "N_RESTARTS": "2",
                "time": "T",
            },
            {"time": "T", "machine": "web", "event": "restart", "restarts": 2},
        ),
        (
            {"UNIT": "pymachine-web.service", "MESSAGE_ID": "fe6faa94e7774663a0da52717891d8ef"},
            {"time": "", "machine": "web", "event": "oom"},
        ),
        (
            {"UNIT": "pymachine-apply.service", "MESSAGE_ID": "39f53479d3a045ac8e11786248231fbf"},
            None,
        ),
        ({"UNIT": "nginx.service", "MESSAGE_ID": "39f53479d3a045ac8e11786248231fbf"}, None),
        ({"UNIT": "pymachine-web.service", "MESSAGE_ID": "0" * 32}, None),
    ],
)
def test_journal_entries_become_events(
    entry: dict[str, str], event: dict[str, object] | None
) -> None:
    assert journal_event(entry) == event


@pytest.mark.parametrize(("state", "reset"), [("failed", True), ("inactive", False)])
def test_a_converged_apply_clears_a_failed_boot_apply(
    monkeypatch: pytest.MonkeyPatch, state: str, reset: bool
) -> None:
    from pymachined import run
    from pymachined.supervise.systemd import SystemdSupervisor

    ran: list[list[str]] = []

    def fake(argv: list[str], **kwargs: object) -> run.Completed:
        ran.append(list(argv))
        return run.Completed(tuple(argv), 0, f"ActiveState={state}\n", "")

    monkeypatch.setattr(run, "run", fake)
    SystemdSupervisor(Layout()).settled()
    assert ran[0][:2] == ["systemctl", "show"] and ran[0][-1] == APPLY_UNIT
    assert (["systemctl", "reset-failed", "--", APPLY_UNIT] in ran) is reset


def test_inspect_under_systemd_shows_the_units_command_line_and_journal() -> None:
    from pymachined.core.spec import Machine
    from pymachined.supervise.base import RunSpec
    from pymachined.supervise.systemd import SystemdSupervisor

    spec = Machine.model_validate(
        {"name": "web", "image": "debian-bookworm-slim", "command": ["sleep", "1"]}
    )
    recorded = RunSpec("web", ("pymachined's", "argv"), "no", "/var/lib/.../console.log", 5.0)
    view = SystemdSupervisor(Layout()).run_view("web", recorded, spec)
    assert view["argv"][0].endswith("systemd-nspawn") and "--machine=web" in view["argv"]
    assert view["log"] == "journalctl -u pymachine-web.service"
    assert view["unit"] == "pymachine-web.service"


def test_machine_units_start_after_the_boot_apply(repo: Path) -> None:
    from pymachined.core.render import machine_files
    from pymachined.core.spec import Machine

    machine = Machine.model_validate(
        {"name": "web", "image": "debian-bookworm-slim", "command": ["sleep", "1"]}
    )
    unit = machine_files(machine, Layout(), repo / "templates")[1]
    keys = {(e.section, e.key): e.value for e in parse_unit(unit.content)}
    assert APPLY_UNIT in split_words(keys["Unit", "After"])


@pytest.mark.parametrize("abstract", [False, True])
def test_the_apply_says_ready_once_and_no_child_inherits_the_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, abstract: bool
) -> None:
    import os

    from pymachined.supervise.systemd import SystemdSupervisor

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        if abstract:
            name = f"pymachine-test-{os.getpid()}-{tmp_path.name}"
            server.bind("\0" + name)
            address = "@" + name
        else:
            address = str(tmp_path / "notify")
            server.bind(address)
        server.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        supervisor = SystemdSupervisor(Layout())
        assert "NOTIFY_SOCKET" not in os.environ  # a build's nspawn must not say READY=1
        supervisor.ready()
        assert server.recv(1024) == b"READY=1"
        supervisor.ready()
        server.settimeout(0.2)
        with pytest.raises(TimeoutError):
            server.recv(1024)


def test_outside_a_notify_unit_ready_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    from pymachined.supervise import systemd
    from pymachined.supervise.systemd import SystemdSupervisor

    sent: list[tuple[str, str]] = []
    monkeypatch.setattr(systemd, "notify", lambda address, state: sent.append((address, state)))
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    SystemdSupervisor(Layout()).ready()
    assert sent == []
