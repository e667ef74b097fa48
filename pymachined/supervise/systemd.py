"""The systemd supervisor: machines as units, on hosts where systemd is PID 1.

pymachine renders ``pymachine-NAME.service`` and ``NAME.nspawn`` into
/etc/systemd; this module drives systemd through systemctl (via run.py):
one daemon-reload after the files of an apply are written, enable/disable by
``autostart``, start/stop/restart, resource changes applied live with
``systemctl set-property``, and one ``systemctl show`` for every unit's state.
Restarting by policy, and starting at boot, is systemd's own work.

At boot the machine units wait for pymachine-apply.service (``After=``), a
``Type=notify`` unit: its apply says READY=1 (``ready``) once the files are
written and systemd reloaded, before its first start, so each machine starts
once, on the applied settings, and no start of the apply waits for a job that
waits for the apply.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import threading
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pymachined import run
from pymachined.core import commands, wire
from pymachined.core.layout import Layout
from pymachined.core.limits import Limits, unit_properties
from pymachined.core.parsers import parse_payload_signal, parse_systemctl_show, parse_unix_timestamp
from pymachined.core.spec import Machine
from pymachined.errors import CommandError, PymachineError
from pymachined.supervise.base import LogLine, RunSpec, RunState, Status

PREFIX = "pymachine-"
SUFFIX = ".service"
RESERVED = ("apply",)  # pymachine-apply.service is the boot unit, not a machine
PROPERTIES = (
    "Id",
    "LoadState",
    "ActiveState",
    "SubState",
    "Result",
    "MainPID",
    "ExecMainStartTimestamp",
    "ExecMainCode",
    "ExecMainStatus",
    "NRestarts",
    "UnitFileState",
    "Restart",
)
CLD_EXITED = 1


def clear_registration(name: str) -> bool:
    """Before a machine's unit starts nspawn: drop a registration machined kept
    of an earlier run whose nspawn was killed (SIGKILL), which would make the
    new one fail with "Machine 'NAME' already exists" until the start limit.
    Whether there was one."""
    return run.run(commands.unregister_machine_argv(name), check=False).returncode == 0


def machine_of(unit: str) -> str | None:
    """The machine a unit runs, from its name (None if it is not a machine's)."""
    if not (unit.startswith(PREFIX) and unit.endswith(SUFFIX)):
        return None
    name = unit[len(PREFIX) : -len(SUFFIX)]
    return name if name and name not in RESERVED else None


def unit_status(properties: Mapping[str, str]) -> Status | None:
    """A machine's status from its unit's properties (one block of
    ``systemctl show``); None for a unit systemd does not know. Pure."""
    name = machine_of(properties.get("Id", ""))
    if name is None:
        return None
    active = properties.get("ActiveState", "")
    sub = properties.get("SubState", "")
    if properties.get("LoadState") == "not-found" and active == "inactive":
        return None
    pid = int(properties.get("MainPID") or 0) or None
    started = parse_unix_timestamp(properties.get("ExecMainStartTimestamp", ""))
    restarts = int(properties.get("NRestarts") or 0)
    code = int(properties.get("ExecMainCode") or 0)
    raw = int(properties.get("ExecMainStatus") or 0)
    exit_code = None if code == 0 else raw if code == CLD_EXITED else 128 + raw
    if active == "activating" and sub == "auto-restart":
        state = RunState.RESTARTING
    elif active == "activating":  # nspawn has not said READY=1: the payload is not up
        state = RunState.STARTING
    elif active in ("active", "reloading", "deactivating"):
        state = RunState.PAUSED if sub == "frozen" else RunState.RUNNING
    elif active == "failed":
        # A unit that restarts by policy, has restarted, and is failed has
        # given up: its start limit was hit (systemd 252 says so in Result=
        # only sometimes, and leaves Result=exit-code after the last failure).
        limit = properties.get("Result") == "start-limit-hit"
        gave_up = properties.get("Restart", "no") not in ("", "no") and restarts > 0
        state = RunState.DEAD if limit or gave_up else RunState.EXITED
    elif started is None and code == 0:
        state = RunState.CREATED
    else:
        state = RunState.EXITED
    if state not in (RunState.STARTING, RunState.RUNNING, RunState.PAUSED):
        pid = None
    enabled = {"enabled": True, "disabled": False}.get(properties.get("UnitFileState", ""))
    return Status(name, state, pid, started, exit_code if pid is None else None, restarts, enabled)


# What systemd logs about a unit (sd-messages.h), as pymachine's events.
JOURNAL_EVENTS = {
    "39f53479d3a045ac8e11786248231fbf": "start",  # SD_MESSAGE_UNIT_STARTED
    "9d1aaa27d60140bd96365438aad20286": "stop",  # SD_MESSAGE_UNIT_STOPPED
    "98e322203f7a4ed290d09fe03c09fe15": "die",  # SD_MESSAGE_UNIT_PROCESS_EXIT
    "5eb03494b6584870a536b337290809b3": "restart",  # SD_MESSAGE_UNIT_RESTART_SCHEDULED
    "fe6faa94e7774663a0da52717891d8ef": "oom",  # SD_MESSAGE_UNIT_OUT_OF_MEMORY
}


def journal_event(entry: Mapping[str, str]) -> dict[str, Any] | None:
    """pymachine's event for one journal entry of systemd about a machine's unit
    (fields as text; ``time`` as pymachine's events have it), or None. Pure."""
    name = machine_of(entry.get("UNIT", ""))
    kind = JOURNAL_EVENTS.get(entry.get("MESSAGE_ID", ""))
    if name is None or kind is None:
        return None
    event: dict[str, Any] = {"time": entry.get("time", ""), "machine": name, "event": kind}
    if kind == "die":
        # Only the main process's exit, as pymachined reports it.
        if entry.get("COMMAND") not in (None, "ExecStart"):
            return None
        status = int(entry.get("EXIT_STATUS") or 0)
        event["exit_code"] = status if entry.get("EXIT_CODE") == "exited" else 128 + status
    if kind == "restart" and entry.get("N_RESTARTS"):
        event["restarts"] = int(entry["N_RESTARTS"])
    return event


def journal_events(since: datetime | None) -> list[dict[str, Any]]:
    """The events of every machine unit in the journal, oldest first."""
    from systemd import journal

    reader = journal.Reader()
    reader.add_match(_PID="1")
    if since is not None:
        reader.seek_realtime(since)
    # nspawn's own word of a payload killed by a signal, which comes before
    # PID 1's word of nspawn's exit 1.
    reader.add_disjunction()
    reader.add_match(SYSLOG_IDENTIFIER="systemd-nspawn")
    found = []
    killed: dict[str, int] = {}
    for entry in reader:
        unit = str(entry.get("_SYSTEMD_UNIT", ""))
        if entry.get("SYSLOG_IDENTIFIER") == "systemd-nspawn" and unit:
            signal = parse_payload_signal(str(entry.get("MESSAGE", "")))
            if signal is not None:
                killed[unit] = signal
            continue
        message_id = entry.get("MESSAGE_ID")
        if message_id is None or message_id.hex not in JOURNAL_EVENTS:
            continue
        when = entry["__REALTIME_TIMESTAMP"]
        stamp = datetime.fromtimestamp(when.timestamp(), UTC).isoformat(timespec="milliseconds")
        text = {k: str(v) for k, v in entry.items() if isinstance(v, str | int)}
        event = journal_event({**text, "MESSAGE_ID": message_id.hex, "time": stamp})
        if event is None:
            continue
        signal = killed.pop(str(entry.get("UNIT", "")), None)
        if event["event"] == "die" and event.get("exit_code") == 1 and signal is not None:
            event["exit_code"] = 128 + signal
        found.append(event)
    return found


def journal_output(
    unit: str, lines: int | None, since: float | None, follow: bool
) -> Iterator[LogLine]:
    """A unit's output from the journal (systemd.journal.Reader), in the form
    of pymachined's console log."""
    from systemd import journal

    reader = journal.Reader()
    reader.add_match(_SYSTEMD_UNIT=unit)
    if since is not None:
        reader.seek_realtime(datetime.fromtimestamp(since, UTC))

    def line(entry: Mapping[str, Any]) -> LogLine:
        message = entry.get("MESSAGE", "")
        text = message.decode(errors="replace") if isinstance(message, bytes) else str(message)
        when = entry.get("__REALTIME_TIMESTAMP")
        stamp = when.astimezone(UTC).strftime(commands.LOG_TIME_FORMAT) if when else None
        return LogLine(stamp, text + "\n")

    entries: list[dict[str, Any]] | deque[dict[str, Any]] = (
        list(reader) if lines is None else deque(reader, maxlen=lines)
    )
    for entry in entries:
        yield line(entry)
    while follow:
        reader.wait(1.0)
        for entry in reader:
            yield line(entry)


def payload_signal(unit: str, since: float | None) -> int | None:
    """The signal that killed the payload of a unit's last run, from what its
    nspawn logged ("Container NAME terminated by signal KILL."), or None:
    nspawn exits 1 then, which alone would hide the signal."""
    from systemd import journal

    reader = journal.Reader()
    reader.add_match(_SYSTEMD_UNIT=unit)
    if since is not None:
        reader.seek_realtime(datetime.fromtimestamp(since, UTC))
    text = "\n".join(str(entry.get("MESSAGE", "")) for entry in reader)
    return parse_payload_signal(text)


def notify(address: str, state: str) -> None:
    """Send state (``READY=1``) to a service manager's notification socket, as
    sd_notify does: one datagram; an address starting with @ is abstract."""
    target = "\0" + address[1:] if address.startswith("@") else address
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.sendto(state.encode(), target)


class SystemdSupervisor:
    """Machines supervised by systemd, as ``pymachine-NAME.service`` units."""

    starts_from_files = True  # a start runs the unit file

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self._lock = threading.Lock()
        # As the main process of a Type=notify unit (pymachine-apply.service),
        # this process says when it is ready. The socket is taken out of the
        # environment, so that no child speaks for the unit: the systemd-nspawn
        # of an image build would say READY=1 there too.
        self._notify = os.environ.pop("NOTIFY_SOCKET", None) or None

    def unit(self, name: str) -> str:
        """The unit of a machine."""
        return self.layout.unit_name(name)

    def cgroup(self, name: str) -> str:
        """A machine's control group, relative to each hierarchy's root (the
        unit template puts every machine in machine.slice)."""
        return f"machine.slice/{self.unit(name)}"

    def _systemctl(self, argv: Sequence[str]) -> str:
        try:
            return run.run(argv).stdout
        except CommandError as exc:
            unit = argv[-1] if "--" in argv else ""
            hint = (
                f"see systemctl status {unit} and journalctl -u {unit}"
                if unit.endswith(SUFFIX)
                else "see journalctl -xe"
            )
            raise PymachineError(str(exc), hint=hint) from exc

    def _units(self) -> list[str]:
        """The machine units whose files pymachine installed."""
        directory = Path(self.layout.unit_dir)
        found = sorted(p.name for p in directory.glob(f"{PREFIX}*{SUFFIX}"))
        return [unit for unit in found if machine_of(unit) is not None]

    def _show(self, units: Sequence[str]) -> dict[str, Status]:
        if not units:
            return {}
        text = self._systemctl(commands.systemctl_show_argv(units, PROPERTIES))
        out = {}
        for block in parse_systemctl_show(text):
            status = unit_status(block)
            if status is None:
                continue
            if status.exit_code == 1:  # nspawn's answer to a payload killed by a signal
                killed = payload_signal(self.unit(status.name), status.started)
                if killed is not None:
                    status = dataclasses.replace(status, exit_code=128 + killed)
            out[status.name] = status
        return out

    def _one(self, name: str) -> Status:
        return self._show([self.unit(name)]).get(name) or Status(name, RunState.EXITED)

    def prepare(self) -> None:
        """Nothing to get ready: systemd is running."""

    def status(self) -> dict[str, Status]:
        """Every machine unit's state, from one systemctl show."""
        return self._show(self._units())

    def run_view(self, name: str, run: RunSpec, spec: Machine | None) -> dict[str, Any]:
        """The unit runs nspawn with the .nspawn file's settings, into its journal."""
        from pymachined.core.render import nspawn_exec_argv

        unit = self.unit(name)
        view = {**wire.dump(run), "unit": unit, "log": f"journalctl -u {unit}"}
        if spec is not None:
            view["argv"] = nspawn_exec_argv(spec, self.layout)
        return view

    def output(
        self, name: str, lines: int | None, since: float | None, follow: bool
    ) -> Iterator[LogLine] | None:
        """The machine unit's output, from the journal."""
        return journal_output(self.unit(name), lines, since, follow)

    def events(self, since: float | None) -> list[dict[str, Any]]:
        """What systemd ran of the machine units, from the journal."""
        return journal_events(datetime.fromtimestamp(since, UTC) if since is not None else None)

    def settled(self) -> None:
        """Clear a failure of the boot apply's unit that this apply made good:
        systemd would otherwise keep it failed, and the host degraded."""
        from pymachined.core.render import APPLY_UNIT

        properties = parse_systemctl_show(
            run.run(commands.systemctl_show_argv([APPLY_UNIT], ["ActiveState"]), check=False).stdout
        )
        if any(p.get("ActiveState") == "failed" for p in properties):
            run.run(commands.systemctl_argv("reset-failed", [APPLY_UNIT]), check=False)

    def ready(self) -> None:
        """Say READY=1 to the unit this apply runs as (pymachine-apply.service),
        once: the machine units, held back behind it at boot, may start now."""
        address, self._notify = self._notify, None
        if address is not None:
            notify(address, "READY=1")

    def commit(self, autostart: Mapping[str, bool], reload: bool) -> None:
        """Take in rendered files: enable or disable the named machines' units by
        autostart (without the reload each would do), then reload systemd once."""
        enable = [self.unit(n) for n, on in sorted(autostart.items()) if on]
        disable = [self.unit(n) for n, on in sorted(autostart.items()) if not on]
        with self._lock:
            if enable:
                self._systemctl(commands.systemctl_argv("enable", enable, "--no-reload"))
            if disable:
                self._systemctl(commands.systemctl_argv("disable", disable, "--no-reload"))
            if reload or enable or disable:
                self._systemctl(commands.daemon_reload_argv())

    def start(self, spec: RunSpec) -> Status:
        """Start a machine's unit (its command line is in the unit file)."""
        self._systemctl(commands.systemctl_argv("start", [self.unit(spec.name)]))
        return self._one(spec.name)

    def restart(self, spec: RunSpec) -> Status:
        """Restart a machine's unit (units that require it restart with it)."""
        self._systemctl(commands.systemctl_argv("restart", [self.unit(spec.name)]))
        return self._one(spec.name)

    def stop(self, name: str) -> Status:
        """Stop a machine's unit (it stays stopped until started)."""
        self._systemctl(commands.systemctl_argv("stop", [self.unit(name)]))
        return self._one(name)

    def forget(self, name: str) -> None:
        """Stop and disable a machine's unit and drop its runtime settings; its
        files are removed by the caller, then commit() reloads."""
        unit = self.unit(name)
        self._systemctl(commands.systemctl_argv("disable", [unit], "--no-reload", "--now"))
        # revert drops set-property's runtime drop-ins; a unit only in /etc stays.
        self._systemctl(commands.systemctl_argv("revert", [unit]))
        run.run(commands.systemctl_argv("reset-failed", [unit]), check=False)

    def pause(self, name: str, paused: bool) -> Status:
        """Freeze or thaw a running machine's unit."""
        verb = "freeze" if paused else "thaw"
        argv = commands.systemctl_argv(verb, [self.unit(name)])
        try:
            run.run(argv)
        except CommandError as exc:
            raise PymachineError(
                str(exc),
                hint="systemd freezes units only on the unified cgroup hierarchy (cgroup v2)"
                if "does not support freezing" in exc.stderr
                else f"see systemctl status {self.unit(name)}",
            ) from exc
        return self._one(name)

    def set_limits(self, name: str, limits: Limits) -> list[str]:
        """Apply resource limits to a running machine's unit, without a restart
        (--runtime: after a reboot the unit file, rewritten with the same
        values, sets them). systemd reports what it cannot apply in its log."""
        self._systemctl(commands.set_property_argv(self.unit(name), unit_properties(limits)))
        return []
