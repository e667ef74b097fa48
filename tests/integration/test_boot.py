"""A booted machine under pymachined (as root): systemd as its init, its own
journal through ``logs --journal``, an orderly shutdown on ``stop``."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest

from tests.waiting import wait_until

if TYPE_CHECKING:
    from tests.integration.conftest import Host

pytestmark = pytest.mark.integration

BOOTED = """\
name: "@sys"
image: debian-bookworm
boot: true
network: none
restart: "no"
"""


def test_a_booted_machine_runs_systemd_shows_its_journal_and_powers_off(host: Host) -> None:
    host.declare(BOOTED)
    host.apply()
    assert host.machines()["sys"]["state"] == "running"  # apply waited for its PID 1

    # systemd inside reaches its default target (degraded is fine: a
    # container lacks what some units want).
    def state() -> str:
        return host.pymachine(
            "exec", f"{host.prefix}sys", "--", "systemctl", "is-system-running", check=False
        ).stdout.strip()

    wait_until(
        lambda: state() in ("running", "degraded"),
        "the machine's systemd to be up",
        120,
        interval=0.5,
        detail=state,
    )
    journal = host.pymachine("logs", "--journal", f"{host.prefix}sys").stdout
    assert "Startup finished" in journal or "Reached target" in journal, journal
    # Its own journal, not the host's: systemd inside logged as PID 1.
    assert "systemd[1]:" in journal, journal
    last = host.pymachine("logs", "--journal", "-n", "3", "-t", f"{host.prefix}sys").stdout
    assert len(last.splitlines()) == 3, last
    assert all(line[:4].isdigit() and "T" in line.split()[0] for line in last.splitlines()), last
    # A command machine has no journal to show: a clear error, not journalctl's.
    host.declare(
        BOOTED + '---\nname: "@cmd"\nimage: debian-bookworm-slim\nnetwork: none\n'
        "command: [sleep, infinity]\n"
    )
    host.apply()
    refused = host.pymachine("logs", "--journal", f"{host.prefix}cmd", check=False)
    assert refused.returncode == 1
    assert "is not booted" in refused.stderr
    # stop sends SIGRTMIN+3: systemd shuts down in order and nspawn exits 0.
    host.pymachine("stop", f"{host.prefix}sys")
    after = host.machines()["sys"]
    assert (after["state"], after["exit_code"]) == ("exited", 0), after
    events = host.pymachine("events", "-o", "json").stdout
    stops = [e for e in map(json.loads, events.splitlines()) if e["event"] == "stop"]
    assert stops and stops[-1]["exit_code"] == 0, events
