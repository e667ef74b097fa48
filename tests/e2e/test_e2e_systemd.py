"""pymachine on a real systemd host: systemd supervises the example machines.

One booted host (tests/e2e/harness.py) goes through a machine's whole life
under systemd, one test a stage, in file order: apply, restart by policy, a
config change that restarts one machine, a resource change applied live,
prune, install --watch, a failing apply, a power cycle after which the
machines are back with no command run, uninstall and destroy. A stage applies
what it needs first, so it runs even when one before it failed; the few that
need what an earlier stage made (marked needs_stages) skip, naming it.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from tests.e2e.harness import REPO, BootedHost

pytestmark = pytest.mark.e2e

SPECS = "/root/specs"
UNITS = "/etc/systemd/system"
HELLO = "pymachine-hello.service"
BASE = "pymachine-base.service"
APPLY = "pymachine-apply.service"


def _cursor(host: BootedHost) -> str:
    out = host.run(["journalctl", "-n", "0", "--show-cursor", "--no-pager"]).stdout
    match = re.search(r"-- cursor: (\S+)", out)
    assert match, out
    return match.group(1)


def _reloads_since(host: BootedHost, cursor: str) -> int:
    """daemon-reloads systemd logged after cursor ("Reloading." from PID 1)."""
    # Filtered here: journalctl --after-cursor with a match (_PID=1) skips
    # entries when the cursor's own entry does not match (systemd 252).
    out = host.run(["journalctl", f"--after-cursor={cursor}", "-o", "json", "--no-pager"]).stdout
    entries = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return sum(1 for e in entries if e.get("_PID") == "1" and e.get("MESSAGE") == "Reloading.")


def _one_reload_since(host: BootedHost, cursor: str) -> None:
    """Exactly one daemon-reload after cursor (journald may show it a moment late)."""
    host.wait_for("systemd's reload in the journal", lambda: _reloads_since(host, cursor) >= 1)
    time.sleep(1)
    assert _reloads_since(host, cursor) == 1, "one daemon-reload for the whole apply"


def _apply(host: BootedHost, *args: str) -> str:
    return host.run(["pymachine", "apply", "--yes", *args, SPECS]).stdout


def _running(host: BootedHost, unit: str) -> bool:
    props = host.show(unit, "ActiveState", "SubState")
    return props == {"ActiveState": "active", "SubState": "running"}


def _main_pid(host: BootedHost, unit: str) -> int:
    return int(host.show(unit, "MainPID")["MainPID"])


def _verify(host: BootedHost) -> None:
    """systemd-analyze verify on every unit pymachine rendered."""
    units = host.run(
        ["sh", "-c", f"ls {UNITS}/pymachine-*.service {UNITS}/pymachine-*.path 2>/dev/null; true"]
    ).stdout.split()
    assert units, "no pymachine units found"
    host.run(["systemd-analyze", "verify", "--man=no", *units])


def _converge(host: BootedHost) -> None:
    """Apply specs/ as it stands, so a stage starts from the machines it needs
    even when an earlier stage failed half-way (nothing to do when it passed)."""
    _apply(host)


def test_install_and_apply(booted_host: BootedHost) -> None:
    host = booted_host
    # -- install the boot unit, then apply the examples, offline ---------------
    out = host.run(["pymachine", "install", SPECS]).stdout
    assert "pymachine-apply.service" in out
    assert host.run(["systemctl", "is-enabled", "pymachine-apply.service"]).stdout.strip() == (
        "enabled"
    )
    plan = host.run(["pymachine", "plan", SPECS], check=False)
    assert plan.returncode == 2, plan.stdout + plan.stderr
    assert "build image" not in plan.stdout, (
        "the images copied from the outer cache do not match the inner host's keys "
        "(bootstrap tool version or mirror differ), so the offline host would have to "
        f"build them:\n{plan.stdout}"
    )
    cursor = _cursor(host)
    _apply(host)
    _one_reload_since(host, cursor)
    for unit in (BASE, HELLO):
        assert _running(host, unit), host.run(["systemctl", "status", unit], check=False).stdout
        assert host.run(["systemctl", "is-enabled", unit]).stdout.strip() == "enabled"
    machines = host.run(["machinectl", "list", "--no-legend", "--no-pager"]).stdout
    assert {line.split()[0] for line in machines.splitlines() if line.strip()} >= {
        "base",
        "hello",
    }, machines
    nothing = host.run(["pymachine", "plan", SPECS], check=False)
    assert nothing.returncode == 0, nothing.stdout
    assert "nothing to do" in nothing.stdout
    # Disabled by hand: the next apply enables it again, without a restart.
    pid = _main_pid(host, HELLO)
    host.run(["systemctl", "disable", HELLO])
    drift = host.run(["pymachine", "plan", SPECS], check=False)
    assert drift.returncode == 2 and "enable hello at boot" in drift.stdout, drift.stdout
    _apply(host)
    assert host.run(["systemctl", "is-enabled", HELLO]).stdout.strip() == "enabled"
    assert _main_pid(host, HELLO) == pid
    assert host.run(["pymachine", "plan", SPECS], check=False).returncode == 0
    ls = host.run(["pymachine", "ls", "-o", "json"]).stdout
    assert '"state": "running"' in ls, ls
    _verify(host)
    # Output in the journal: the unit's (a command machine) and the booted
    # machine's own journal, read through machined.
    host.wait_for(
        "hello's output in the journal",
        lambda: "Serving HTTP" in host.run(["journalctl", "-u", HELLO, "--no-pager"]).stdout,
    )
    assert "Serving HTTP" in host.run(["pymachine", "logs", "hello"]).stdout
    host.wait_for(
        "base's own journal (journalctl -M base)",
        lambda: (
            "Startup finished"
            in host.run(["journalctl", "-M", "base", "--no-pager"], check=False).stdout
        ),
    )
    page = host.run(["pymachine", "exec", "hello", "--", "cat", "/srv/www/index.html"]).stdout
    assert "hello from a pymachine machine" in page
    status = host.run(["machinectl", "status", "base", "--no-pager"]).stdout
    assert BASE in status, status
    hello_cat = host.run(["cat", f"{UNITS}/{HELLO}"]).stdout
    assert hello_cat.startswith("# pymachine-owner:"), hello_cat
    assert "--register=yes" in hello_cat
    assert "WantedBy=machines.target" in hello_cat


def test_restart_by_policy(booted_host: BootedHost) -> None:
    host = booted_host
    _converge(host)
    # -- kill a machine's main process: systemd restarts it by policy -----------
    nspawn = _main_pid(host, HELLO)
    payload = int(host.run(["cat", f"/proc/{nspawn}/task/{nspawn}/children"]).stdout.split()[0])
    host.run(["sh", "-c", f"kill -KILL {payload}"])
    host.wait_for(
        "hello restarted (restart: always)",
        lambda: host.show(HELLO, "NRestarts")["NRestarts"] == "1" and _running(host, HELLO),
    )
    assert _main_pid(host, HELLO) != nspawn
    base_nspawn = _main_pid(host, BASE)
    base_init = host.run(["cat", f"/proc/{base_nspawn}/task/{base_nspawn}/children"]).stdout
    host.run(["sh", "-c", f"kill -KILL {base_init.split()[0]}"])
    host.wait_for(
        "base restarted (restart: on-failure)",
        lambda: host.show(BASE, "NRestarts")["NRestarts"] == "1" and _running(host, BASE),
    )
    ls = host.run(["pymachine", "ls"]).stdout
    assert re.search(r"^hello\s+running.*\s1$", ls, re.M), ls
    # The journal's record of it, as pymachine's events.
    lines = host.run(["pymachine", "events", "-o", "json"]).stdout.splitlines()
    hello_events = [e for e in map(json.loads, lines) if e["machine"] == "hello"]
    kinds = [e["event"] for e in hello_events]
    assert "die" in kinds and "restart" in kinds[kinds.index("die") :], hello_events
    died = next(e for e in hello_events if e["event"] == "die")
    assert isinstance(died["exit_code"], int) and died["exit_code"] != 0, died


def test_config_change_restarts_only_that_machine(booted_host: BootedHost) -> None:
    host = booted_host
    # The checkout's hello.yaml (what the host was given), applied as it is.
    hello_spec = (REPO / "specs" / "hello.yaml").read_text()
    host.write(f"{SPECS}/hello.yaml", hello_spec)
    _converge(host)
    # -- change one spec: only that machine restarts ----------------------------
    base_before = host.show(BASE, "MainPID", "ExecMainStartTimestamp")
    hello_pid = _main_pid(host, HELLO)
    host.write(
        f"{SPECS}/hello.yaml",
        hello_spec.replace('PYTHONUNBUFFERED: "1"', 'PYTHONUNBUFFERED: "1"\n  GREETING: "hi"'),
    )
    out = _apply(host)
    assert "restart hello: its configuration changed" in out, out
    assert "base" not in out, out
    assert _running(host, HELLO) and _main_pid(host, HELLO) != hello_pid
    assert host.show(BASE, "MainPID", "ExecMainStartTimestamp") == base_before


def test_memory_change_applied_live(booted_host: BootedHost) -> None:
    host = booted_host
    _converge(host)
    # -- change only resources.memory: applied live, no restart -----------------
    hello_pid = _main_pid(host, HELLO)
    hello_started = host.show(HELLO, "ExecMainStartTimestamp")
    changed = host.merged / "root/specs/hello.yaml"
    host.write(f"{SPECS}/hello.yaml", changed.read_text().replace("memory: 128M", "memory: 96M"))
    cursor = _cursor(host)
    out = _apply(host)
    assert "change the limits of hello: memory 128M → 96M" in out, out
    assert "restart" not in out, out
    _one_reload_since(host, cursor)
    assert _main_pid(host, HELLO) == hello_pid
    assert host.show(HELLO, "ExecMainStartTimestamp") == hello_started
    assert host.show(HELLO, "MemoryMax")["MemoryMax"] == str(96 * 1024 * 1024)
    assert f"MemoryMax={96 * 1024 * 1024}" in host.run(["cat", f"{UNITS}/{HELLO}"]).stdout
    assert host.run(["pymachine", "plan", SPECS], check=False).returncode == 0


def test_prune_removes_a_machine(booted_host: BootedHost) -> None:
    host = booted_host
    _converge(host)
    # -- remove a spec, apply with --prune: unit, .nspawn and root are gone -----
    host.run(["rm", f"{SPECS}/hello.yaml"])
    out = _apply(host, "--prune")
    assert "remove hello" in out, out
    for path in (f"{UNITS}/{HELLO}", "/etc/systemd/nspawn/hello.nspawn"):
        assert host.run(["test", "-e", path], check=False).returncode == 1, path
    assert not (host.state / "machines" / "hello").exists()
    assert host.show(HELLO, "LoadState")["LoadState"] == "not-found"
    machines = host.run(["machinectl", "list", "--no-legend", "--no-pager"]).stdout
    assert "hello" not in machines, machines
    assert _running(host, BASE)
    _verify(host)


def test_install_watch_applies_a_new_spec(booted_host: BootedHost) -> None:
    host = booted_host
    # -- install --watch: a new spec file is applied by the .path unit ---------
    host.run(["pymachine", "install", "--watch", SPECS])
    assert host.run(["systemctl", "is-active", "pymachine-apply.path"]).stdout.strip() == "active"
    host.write(
        f"{SPECS}/watched.yaml",
        "name: watched\nimage: debian-bookworm-slim\ncommand: [sleep, infinity]\n",
    )
    host.wait_for(
        "the .path unit to apply watched.yaml",
        lambda: _running(host, "pymachine-watched.service"),
        timeout=120,
    )
    _verify(host)


def _apply_result(host: BootedHost) -> dict[str, str]:
    """The apply unit's ActiveState and Result once it has finished; {} while it runs."""
    props = host.show(APPLY, "ActiveState", "Result")
    return props if props["ActiveState"] in ("inactive", "failed") else {}


def test_failing_apply_reports_its_error(booted_host: BootedHost) -> None:
    host = booted_host
    # The .path unit of the stage before (installing again changes nothing).
    host.run(["pymachine", "install", "--watch", SPECS])
    # -- a failing apply leaves its error in the journal and systemctl status --
    host.wait_for(
        "the triggered apply to finish", lambda: _apply_result(host).get("Result") == "success"
    )
    host.write(
        f"{SPECS}/broken.yaml", "name: broken\nimage: no-such-image\ncommand: [sleep, '1']\n"
    )
    host.wait_for(
        "the apply of a broken spec to fail",
        lambda: _apply_result(host).get("Result") == "exit-code",
        timeout=120,
    )
    shown = host.run(["systemctl", "status", APPLY, "--no-pager", "-n", "20"], check=False)
    assert "broken.yaml" in shown.stdout and "unknown image 'no-such-image'" in shown.stdout, (
        shown.stdout
    )
    host.run(["rm", f"{SPECS}/broken.yaml"])
    host.wait_for(
        "the apply to succeed again",
        lambda: _apply_result(host).get("Result") == "success",
        timeout=120,
    )


# The machine watched.yaml made, and no broken spec left behind.
@pytest.mark.needs_stages(
    "test_install_watch_applies_a_new_spec", "test_failing_apply_reports_its_error"
)
def test_power_cycle_brings_the_machines_back(booted_host: BootedHost) -> None:
    host = booted_host
    # -- power off and boot: autostart machines come back by themselves --------
    host.poweroff()
    host.boot()
    host.wait_for("base running after boot", lambda: _running(host, BASE), timeout=120)
    host.wait_for(
        "watched running after boot",
        lambda: _running(host, "pymachine-watched.service"),
        timeout=60,
    )
    # The unit is active from the apply's READY=1, before its starts: it has
    # finished (and said what it did) only once it is inactive again.
    host.wait_for("the boot apply to finish", lambda: _apply_done(host), timeout=120)
    apply_unit = host.show(
        "pymachine-apply.service", "Result", "ExecMainStatus", "ExecMainStartTimestamp"
    )
    assert apply_unit["Result"] == "success", apply_unit
    assert apply_unit["ExecMainStatus"] == "0", apply_unit
    assert apply_unit["ExecMainStartTimestamp"].startswith("@"), apply_unit
    boot_log = host.run(["journalctl", "-b", "-u", "pymachine-apply.service", "--no-pager"]).stdout
    assert "nothing to do" in boot_log or "applied" in boot_log, boot_log
    machines = host.run(["machinectl", "list", "--no-legend", "--no-pager"]).stdout
    assert "base" in machines and "watched" in machines, machines
    assert host.run(["pymachine", "plan", SPECS], check=False).returncode == 0


def test_uninstall_removes_the_boot_unit(booted_host: BootedHost) -> None:
    host = booted_host
    # -- uninstall removes the boot unit --------------------------------------------
    host.run(["pymachine", "uninstall"])
    for unit in ("pymachine-apply.service", "pymachine-apply.path"):
        assert host.run(["test", "-e", f"{UNITS}/{unit}"], check=False).returncode == 1, unit


# The machine watched.yaml made.
@pytest.mark.needs_stages("test_install_watch_applies_a_new_spec")
def test_destroy_leaves_no_unit(booted_host: BootedHost) -> None:
    host = booted_host
    # -- destroy: the unit is gone from systemd too --------------------------------
    host.run(["pymachine", "destroy", "--yes", "watched"])
    watched = host.show("pymachine-watched.service", "LoadState", "ActiveState")
    assert watched == {"LoadState": "not-found", "ActiveState": "inactive"}, watched


BUILD_SPECS = "/root/build-specs"
# A derived layer built inside the booted host. Its base (debian-bookworm-slim,
# which specs/ needs) is in the inner cache already; the layer itself is not,
# so pymachine builds it there, under systemd as PID 1. A script: layer needs
# no network (the host has none, so packages: could not reach a mirror).
BUILT = """\
kind: image
name: built-{where}
from: debian-bookworm-slim
script: "echo built {where} > /built-here"
---
name: built-{where}
image: built-{where}
command: [cat, /built-here]
network: none
restart: "no"
"""


def _built(host: BootedHost, where: str) -> str:
    """Write a spec dir whose image is not in the cache yet."""
    spec_dir = f"{BUILD_SPECS}-{where}"
    host.write(f"{spec_dir}/built.yaml", BUILT.format(where=where))
    return spec_dir


def test_images_build_under_systemd(booted_host: BootedHost) -> None:
    host = booted_host
    # From a unit, as the boot apply and any service run it.
    in_unit = host.run(
        [
            "systemd-run",
            "--wait",
            "--pipe",
            "--quiet",
            "--",
            "pymachine",
            "apply",
            "--yes",
            _built(host, "unit"),
        ],
        check=False,
    )
    assert in_unit.returncode == 0, in_unit.stdout + in_unit.stderr
    assert "image built-unit: built" in in_unit.stderr
    host.wait_for(
        "built-unit's output",
        lambda: "built unit" in host.run(["journalctl", "-u", "pymachine-built-unit"]).stdout,
    )
    # From a login shell, which runs in its session's scope (a command entered
    # with nsenter is in no unit at all, as nothing on a real host is).
    scope = ["systemd-run", "--scope", "--quiet", "--"]
    in_shell = host.run([*scope, "pymachine", "image", "build", _built(host, "shell")], check=False)
    assert in_shell.returncode == 0, in_shell.stdout + in_shell.stderr
    # From the boot apply's own unit.
    host.run(["pymachine", "install", _built(host, "boot")])
    # systemctl start returns once the apply has said READY=1 (its builds and
    # files done); it starts the machines after that.
    host.run(["systemctl", "start", APPLY])
    host.wait_for(
        "the boot apply's unit to finish",
        lambda: host.show(APPLY, "ActiveState")["ActiveState"] in ("inactive", "failed"),
    )
    assert host.show(APPLY, "Result")["Result"] == "success"
    journal = host.run(["journalctl", "-u", APPLY, "--no-pager"]).stdout
    assert "image built-boot: built" in journal
    # A boot apply that failed, made good by an apply by hand: no failed unit stays.
    broken = f"{BUILD_SPECS}-boot/broken.yaml"
    host.write(broken, "name: broken\nimage: no-such-image\ncommand: [sleep, '1']\n")
    host.run(["systemctl", "start", APPLY], check=False)
    assert host.show(APPLY, "ActiveState")["ActiveState"] == "failed"
    host.run(["rm", broken])
    host.run(["pymachine", "apply", "--yes", f"{BUILD_SPECS}-boot"])
    assert host.show(APPLY, "ActiveState")["ActiveState"] == "inactive"
    host.run(["pymachine", "uninstall"])
    listed = host.run(["pymachine", "image", "ls", "-o", "json"]).stdout
    names = {image["name"] for image in json.loads(listed)}
    assert {"built-unit", "built-shell", "built-boot"} <= names
    for name in ("built-unit", "built-boot"):
        host.run(["pymachine", "destroy", "--yes", name])


STOPPING = """\
name: graceful
image: debian-bookworm-slim
command: [sh, -c, "trap 'echo got TERM; exit 0' TERM; echo up; while :; do sleep 0.1; done"]
network: none
restart: always
---
name: needs-graceful
image: debian-bookworm-slim
command: [sleep, infinity]
network: none
depends_on: [graceful]
---
name: crashing
image: debian-bookworm-slim
command: [sh, -c, "exit 3"]
network: none
restart: always
---
name: victim
image: debian-bookworm-slim
command: [sleep, "7777"]
network: none
restart: "no"
"""
GRACEFUL = "pymachine-graceful.service"
NEEDS = "pymachine-needs-graceful.service"


def _journal_count(host: BootedHost, unit: str, text: str) -> int:
    return host.run(["journalctl", "-u", unit, "--no-pager"]).stdout.count(text)


def test_stops_are_graceful_and_crashes_recover_under_systemd(booted_host: BootedHost) -> None:
    host = booted_host
    host.write("/root/stop-specs/stop.yaml", STOPPING)
    host.run(["pymachine", "apply", "--yes", "/root/stop-specs"])
    host.wait_for("graceful up", lambda: _journal_count(host, GRACEFUL, "up") >= 1)
    shown = json.loads(host.run(["pymachine", "inspect", "graceful"]).stdout)["run"]
    assert shown["log"] == f"journalctl -u {GRACEFUL}" and "--keep-unit" in shown["argv"]
    # stop: the payload gets SIGTERM and exits 0; the unit ends inactive, not failed.
    out = host.run(["pymachine", "stop", "--yes", "graceful"]).stdout
    assert "exit code 0" in out
    host.wait_for("got TERM", lambda: _journal_count(host, GRACEFUL, "got TERM") >= 1)
    props = host.show(GRACEFUL, "ActiveState", "Result", "ExecMainStatus")
    assert props == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
    # restart brings back what needs it (Requires= stopped it with graceful).
    host.run(["pymachine", "restart", "graceful"])
    host.run(["pymachine", "start", "needs-graceful"])
    host.run(["pymachine", "restart", "graceful"])
    host.wait_for(
        "graceful and its dependent", lambda: _running(host, GRACEFUL) and _running(host, NEEDS)
    )
    assert _journal_count(host, GRACEFUL, "got TERM") >= 2
    # kill -9 of nspawn itself: back by policy, its registration with machined cleared.
    before = _main_pid(host, GRACEFUL)
    host.run(["systemctl", "kill", "--kill-who=main", "--signal=SIGKILL", GRACEFUL])
    try:
        host.wait_for(
            "graceful back after kill -9",
            lambda: _running(host, GRACEFUL) and _main_pid(host, GRACEFUL) not in (0, before),
            timeout=60,
        )
    except AssertionError:
        print(host.run(["journalctl", "-u", GRACEFUL, "-n", "40", "--no-pager"]).stdout)
        raise
    host.wait_for("its dependent back", lambda: _running(host, NEEDS), timeout=60)
    assert "already exists" not in host.run(["journalctl", "-u", GRACEFUL, "--no-pager"]).stdout

    # A machine that keeps failing ends dead once systemd's start limit is hit
    # (systemd 252 leaves Result=exit-code then).
    def state(name: str) -> str:
        rows = json.loads(host.run(["pymachine", "ls", "-o", "json"]).stdout)
        return next(str(r["state"]) for r in rows if r["name"] == name)

    host.wait_for("crashing dead", lambda: state("crashing") == "dead", timeout=60)
    # The payload killed by a signal (nspawn then exits 1): 128+N, as Docker says.
    # (The host has no procps: its /proc is read by hand.)
    kill = (
        'for p in /proc/[0-9]*; do [ "$(tr "\\0" " " < "$p/cmdline" 2>/dev/null)" = "sleep 7777 " ]'
        ' && kill -KILL "${p#/proc/}"; done; true'
    )
    host.run(["sh", "-c", kill])
    host.wait_for("victim exited", lambda: state("victim") == "exited", timeout=60)
    rows = json.loads(host.run(["pymachine", "ls", "-o", "json"]).stdout)
    assert next(r["exit_code"] for r in rows if r["name"] == "victim") == 137, rows
    events = host.run(["pymachine", "events", "-o", "json"]).stdout.splitlines()
    deaths = [
        e for e in map(json.loads, events) if e["machine"] == "victim" and e["event"] == "die"
    ]
    assert deaths and deaths[-1]["exit_code"] == 137, deaths
    for name in ("needs-graceful", "graceful", "crashing", "victim"):
        host.run(["pymachine", "destroy", "--yes", name])


POWER_SPECS = "/root/bo-specs"
# A payload that stops cleanly on SIGTERM, and says which settings it runs on.
POWER = """\
name: bo-term
image: debian-bookworm-slim
command:
  - sh
  - -c
  - "trap 'echo got TERM; exit 0' TERM; echo up $GREETING; while :; do sleep 0.1; done"
environment:
  GREETING: {greeting}
network: none
restart: on-failure
"""
BO = "pymachine-bo-term.service"
UNIT_STARTING = "7d4958e842da4a758f6c1cdc7b36dcc5"  # SD_MESSAGE_UNIT_STARTING
UNIT_STARTED = "39f53479d3a045ac8e11786248231fbf"  # SD_MESSAGE_UNIT_STARTED
UNIT_SUCCESS = "7ad2d189f7e94e70a38c781354912448"  # SD_MESSAGE_UNIT_SUCCESS
UNIT_FAILED = "d9b373ed55a64feb8242e02dbe79a49c"  # SD_MESSAGE_UNIT_FAILURE_RESULT


def _in_unit(host: BootedHost, *argv: str) -> str:
    """A pymachine command run from a transient unit, as a service would run it."""
    done = host.run(
        ["systemd-run", "--wait", "--pipe", "--quiet", "--", "pymachine", *argv], check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def _entries(host: BootedHost, unit: str, boot: str) -> list[dict[str, str]]:
    """A unit's journal entries of one boot (0 this one, -1 the one before)."""
    out = host.run(["journalctl", "-b", boot, "-u", unit, "-o", "json", "--no-pager"]).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _said(entries: list[dict[str, str]], text: str) -> int:
    return sum(1 for e in entries if e.get("MESSAGE") == text)


def _ids(entries: list[dict[str, str]], message_id: str) -> int:
    return sum(1 for e in entries if e.get("MESSAGE_ID") == message_id)


def _apply_done(host: BootedHost) -> bool:
    return host.show(APPLY, "ActiveState")["ActiveState"] in ("inactive", "failed")


def test_power_cycle_stops_gracefully_and_boots_on_the_applied_settings(
    booted_host: BootedHost,
) -> None:
    host = booted_host
    host.write(f"{POWER_SPECS}/bo.yaml", POWER.format(greeting="one"))
    host.run(["pymachine", "install", POWER_SPECS])
    _in_unit(host, "apply", "--yes", POWER_SPECS)
    host.wait_for("bo-term up", lambda: _said(_entries(host, BO, "0"), "up one") == 1)
    # The spec changes on disk with no apply; the host is powered off.
    host.write(f"{POWER_SPECS}/bo.yaml", POWER.format(greeting="two"))
    host.poweroff()
    host.boot()
    host.wait_for("the boot apply to finish", lambda: _apply_done(host), timeout=120)
    host.wait_for("bo-term running after boot", lambda: _running(host, BO), timeout=60)

    # At poweroff the payload got SIGTERM, exited 0, and its unit ended
    # inactive, not failed.
    before = _entries(host, BO, "-1")
    assert _said(before, "got TERM") == 1, [e.get("MESSAGE") for e in before]
    assert _ids(before, UNIT_SUCCESS) >= 1 and _ids(before, UNIT_FAILED) == 0, [
        e.get("MESSAGE") for e in before
    ]

    # At boot the machine started once, on the new settings, after the boot
    # apply had written them (its READY=1 made its unit active): the apply
    # found it not running and started it (a machine unit not ordered after
    # the apply starts on the old settings beside it, and is restarted).
    boot_log = host.run(["journalctl", "-b", "0", "-u", APPLY, "--no-pager"]).stdout
    assert "write files of bo-term" in boot_log, boot_log
    assert "start bo-term: not running" in boot_log, boot_log
    assert "restart bo-term" not in boot_log, boot_log
    now = _entries(host, BO, "0")
    said = [e.get("MESSAGE") for e in now]
    assert _ids(now, UNIT_STARTING) == 1 and _ids(now, UNIT_STARTED) == 1, said
    assert _said(now, "up two") == 1 and _said(now, "up one") == 0, said
    assert _said(now, "got TERM") == 0, said
    apply_unit = host.show(
        APPLY, "Result", "ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic"
    )
    machine = host.show(BO, "NRestarts", "InactiveExitTimestampMonotonic")
    assert apply_unit["Result"] == "success", apply_unit
    assert machine["NRestarts"] == "0", machine
    ready = int(apply_unit["ActiveEnterTimestampMonotonic"])
    assert int(apply_unit["ExecMainStartTimestampMonotonic"]) < ready, apply_unit
    assert int(machine["InactiveExitTimestampMonotonic"]) >= ready, (apply_unit, machine)
    failed = host.run(["systemctl", "--failed", "--no-legend", "--plain", "--no-pager"]).stdout
    assert failed.strip() == "", failed

    # The boot apply's unit started by hand restarts a machine from inside it:
    # no start waits for the unit that waits for it.
    host.write(f"{POWER_SPECS}/bo.yaml", POWER.format(greeting="three"))
    host.run(["systemctl", "start", APPLY], timeout=120)
    host.wait_for("the apply unit to finish", lambda: _apply_done(host), timeout=120)
    assert host.show(APPLY, "Result")["Result"] == "success"
    host.wait_for("bo-term on three", lambda: _said(_entries(host, BO, "0"), "up three") == 1)
    # An apply from a shell still returns only once its machines run.
    host.write(f"{POWER_SPECS}/bo.yaml", POWER.format(greeting="four"))
    out = _in_unit(host, "apply", "--yes", POWER_SPECS)
    assert "restart bo-term" in out, out
    assert _running(host, BO)
    assert _said(_entries(host, BO, "0"), "got TERM") == 2

    # A boot apply that fails before READY=1 (a broken spec) fails its unit's
    # start; the machine units, only ordered after it, start on the settings
    # they have. An apply that converges then leaves no failed unit.
    broken = f"{POWER_SPECS}/broken.yaml"
    host.write(broken, "name: bo-broken\nimage: no-such-image\ncommand: [sleep, '1']\n")
    host.poweroff()
    host.boot()
    host.wait_for("bo-term running after a failed boot apply", lambda: _running(host, BO))
    shown = host.show(APPLY, "ActiveState", "Result")
    assert shown == {"ActiveState": "failed", "Result": "exit-code"}, shown
    assert _said(_entries(host, BO, "0"), "up four") == 1
    host.run(["rm", broken])
    _in_unit(host, "apply", "--yes", POWER_SPECS)
    assert host.show(APPLY, "ActiveState")["ActiveState"] == "inactive"

    # A power loss: every process of the host dies at once, with no stop. At
    # the next boot the machine is back (its root and network assembled again,
    # no stale registration), started once, and nothing is failed.
    host.power_loss()
    host.boot()
    host.wait_for("the boot apply after a power loss", lambda: _apply_done(host), timeout=120)
    host.wait_for("bo-term back after a power loss", lambda: _running(host, BO), timeout=60)
    now = _entries(host, BO, "0")
    said = [e.get("MESSAGE") for e in now]
    assert _said(now, "up four") == 1 and _ids(now, UNIT_STARTED) == 1, said
    assert host.show(BO, "NRestarts")["NRestarts"] == "0"
    assert host.show(APPLY, "Result")["Result"] == "success"
    failed = host.run(["systemctl", "--failed", "--no-legend", "--plain", "--no-pager"]).stdout
    assert failed.strip() == "", failed

    host.run(["pymachine", "uninstall"])
    host.run(["pymachine", "destroy", "--yes", "bo-term"])
    failed = host.run(["systemctl", "--failed", "--no-legend", "--plain", "--no-pager"]).stdout
    assert failed.strip() == "", failed
