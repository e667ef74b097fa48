"""apply, plan, ls and the pymachined supervisor against real systemd-nspawn (as root).

Each test gets its own host root; the image cache is shared with the other
integration tests (the root's images directory links to it), so only the
first run on a machine builds images.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from pymachined.core.parsers import parse_log_line
from pymachined.faults import STEPS
from pymachined.procs import leader_pid, payload_running
from tests.waiting import wait_until

if TYPE_CHECKING:
    from tests.integration.conftest import Host


pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


TWO = """\
name: "@a"
image: debian-bookworm-slim
command: [sh, -c, "echo started; exec sleep infinity"]
network: none
restart: always
environment: {GREETING: hello}
---
name: "@b"
image: debian-bookworm-slim
command: [sh, -c, "exec sleep infinity"]
network: none
restart: "no"
"""


def rendered_mtimes(host: Host) -> dict[str, int]:
    found = {}
    for pattern in (
        "etc/systemd/nspawn/*",
        "etc/systemd/system/*",
        "var/lib/pymachine/machines/*/state.json",
    ):
        for path in host.root.glob(pattern):
            found[str(path)] = path.stat().st_mtime_ns
    return found


def test_apply_then_reapply_changes_nothing(host: Host) -> None:
    host.declare(TWO)
    assert host.pymachine("plan", str(host.specs), check=False).returncode == 2
    first = host.apply()
    assert "applied" in first.stdout
    host.wait_for(lambda m: all(r["state"] == "running" for r in m.values()), "both running")
    before = host.machines()
    mtimes = rendered_mtimes(host)
    assert len(mtimes) == 6

    planned = host.pymachine("plan", str(host.specs), check=False)
    assert planned.returncode == 0
    assert planned.stdout == "nothing to do: the host matches the specs\n"
    again = host.apply()
    assert again.stdout == "nothing to do: the host matches the specs\n"
    after = host.machines()
    assert {n: r["pid"] for n, r in after.items()} == {n: r["pid"] for n, r in before.items()}
    assert rendered_mtimes(host) == mtimes
    host.wait_for_output("a", "started")


def test_a_change_restarts_only_that_machine(host: Host) -> None:
    host.declare(TWO)
    host.apply()
    host.wait_for(lambda m: all(r["pid"] for r in m.values()), "both running")
    before = host.machines()
    host.declare(TWO.replace("GREETING: hello", "GREETING: bonjour"))
    planned = json.loads(host.pymachine("plan", str(host.specs), "-o", "json", check=False).stdout)
    assert [(p["action"], p["machine"]) for p in planned] == [
        ("WriteFiles", f"{host.prefix}a"),
        ("RestartMachine", f"{host.prefix}a"),
    ]
    host.apply()
    host.wait_for(lambda m: m["a"]["pid"] not in (None, before["a"]["pid"]), "a restarted")
    assert host.machines()["b"]["pid"] == before["b"]["pid"]
    nspawn = host.root / f"etc/systemd/nspawn/{host.prefix}a.nspawn"
    assert "GREETING=bonjour" in nspawn.read_text()


BROKEN = """\
kind: image
name: "@broken"
from: debian-bookworm-slim
script: "echo the recipe is wrong; exit 3"
---
name: "@c"
image: "@broken"
command: [sleep, infinity]
network: none
---
name: "@d"
image: debian-bookworm-slim
command: [sleep, infinity]
network: none
depends_on: ["@c"]
---
"""


def test_a_failed_build_fails_its_machines_and_the_rest_converges(host: Host) -> None:
    host.declare(TWO)
    host.apply()
    host.wait_for(lambda m: all(r["pid"] for r in m.values()), "both running")
    before = host.machines()
    host.declare(BROKEN + TWO.replace("GREETING: hello", "GREETING: bonjour"))
    failed = host.apply(check=False)
    assert failed.returncode == 1, failed.stderr
    # The unrelated change landed: a runs with its new environment, b untouched.
    host.wait_for(lambda m: m["a"]["pid"] not in (None, before["a"]["pid"]), "a restarted")
    assert host.machines()["b"]["pid"] == before["b"]["pid"]
    nspawn = host.root / f"etc/systemd/nspawn/{host.prefix}a.nspawn"
    assert "GREETING=bonjour" in nspawn.read_text()
    # Each failure is reported with its cause and the build's log.
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error: ")]
    at = errors.index(next(e for e in errors if e.startswith(f"error: {host.prefix}c: ")))
    assert "building image" in errors[at]
    c_lines = errors[at : at + 8]
    assert any("the recipe is wrong" in line for line in c_lines), failed.stderr
    assert any(line.startswith("error:   hint: the full log is") for line in c_lines)
    d_line = next(line for line in errors if line.startswith(f"error: {host.prefix}d: "))
    assert f"needs machine {host.prefix}c, which failed" in d_line
    # The next plan holds only what is left: c and d.
    planned = json.loads(host.pymachine("plan", str(host.specs), "-o", "json", check=False).stdout)
    assert {p["machine"] for p in planned} == {f"{host.prefix}c", f"{host.prefix}d"}
    host.declare(BROKEN.replace("exit 3", "exit 0") + TWO.replace("hello", "bonjour"))
    host.apply()
    host.wait_for(lambda m: m["c"]["pid"] and m["d"]["pid"], "c and d running")
    for name in ("c", "d"):
        host.pymachine("destroy", "--yes", f"{host.prefix}{name}")
    host.pymachine("image", "rm", f"{host.prefix}broken")


def test_plan_names_what_the_specs_leave_out_and_ls_the_spec_image(host: Host) -> None:
    specs = TWO.replace("network: none\n", "network: none\npackages: [procps]\n", 1)
    host.declare(specs)
    host.apply()
    assert host.machines()["a"]["image"] == "debian-bookworm-slim"
    host.declare(specs.split("---\n")[0])
    planned = host.pymachine("plan", str(host.specs), check=False)
    assert planned.returncode == 0, planned.stdout
    assert f"no spec declares {host.prefix}b" in planned.stderr
    assert "--prune would remove them" in planned.stderr
    assert host.machines()["b"]["state"] == "running"


def test_prune_removes_only_what_pymachine_owns(host: Host) -> None:
    host.declare(TWO)
    host.apply()
    handmade = host.root / "var/lib/pymachine/machines/handmade"
    handmade.mkdir(parents=True)
    (handmade / "keep").write_text("mine\n")
    # b's unit, rewritten by hand without the owner marker: not pymachine's to delete.
    foreign_unit = host.root / f"etc/systemd/system/pymachine-{host.prefix}b.service"
    foreign_unit.write_text("[Unit]\nDescription=not pymachine's\n")

    empty = host.specs.parent / "empty"
    empty.mkdir()
    refused = host.pymachine("apply", str(empty), "--prune", "--yes", check=False)
    assert refused.returncode == 1
    assert "refusing to prune" in refused.stderr
    assert set(host.machines()) == {"a", "b"}

    host.declare(TWO.split("---\n")[0])
    host.apply("--prune")
    assert set(host.machines()) == {"a"}
    b_dir = host.root / f"var/lib/pymachine/machines/{host.prefix}b"
    assert not b_dir.exists()
    assert not (host.root / f"etc/systemd/nspawn/{host.prefix}b.nspawn").exists()
    assert (handmade / "keep").read_text() == "mine\n"
    assert foreign_unit.read_text() == "[Unit]\nDescription=not pymachine's\n"


def test_restart_policies(host: Host) -> None:
    host.declare(TWO)
    host.apply()
    host.wait_for(lambda m: all(r["pid"] for r in m.values()), "both running")
    before = host.machines()
    os.kill(before["a"]["pid"], signal.SIGKILL)
    os.kill(before["b"]["pid"], signal.SIGKILL)
    host.wait_for(
        lambda m: (
            m["a"]["restarts"] == 1 and m["a"]["state"] == "running" and m["b"]["state"] == "exited"
        ),
        "a restarted and b exited",
    )
    after = host.machines()
    assert after["a"]["pid"] != before["a"]["pid"]
    assert after["b"]["exit_code"] == 128 + signal.SIGKILL
    assert after["b"]["restarts"] == 0
    lines = host.pymachine("events", "-o", "json").stdout.splitlines()
    seen = [
        (e["machine"].removeprefix(host.prefix), e["event"], e.get("exit_code"))
        for e in map(json.loads, lines)
    ]
    for machine in ("a", "b"):
        mine = [(event, code) for name, event, code in seen if name == machine]
        assert mine[:3] == [("create", None), ("start", None), ("die", 137)]
    assert ("a", "restart", None) in seen
    assert ("b", "restart", None) not in seen
    assert host.pymachine("events", "--since", "1h").stdout.count(host.prefix) == len(seen)
    assert host.pymachine("events", "--since", "soon", check=False).returncode == 2
    # The payload killed by a signal, not its nspawn (which then exits 1): 128+N too.
    os.kill(host.payload("a"), signal.SIGKILL)
    host.wait_for(lambda m: m["a"]["restarts"] == 2 and m["a"]["state"] == "running", "a again")
    lines = host.pymachine("events", "-o", "json").stdout.splitlines()
    deaths = [e for e in map(json.loads, lines) if e["event"] == "die"]
    assert deaths[-1]["machine"] == f"{host.prefix}a"
    assert deaths[-1]["exit_code"] == 128 + signal.SIGKILL


GRACEFUL = """\
name: "@g"
image: debian-bookworm-slim
command: [sh, -c, "trap 'echo got TERM; exit 0' TERM; echo up; while :; do sleep 0.1; done"]
network: none
restart: always
environment: {V: "1"}
---
name: "@stubborn"
image: debian-bookworm-slim
command: [sh, -c, "trap '' TERM; echo up; while :; do sleep 0.1; done"]
network: none
restart: "no"
stop_timeout: 2s
"""


def test_stops_are_graceful_and_stop_timeout_is_honoured(host: Host) -> None:
    host.declare(GRACEFUL)
    host.apply()
    log = host.root / f"var/lib/pymachine/machines/{host.prefix}g/console.log"

    def count(text: str, at_least: int) -> None:
        wait_until(
            lambda: log.read_text().count(text) >= at_least,
            f"{text!r} x{at_least}",
            60,
            interval=0.1,
            detail=log.read_text,
        )

    count("up", 1)
    host.wait_for_output("stubborn", "up")
    # stop: the payload gets SIGTERM, exits 0, and that is a stop, not a death.
    stopped = host.pymachine("stop", f"{host.prefix}g")
    assert "exit code 0" in stopped.stdout
    count("got TERM", 1)
    assert (host.machines()["g"]["state"], host.machines()["g"]["exit_code"]) == ("exited", 0)
    events = [json.loads(e) for e in host.pymachine("events", "-o", "json").stdout.splitlines()]
    mine = [(e["event"], e.get("exit_code")) for e in events if e["machine"] == f"{host.prefix}g"]
    assert mine[-1] == ("stop", 0) and ("die", 0) not in mine
    # restart by name, and a changed spec: each stop is as graceful.
    host.pymachine("start", f"{host.prefix}g")
    count("up", 2)
    host.pymachine("restart", f"{host.prefix}g")
    count("got TERM", 2)
    count("up", 3)
    host.declare(GRACEFUL.replace('V: "1"', 'V: "2"'))
    host.apply()
    count("got TERM", 3)
    count("up", 4)
    # A payload that ignores its stop signal is killed after stop_timeout, not before.
    started = time.monotonic()
    killed = host.pymachine("stop", f"{host.prefix}stubborn")
    took = time.monotonic() - started
    assert 2.0 <= took < 8.0, took
    assert f"exit code {128 + signal.SIGKILL}" in killed.stdout


def test_a_machine_is_running_only_once_its_payload_runs(host: Host) -> None:
    # ls says running only once nspawn has exec'd the payload in the machine
    # (starting before: its first child is nspawn's own while it sets up;
    # created before that, once it is made and before its start is asked),
    # and apply returns once the payload runs, as systemctl start waits for
    # nspawn's READY=1. With ID-mapped layers nspawn is quick, so each look
    # checks the payload at the moment ls says running.
    host.declare(
        'name: "@s"\nimage: debian-bookworm\nnetwork: none\n'
        'command: [sh, -c, "echo up; exec sleep infinity"]\n'
    )
    argv = [sys.executable, "-m", "pymachined", "--root", str(host.root)]
    applying = subprocess.Popen(
        [*argv, "apply", str(host.specs), "--yes"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    seen: list[tuple[str, bool]] = []

    def applied() -> bool:
        if applying.poll() is not None:
            return True
        row = host.machines().get("s", {})
        if row.get("state") == "running":
            leader = leader_pid(row["pid"])
            seen.append(("running", leader is not None and payload_running(row["pid"], leader)))
        elif row.get("state"):
            seen.append((row["state"], False))
        return False

    wait_until(applied, "the apply to end", 120, interval=0, detail=lambda: seen)
    assert applying.returncode == 0, applying.stderr.read() if applying.stderr else ""
    assert all(up for state, up in seen if state == "running"), seen
    # Made and not yet started is created (as docker create's container is);
    # the states only ever go forward: created, starting, running.
    order = ["created", "starting", "running"]
    assert {state for state, _ in seen} <= set(order), seen
    steps = [order.index(state) for state, _ in seen]
    assert steps == sorted(steps), seen
    assert host.machines()["s"]["state"] == "running"
    assert "up" in host.wait_for_output("s", "up")


def test_machines_outlive_pymachined_and_are_adopted(host: Host) -> None:
    host.declare(TWO)
    host.apply()
    host.wait_for(lambda m: all(r["pid"] for r in m.values()), "both running")
    before = host.machines()
    daemon = host.daemon_pid()
    os.kill(daemon, signal.SIGKILL)
    time.sleep(0.5)
    for row in before.values():
        os.kill(row["pid"], 0)  # still alive
    after = host.machines()  # starts a new pymachined, which adopts them
    assert host.daemon_pid() != daemon
    assert {n: (r["pid"], r["state"]) for n, r in after.items()} == {
        n: (r["pid"], "running") for n, r in before.items()
    }
    payload = host.payload("a")
    os.kill(after["a"]["pid"], signal.SIGKILL)  # the new pymachined restarts it
    host.wait_for(lambda m: m["a"]["restarts"] == 1 and m["a"]["pid"], "a restarted")
    # What the killed nspawn left running in the machine's cgroups is gone too.
    wait_until(
        lambda: not Path(f"/proc/{payload}").exists(),
        f"the old payload {payload} to end with its nspawn",
        10,
        interval=0.1,
    )


@pytest.mark.parametrize("step", STEPS)
def test_kill_9_at_every_step_then_apply_converges(host: Host, step: str) -> None:
    image = f"""\
kind: image
name: "@img"
from: debian-bookworm-slim
files: [{{path: /etc/test-marker, content: "{host.prefix}"}}]
---
"""
    specs = image + TWO.replace("image: debian-bookworm-slim", 'image: "@img"')
    if step == "remove":
        host.declare(specs)
        host.apply()
        specs = image + TWO.split("---\n")[0].replace("debian-bookworm-slim", '"@img"')
    if step == "replace":  # the image changes under running machines
        host.declare(specs)
        host.apply()
        specs = specs.replace('content: "', 'content: "v2 ')
    host.declare(specs)
    crashed = host.apply("--prune", env={"PYMACHINE_CRASH_AT": step}, check=False)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    host.apply("--prune")
    planned = host.pymachine("plan", str(host.specs), "--prune", check=False)
    assert planned.returncode == 0, planned.stdout
    expected = {"a"} if step == "remove" else {"a", "b"}
    host.wait_for(
        lambda m: set(m) == expected and all(r["state"] == "running" for r in m.values()),
        "converged",
    )
    overlays = [p for p in host.mounts() if p.endswith("/rootfs")]
    assert sorted(overlays) == sorted(
        str(host.root / f"var/lib/pymachine/machines/{host.prefix}{n}/rootfs") for n in expected
    )
    images = host.root / "var/lib/pymachine/images"
    assert list(images.glob(".staging-*")) == []
    # The test's own image lives in the shared cache: remove it with its users.
    for name in expected:
        host.pymachine("destroy", "--yes", f"{host.prefix}{name}")
    host.pymachine("image", "rm", f"{host.prefix}img")


def test_two_applies_at_once_end_as_one(host: Host) -> None:
    host.declare(TWO)
    argv = [sys.executable, "-m", "pymachined", "--root", str(host.root)]
    runs = [
        subprocess.Popen(
            [*argv, "apply", str(host.specs), "--yes"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outs
    applied = [out for out, _ in outs if "applied" in out]
    idle = [out for out, _ in outs if out == "nothing to do: the host matches the specs\n"]
    assert (len(applied), len(idle)) == (1, 1), outs
    assert any("waiting for" in err for _, err in outs)
    machines = host.machines()
    assert set(machines) == {"a", "b"}
    assert len(list((host.root / "var/lib/pymachine/machines").iterdir())) == 2


def test_the_quick_start_examples_run(host: Host) -> None:
    specs = host.specs
    for path in (REPO / "specs").iterdir():
        (specs / path.name).write_text(path.read_text())
    host.apply()
    rows = {r["name"]: r for r in json.loads(host.pymachine("ls", "-o", "json").stdout)}
    assert set(rows) == {"base", "hello"}

    def fetched() -> str | None:
        try:
            with urllib.request.urlopen("http://127.0.0.1:8080/", timeout=2) as response:
                page: str = response.read().decode()
                return page
        except OSError:
            return None

    page = wait_until(fetched, "the quick start's page", 60, interval=0.5)
    assert "hello from a pymachine machine" in page
    rows = {r["name"]: r for r in json.loads(host.pymachine("ls", "-o", "json").stdout)}
    assert [rows[n]["state"] for n in ("base", "hello")] == ["running", "running"]
    for name in ("base", "hello"):
        host.pymachine("destroy", "--yes", name)


def test_a_full_disk_fails_plainly_and_loses_nothing(host: Host) -> None:
    machines = host.root / "var/lib/pymachine/machines"
    machines.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "pmfull", machines], check=True)
    try:
        one = 'name: "@a"\nimage: debian-bookworm-slim\ncommand: [sleep, infinity]\n'
        one += "network: none\nsecurity: {private_users: false}\n"  # no chown into the upper
        host.declare(one)
        host.apply()
        host.wait_for(lambda m: m["a"]["state"] == "running", "a running")
        running = host.machines()["a"]
        filler = machines / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True)

        # A change to a and a new machine b: the disk is full when apply writes.
        changed = one.replace("command:", 'environment: {X: "1"}\ncommand:')
        host.declare(changed + "---\n" + one.replace('"@a"', '"@b"'))
        failed = host.apply(check=False)
        assert failed.returncode == 1, failed.stderr
        assert "internal error" not in failed.stderr
        assert f"error: {host.prefix}a: No space left on device: {machines}/" in failed.stderr, (
            failed.stderr
        )
        assert "hint: free space on that file system" in failed.stderr
        # What was on record is intact: a runs as before; no temporary file is left.
        now = host.machines()["a"]
        assert (now["state"], now["pid"], now["restarts"]) == ("running", running["pid"], 0)
        assert list(machines.rglob("*.tmp")) == []

        filler.unlink()
        host.apply()
        assert host.pymachine("plan", str(host.specs), check=False).returncode == 0
        after = host.machines()
        assert after["a"]["pid"] != running["pid"]  # restarted with the change
        assert set(after) == {"a", "b"}
    finally:
        for name in host.machines():
            host.pymachine("destroy", "--yes", host.prefix + name, check=False)
        subprocess.run(["umount", machines], check=True)


def test_a_stopped_machine_gets_its_new_root_after_a_reboot(host: Host) -> None:
    image = 'kind: image\nname: "@img"\nfrom: debian-bookworm-slim\n'
    image += 'files: [{path: /etc/test-marker, content: "@one"}]\n---\n'  # a key of its own
    machine = 'name: "@b"\nimage: "@img"\ncommand: [sleep, infinity]\nnetwork: none\n'
    host.declare(image + machine + "state: stopped\n")
    host.apply()
    # A reboot: pymachined (if it ran) and everything under run/ are gone.
    if (host.root / "run/pymachine/pymachined.lock").exists():
        daemon = host.daemon_pid()
        os.kill(daemon, signal.SIGTERM)
        while Path(f"/proc/{daemon}").exists():
            time.sleep(0.05)
    shutil.rmtree(host.root / "run", ignore_errors=True)
    host.declare(image.replace('"@one"', '"@two"') + machine + "state: stopped\n")
    planned = host.pymachine("plan", str(host.specs), check=False).stdout
    assert "replace the root of" in planned, planned
    host.apply()
    root = host.root / f"var/lib/pymachine/machines/{host.prefix}b/rootfs"
    assert (root / "etc/test-marker").read_text() == f"{host.prefix}two"  # mounted by the replace
    host.pymachine("destroy", "--yes", f"{host.prefix}b")
    host.pymachine("image", "rm", f"{host.prefix}img")


def _piped(host: Host, *args: str, stdin: str | None) -> subprocess.CompletedProcess[str]:
    """pymachine with stdin a pipe holding stdin's text, or /dev/null for None:
    no terminal to ask, as in a script or a careless ``echo n |``."""
    return subprocess.run(
        host.argv(*args),
        input=stdin,
        stdin=subprocess.DEVNULL if stdin is None else None,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_without_a_terminal_only_yes_discards_what_a_machine_wrote(host: Host) -> None:
    image = 'kind: image\nname: "@img"\nfrom: debian-bookworm-slim\n'
    image += 'files: [{path: /etc/test-marker, content: "@one"}]\n---\n'  # a key of its own
    write = "head -c 3145728 /dev/urandom > /var/data.bin && sync && exec sleep infinity"
    machine = f'name: "@w"\nimage: "@img"\nnetwork: none\ncommand: [sh, -c, "{write}"]\n'
    # One that writes nothing: nspawn's shift of its root into its user
    # namespace copies up every file's owner (metacopy), which is no data.
    machine += '---\nname: "@idle"\nimage: "@img"\nnetwork: none\ncommand: [sleep, infinity]\n'
    host.declare(image + machine)
    # A plan that discards nothing applies without a terminal, as before.
    first = _piped(host, "apply", str(host.specs), stdin=None)
    assert first.returncode == 0, first.stderr
    name = f"{host.prefix}w"
    base = host.root / f"var/lib/pymachine/machines/{name}"
    data = base / "upper/var/data.bin"
    wait_until(lambda: data.exists() and data.stat().st_blocks * 512 >= 3 << 20, "the data", 60)
    pid = host.payload("w")
    host.payload("idle")  # its root shifted
    record = (base / "rootfs.json").read_text()
    digest = subprocess.run(["sha256sum", str(data)], capture_output=True, text=True).stdout

    host.declare(image.replace('"@one"', '"@two"') + machine)
    planned = host.pymachine("plan", str(host.specs), check=False).stdout
    line = next(x for x in planned.splitlines() if f"replace the root of {name}" in x)
    assert line.endswith("written in its root)"), line
    assert float(line.split("(discards ")[1].split()[0]) >= 3.0, line  # MiB
    assert f"  replace the root of {host.prefix}idle: its image changed\n" in planned, planned
    for stdin in ("n\n", "", None):
        refused = _piped(host, "apply", str(host.specs), stdin=stdin)
        assert refused.returncode == 1, refused
        assert (
            f"error: not applying without confirmation: the plan discards what {name} wrote "
            "in its root (see above), and there is no terminal to ask"
        ) in refused.stderr, refused.stderr
        assert "pass --yes to discard it" in refused.stderr
        denied = _piped(host, "destroy", name, stdin=stdin)
        assert denied.returncode == 1, denied
        assert f"error: not destroying {name} without confirmation: that discards" in denied.stderr
    # Nothing changed: the same root, record, payload and data.
    assert (base / "rootfs.json").read_text() == record
    assert host.payload("w") == pid
    assert subprocess.run(["sha256sum", str(data)], capture_output=True, text=True).stdout == digest

    host.apply()  # --yes
    assert (base / "rootfs.json").read_text() != record
    host.wait_for(lambda m: m["w"]["state"] == "running", "w running on its new root")
    assert host.pymachine("plan", str(host.specs), check=False).returncode == 0


def test_drift_is_detected_and_repaired(host: Host) -> None:
    host.declare(TWO)
    host.apply()
    host.wait_for(lambda m: all(r["pid"] for r in m.values()), "both running")
    nspawn = host.root / f"etc/systemd/nspawn/{host.prefix}a.nspawn"
    unit = host.root / f"etc/systemd/system/pymachine-{host.prefix}b.service"
    wanted = nspawn.read_text()
    nspawn.write_text(wanted.replace("GREETING=hello", "GREETING=tampered"))
    unit.unlink()
    host.pymachine("stop", f"{host.prefix}b")
    planned = json.loads(host.pymachine("plan", str(host.specs), "-o", "json", check=False).stdout)
    assert [
        (p["action"], p["machine"].removeprefix(host.prefix), p["reason"]) for p in planned
    ] == [
        ("WriteFiles", "a", f"{nspawn} differs from the spec"),
        ("WriteFiles", "b", f"{unit} is missing"),
        ("StartMachine", "b", "not running"),
    ]
    host.apply()
    assert nspawn.read_text() == wanted
    assert unit.exists()
    host.wait_for(lambda m: m["b"]["state"] == "running", "b running again")
    assert host.pymachine("plan", str(host.specs), check=False).returncode == 0


def test_a_deleted_root_is_made_again(host: Host) -> None:
    host.declare(TWO)
    host.apply()
    name = f"{host.prefix}b"
    host.pymachine("stop", name)
    base = host.root / f"var/lib/pymachine/machines/{name}"
    subprocess.run(["umount", str(base / "rootfs")], check=True)
    for part in ("rootfs", "upper", "work", "rootfs.json"):
        subprocess.run(["rm", "-rf", "--one-file-system", str(base / part)], check=True)
    planned = host.pymachine("plan", str(host.specs), check=False)
    assert f"create {name}: its root is missing" in planned.stdout
    host.apply()
    host.wait_for(lambda m: m["b"]["state"] == "running", "b running again")
    assert (base / "rootfs.json").exists()
    # A removal killed after the root's record went, with its writes still
    # there (its mark says so): they are not mixed into the root made again.
    host.pymachine("stop", name)
    subprocess.run(["umount", str(base / "rootfs")], check=True)
    (base / ".pymachine-removing").write_text("pymachine\n")
    (base / "rootfs.json").unlink()
    (base / "upper/leftover").write_text("from the old root\n")
    host.apply()
    assert not (base / ".pymachine-removing").exists()
    host.wait_for(lambda m: m["b"]["state"] == "running", "b running again")
    assert not (base / "upper/leftover").exists()
    assert not (base / "rootfs/leftover").exists()


def test_a_lost_root_record_keeps_the_machines_writes(host: Host) -> None:
    host.declare(TWO)
    host.apply()
    name = f"{host.prefix}a"
    base = host.root / f"var/lib/pymachine/machines/{name}"
    host.pymachine("exec", name, "--", "sh", "-c", "echo kept > /root/data")
    pid = host.machines()["a"]["pid"]
    (base / "rootfs.json").unlink()
    planned = host.pymachine("plan", str(host.specs), check=False)
    assert planned.returncode == 2, planned.stdout + planned.stderr
    assert f"keep the root of {name}: its root record is missing; its writable layer (" in (
        planned.stdout
    )
    assert "is kept and the record made again from the spec's image" in planned.stdout
    host.apply()
    assert (base / "rootfs.json").exists()
    assert (base / "upper/root/data").read_text() == "kept\n"
    assert host.machines()["a"]["pid"] == pid  # left running
    assert host.pymachine("plan", str(host.specs), check=False).returncode == 0
    # Stopped and started again, it runs on the root it kept.
    host.pymachine("stop", name)
    host.pymachine("start", name)
    host.wait_for(lambda m: m["a"]["state"] == "running", "a running again")
    shown = host.pymachine("exec", name, "--", "cat", "/root/data")
    assert shown.stdout == "kept\n"
    # A corrupt root record: the same.
    (base / "rootfs.json").write_text("{not json")
    planned = host.pymachine("plan", str(host.specs), check=False)
    assert f"keep the root of {name}: its root record cannot be read (" in planned.stdout
    host.apply()
    assert (base / "upper/root/data").read_text() == "kept\n"


def test_an_unreadable_record_leaves_only_its_machine(host: Host) -> None:
    host.declare(TWO)
    host.apply()
    pid_a = host.machines()["a"]["pid"]
    record = host.root / f"var/lib/pymachine/machines/{host.prefix}a/state.json"
    good = record.read_text()
    try:
        record.write_text('{"version": 99, "owner": "pymachine"}')
        host.declare(
            TWO.replace("GREETING: hello", "GREETING: changed").replace(
                'exec sleep infinity"]\nnetwork: none\nrestart: "no"',
                'echo b2; exec sleep infinity"]\nnetwork: none\nrestart: "no"',
            )
        )
        listed = host.pymachine("ls", check=False)
        assert listed.returncode == 1
        assert f"error: {host.prefix}a: state record {record} has version 99" in listed.stderr
        rows = {line.split()[0]: line.split()[1] for line in listed.stdout.splitlines()[1:]}
        assert rows[f"{host.prefix}a"] == "unreadable"
        assert rows[f"{host.prefix}b"] == "running"
        result = host.apply(check=False)
        assert result.returncode == 1, result.stdout + result.stderr
        assert f"error: {host.prefix}a: state record {record} has version 99" in result.stderr
        assert f"restart {host.prefix}b: its configuration changed" in result.stdout
        assert f"{host.prefix}a:" not in result.stdout  # nothing planned for it
        assert "Traceback" not in result.stderr
        listed = host.pymachine("ls", "-o", "json", check=False)
        pids = {row["name"]: row["pid"] for row in json.loads(listed.stdout)}
        assert pids[f"{host.prefix}a"] is None  # unreadable: not shown as anything
        assert pid_a is not None
        os.kill(pid_a, 0)  # still running, untouched
        host.wait_for_output("b", "b2")
        record.write_bytes(b"\xff\xfe not utf-8")
        result = host.apply(check=False)
        assert result.returncode == 1
        assert "is not valid UTF-8" in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        record.write_text(good)  # so the fixture can clean up


def test_a_held_lock_makes_apply_wait_or_give_up(host: Host) -> None:
    from pymachined.files import locked

    host.declare(TWO)
    lock = host.root / "run/pymachine/apply.lock"
    with locked(lock):
        result = host.apply("--lock-timeout", "1", check=False)
    assert result.returncode == 1
    assert f"waiting for {lock} (held by pid {os.getpid()})" in result.stderr
    assert "timed out after 1 s" in result.stderr
    assert host.machines() == {}


COUNTER = """\
name: "@c"
image: debian-bookworm-slim
command: [sh, -c, "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.2; done"]
network: none
environment: {GREETING: hello}
"""


def test_exec_logs_inspect_and_shell(host: Host) -> None:
    host.declare(COUNTER)
    host.apply()
    name = f"{host.prefix}c"
    host.wait_for(lambda m: m["c"]["pid"] is not None, "c running")
    result = subprocess.run(
        host.argv(
            "exec",
            name,
            "--",
            "sh",
            "-c",
            "echo $GREETING; cat; cat /etc/debian_version >/dev/null; exit 7",
        ),
        input="from stdin\n",
        capture_output=True,
        text=True,
        check=False,
    )
    assert (result.returncode, result.stdout) == (7, "hello\nfrom stdin\n")
    shell = subprocess.run(
        [sys.executable, "-m", "pymachined", "--root", str(host.root), "shell", name],
        input="echo $HOME; exit 3\n",
        capture_output=True,
        text=True,
        check=False,
    )
    assert (shell.returncode, shell.stdout) == (3, "/root\n")

    host.wait_for_output("c", "tick 2")
    tail = host.pymachine("logs", name, "-n", "2").stdout.splitlines()
    assert len(tail) == 2 and all(line.startswith("tick ") for line in tail)
    assert "tick 0" in host.pymachine("logs", name).stdout
    # Each line is stamped with the time it came, in UTC, by pymachined's log filter.
    stamp, text = parse_log_line(host.pymachine("logs", name, "-t", "-n", "1").stdout)
    assert stamp is not None and text.startswith("tick ")
    assert host.pymachine("logs", name, "--since", "2999-01-01T00:00:00").stdout == ""
    assert "tick" in host.pymachine("logs", name, "--since", "1m").stdout

    document = json.loads(host.pymachine("inspect", name).stdout)
    assert document["spec"]["environment"] == {"GREETING": "hello"}
    assert document["state"]["state"] == "running"
    assert document["root"]["mode"] == "overlay"
    assert document["run"]["argv"][0] == "/usr/bin/systemd-nspawn"

    for command in (
        ["exec", "nope", "--", "true"],
        ["logs", "nope"],
        ["inspect", "nope"],
        ["shell", "nope"],
        ["stop", "nope"],
        ["destroy", "--yes", "nope"],
    ):
        unknown = host.pymachine(*command, check=False)
        assert unknown.returncode == 1, command
        assert "error: no machine named 'nope'" in unknown.stderr


def test_a_machine_that_keeps_failing_is_dead(host: Host) -> None:
    host.declare(
        'name: "@f"\nimage: debian-bookworm-slim\ncommand: [sh, -c, "exit 3"]\n'
        "network: none\nrestart: on-failure\n"
    )
    host.apply()
    host.wait_for(lambda m: m["f"]["state"] == "dead", "f dead")
    machine = host.machines()["f"]
    assert (machine["restarts"], machine["exit_code"], machine["pid"]) == (5, 3, None)
    planned = host.pymachine("plan", str(host.specs), check=False)
    assert f"start {host.prefix}f: not running" in planned.stdout


def test_pause_freezes_and_stats_read_the_machines_cgroups(host: Host) -> None:
    host.declare(
        'name: "@p"\nimage: debian-bookworm-slim\nnetwork: none\n'
        'command: [sh, -c, "i=0; while true; do i=$((i+1)); echo $i > /srv/n; sleep 0.05; done"]\n'
    )
    host.apply()
    name = f"{host.prefix}p"
    host.wait_for(lambda m: m["p"]["pid"] is not None, "p running")

    def count() -> int:
        # Read from the host: exec refuses a paused machine.
        path = host.root / f"var/lib/pymachine/machines/{name}/rootfs/srv/n"
        return int(path.read_text())

    host.wait_for_output("p", "-- pymachined: starting")
    wait_until(
        lambda: (
            host.pymachine("exec", name, "--", "test", "-s", "/srv/n", check=False).returncode == 0
        ),
        "the counter to start",
        60,
    )
    host.pymachine("pause", name)
    assert host.machines()["p"]["state"] == "paused"
    first = count()
    time.sleep(1)
    assert count() == first  # frozen: the counter stands still
    assert host.pymachine("plan", str(host.specs), check=False).returncode == 0
    host.pymachine("unpause", name)
    time.sleep(1)
    assert count() > first
    assert host.machines()["p"]["state"] == "running"

    sample = json.loads(host.pymachine("stats", name, "--no-stream", "-o", "json").stdout)
    assert [s["name"] for s in sample] == [name]
    assert sample[0]["pids"] >= 2
    assert sample[0]["memory"] > 0
    assert sample[0]["cpu_percent"] is not None
    kinds = [
        json.loads(line)["event"]
        for line in host.pymachine("events", "-o", "json").stdout.splitlines()
    ]
    assert kinds[-2:] == ["pause", "unpause"]


def test_a_console_log_is_rotated_at_its_cap(host: Host) -> None:
    host.declare(
        """\
name: "@y"
image: debian-bookworm-slim
command: [sh, -c, "echo first; exec yes"]
network: none
log: {max_size: 1M}
"""
    )
    host.apply()
    base = host.root / f"var/lib/pymachine/machines/{host.prefix}y"
    log, old = base / "console.log", base / "console.log.1"
    wait_until(old.exists, "the log to be rotated", 60)
    rotations = 0
    inode = old.stat().st_ino
    for _ in range(25):  # `yes` writes without pause: the log stays at its cap
        time.sleep(0.2)
        for path in (log, old):
            with contextlib.suppress(FileNotFoundError):
                assert path.stat().st_size <= 1024**2 + 4096, path
        with contextlib.suppress(FileNotFoundError):
            if old.stat().st_ino != inode:
                rotations += 1
                inode = old.stat().st_ino
    assert rotations >= 1
    # (The last line may be one being written: a write across a page is
    # seen in two parts.)
    tail = host.pymachine("logs", "--tail", "4", f"{host.prefix}y").stdout
    assert tail.splitlines()[:3] == ["y", "y", "y"]
    stamped = host.pymachine("logs", "--tail", "1", "-t", f"{host.prefix}y").stdout
    assert stamped.startswith(time.strftime("%Y-%m-%dT", time.gmtime()))
    host.pymachine("stop", f"{host.prefix}y")
    # Too big at a start: rotated before the new one writes.
    old.unlink()
    log.write_bytes(b"x" * (1024**2 + 1))
    host.pymachine("start", f"{host.prefix}y")
    host.wait_for(lambda m: m["y"]["state"] == "running", "y running again")
    assert old.stat().st_size >= 1024**2 + 1


def test_an_unreadable_supervisor_record_leaves_only_its_machine(host: Host) -> None:
    host.declare(TWO)
    host.apply()
    host.wait_for(lambda m: all(r["pid"] for r in m.values()), "both running")
    pid_a = host.machines()["a"]["pid"]
    daemon = host.daemon_pid()
    os.kill(daemon, signal.SIGKILL)
    time.sleep(0.5)
    record = host.root / f"run/pymachine/supervisor/{host.prefix}a.json"
    record.write_text('["not", "a", "record"]')
    after = host.machines()  # a new pymachined, which cannot adopt a
    assert after["a"]["state"] == "unknown"
    assert after["b"]["state"] == "running"
    os.kill(pid_a, 0)  # not started twice, nor killed
    planned = host.pymachine("plan", str(host.specs), check=False)
    assert planned.returncode == 1
    assert f"error: {host.prefix}a: its supervisor's record cannot be read ({record}:" in (
        planned.stderr
    )
    assert "Traceback" not in planned.stderr
    # destroy ends what ran under the lost record.
    host.pymachine("destroy", "--yes", f"{host.prefix}a")
    wait_until(
        lambda: not Path(f"/proc/{pid_a}").exists(),
        "machine a to end with its destroy",
        10,
        interval=0.1,
    )
    assert set(host.machines()) == {"b"}
