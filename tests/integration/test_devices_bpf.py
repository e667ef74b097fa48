"""The BPF device program of the unified (v2) tree, checked with real
processes and machines (as root).

On a hybrid host the kernel runs the program of a task's v2 group as well as
the v1 devices controller; the first test puts a process in a group of the
unified tree that only the program closes, with the v1 controller not
restricting it, so what it is denied is the program's doing.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from pymachined.cgroups import (
    MachineCgroup,
    attach_device_program,
    attached_device_programs,
    load_device_program,
    unified,
)
from pymachined.core import bpfinsn
from pymachined.errors import PymachineError
from pymachined.files import host_layout
from tests.waiting import wait_until

if TYPE_CHECKING:
    from tests.integration.conftest import Host

pytestmark = pytest.mark.integration

UNIFIED = Path("/sys/fs/cgroup") if unified() else Path("/sys/fs/cgroup/unified")

# Runs in the closed group: each attempt's outcome, by name.
CHILD = """\
import errno, json, os, sys

where = sys.argv[1]

def attempt(what):
    try:
        what()
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))

def use(path, flags):
    return lambda: os.close(os.open(path, flags))

def make(path, kind, major, minor):
    return lambda: os.mknod(path, kind | 0o600, os.makedev(major, minor))

loop = os.stat("/dev/loop0").st_rdev
report = {
    "planted_loop_r": attempt(use(where + "/loop", os.O_RDONLY)),
    "planted_loop_w": attempt(use(where + "/loop", os.O_WRONLY)),
    "dev_loop0": attempt(use("/dev/loop0", os.O_RDONLY)),
    "loop_control": attempt(use("/dev/loop-control", os.O_RDWR)),
    "kmsg": attempt(use("/dev/kmsg", os.O_RDONLY)),
    "null": attempt(use("/dev/null", os.O_RDWR)),
    "planted_null": attempt(use(where + "/null", os.O_RDWR)),
    "urandom": attempt(use("/dev/urandom", os.O_RDONLY)),
    "mknod_block": attempt(make(where + "/made-loop", 0o060000, os.major(loop), os.minor(loop))),
    "made_block_r": attempt(use(where + "/made-loop", os.O_RDONLY)),
    "mknod_kmsg": attempt(make(where + "/made-kmsg", 0o020000, 1, 11)),
    "made_kmsg_r": attempt(use(where + "/made-kmsg", os.O_RDONLY)),
    "cgroup": open("/proc/self/cgroup").read().splitlines(),
}
print(json.dumps(report))
"""


@pytest.fixture
def group() -> Iterator[Path]:
    """A group of the test's own in the unified tree, removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root: attaches BPF programs to cgroups")
    if not (UNIFIED / "cgroup.procs").exists():
        pytest.skip("no unified cgroup tree on this host")
    path = UNIFIED / f"pymachine-test-bpfdev-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    try:
        yield path
    finally:
        for _ in range(100):
            try:
                path.rmdir()
                break
            except OSError:
                time.sleep(0.05)


def v1_devices_rules(cgroup_lines: list[str]) -> list[str] | None:
    """The v1 devices.list of the group a process's /proc/PID/cgroup names."""
    for line in cgroup_lines:
        _, controllers, path = line.split(":", 2)
        if "devices" in controllers.split(","):
            return Path(f"/sys/fs/cgroup/devices{path}/devices.list").read_text().splitlines()
    return None


def test_the_program_alone_denies_all_but_the_allow_list(group: Path, tmp_path: Path) -> None:
    loop0 = Path("/dev/loop0")
    if not loop0.exists():
        pytest.skip("no /dev/loop0 on this host")
    rdev = loop0.stat().st_rdev
    os.mknod(tmp_path / "loop", stat.S_IFBLK | 0o600, rdev)
    os.mknod(tmp_path / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    # The control: outside the group the nodes open (tmp_path is not nodev).
    os.close(os.open(tmp_path / "loop", os.O_RDONLY))
    os.close(os.open(tmp_path / "null", os.O_RDWR))

    attach_device_program(group, "test")
    assert len(attached_device_programs(group)) == 1
    result = subprocess.run(
        [
            "sh",
            "-c",
            'echo $$ > "$1/cgroup.procs" && exec "$2" -c "$3" "$4"',
            "sh",
            str(group),
            sys.executable,
            CHILD,
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    report: dict[str, Any] = json.loads(result.stdout)
    assert f"0::/{group.relative_to(UNIFIED)}" in report["cgroup"]
    rules = v1_devices_rules(report["cgroup"])
    if rules is not None:  # a hybrid host: its v1 group must not be what denies
        assert rules == ["a *:* rwm"], rules
    for key in ("planted_loop_r", "planted_loop_w", "dev_loop0", "loop_control", "kmsg"):
        assert report[key] == "EPERM", (key, report[key])
    for key in ("null", "planted_null", "urandom"):
        assert report[key] == "ok", (key, report[key])
    # Any node may be made (c *:* m, b *:* m), and opens nothing.
    assert report["mknod_block"] == "ok"
    assert report["made_block_r"] == "EPERM"
    assert report["mknod_kmsg"] == "ok"
    assert report["made_kmsg_r"] == "EPERM"


def test_a_program_the_verifier_refuses_is_reported_with_its_log() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: loads a BPF program")
    # r0 = 1 and no exit: the verifier refuses a program that falls off its end.
    bad = bpfinsn.Insn(bpfinsn.ALU32_MOV_K, dst=0, imm=1).encode()
    with pytest.raises(PymachineError) as caught:
        load_device_program(bad)
    message = str(caught.value)
    assert caught.value.hint is not None and "verifier" in caught.value.hint
    assert message.startswith("the kernel refuses the machines' BPF device program")
    assert len(message.splitlines()) > 1, message  # the verifier's own words follow


def machine(name: str, **fields: Any) -> dict[str, Any]:
    return {
        "name": f"@{name}",
        "image": "debian-bookworm-slim",
        "network": "none",
        "restart": "no",
        "command": ["sleep", "infinity"],
        **fields,
    }


def machine_group(host: Host, name: str) -> MachineCgroup:
    return MachineCgroup(host.prefix + name, host_layout(host.root).cgroup_name(host.prefix + name))


def unified_path(pid: int) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line.removeprefix("0::")
    raise AssertionError(f"process {pid} is in no unified group")


def test_a_machine_runs_below_its_program_from_start_to_restart(host: Host) -> None:
    if not (UNIFIED / "cgroup.procs").exists():
        pytest.skip("no unified cgroup tree on this host")
    host.declare(yaml.safe_dump(machine("sleeper")))
    host.apply()
    group = machine_group(host, "sleeper")
    programs = group.device_programs()
    assert len(programs) == 1, programs
    directory = group.dirs()["unified"]
    # The payload nspawn starts runs in a group below the program's.
    payload = unified_path(host.payload("sleeper"))
    assert payload.startswith(f"/{directory.relative_to(UNIFIED)}/"), payload
    # A cgroup2 directory's inode number is the group's id, never reused.
    first = directory.stat().st_ino
    host.pymachine("restart", host.prefix + "sleeper")
    host.payload("sleeper")
    assert directory.stat().st_ino != first  # the group made again
    # pymachined loads its program once and attaches that one to every group.
    assert group.device_programs() == programs
    host.pymachine("stop", host.prefix + "sleeper")
    host.wait_for(lambda m: m["sleeper"]["state"] != "running", "the stop")
    time.sleep(0.5)
    assert not directory.exists()


HOSTILE = """\
import ctypes, errno, json, os, struct

libc = ctypes.CDLL(None, use_errno=True)
BPF = {"x86_64": 321, "aarch64": 280}[os.uname().machine]
root = "/sys/fs/cgroup/unified" if os.path.exists("/sys/fs/cgroup/unified") else "/sys/fs/cgroup"

def bpf(command, attr):
    buffer = ctypes.create_string_buffer(attr, 128)
    if libc.syscall(BPF, command, buffer, 128) < 0:
        return errno.errorcode[ctypes.get_errno()]
    return "ok"

group = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
allow_all = bytes([0xB4, 0, 0, 0, 1, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0])
insns = ctypes.create_string_buffer(allow_all)
report = {
    # Every id, then a program by its id: what a detach needs.
    "get_next_id": bpf(11, struct.pack("=II", 0, 0)),
    "get_fd_by_id": bpf(13, struct.pack("=I", 1)),
    "query": bpf(16, struct.pack("=II", group, 6)),
    "detach": bpf(9, struct.pack("=III", group, 0, 6)),
    "load_allow_all": bpf(5, struct.pack("=IIQ", 15, 2, ctypes.addressof(insns))),
    "cgroup": open("/proc/self/cgroup").read().splitlines(),
}
print("PROBE " + json.dumps(report), flush=True)
os.system("sleep infinity")
"""


def probe(host: Host, name: str) -> dict[str, Any]:
    def logs() -> str:
        return host.pymachine("logs", host.prefix + name, check=False).stdout

    def report() -> dict[str, Any] | None:
        for line in logs().splitlines():
            if line.startswith("PROBE "):
                found: dict[str, Any] = json.loads(line.removeprefix("PROBE "))
                return found
        return None

    return wait_until(report, f"the probe report from {name}", 60, detail=logs)


def test_a_machine_without_a_user_namespace_cannot_remove_its_program(host: Host) -> None:
    if not (UNIFIED / "cgroup.procs").exists():
        pytest.skip("no unified cgroup tree on this host")
    spec = machine(
        "hostile",
        packages=["python3"],
        files=[{"path": "/probe.py", "content": HOSTILE}],
        command=["python3", "/probe.py"],
        security={"private_users": False},
    )
    host.declare(yaml.safe_dump(spec))
    host.apply()
    group = machine_group(host, "hostile")
    before = group.device_programs()
    report = probe(host, "hostile")
    # Host root's ids and CAP_SYS_ADMIN, but the seccomp filter refuses bpf(2)
    # whatever it is asked.
    for key in ("get_next_id", "get_fd_by_id", "query", "detach", "load_allow_all"):
        assert report[key] == "EPERM", (key, report[key])
    # Its cgroup namespace starts below the group the program is attached
    # to: the group is not even nameable from inside.
    assert "0::/" in report["cgroup"], report["cgroup"]
    assert group.device_programs() == before and len(before) == 1


def test_a_booted_machine_runs_its_systemd_below_the_program(host: Host) -> None:
    if not (UNIFIED / "cgroup.procs").exists():
        pytest.skip("no unified cgroup tree on this host")
    specs = [
        {"name": f"@{name}", "image": "debian-bookworm", "boot": True, "network": "none", **extra}
        for name, extra in (
            ("booted", {}),
            ("booted-optout", {"security": {"private_users": False}}),
        )
    ]
    host.declare(yaml.safe_dump_all(specs, sort_keys=False))
    host.apply()
    for name in ("booted", "booted-optout"):
        state = host.pymachine(
            "exec",
            host.prefix + name,
            "--",
            "systemctl",
            "is-system-running",
            "--wait",
            check=False,
        )
        failed = host.pymachine(
            "exec", host.prefix + name, "--", "systemctl", "--failed", "--no-legend", check=False
        )
        assert state.stdout.strip() == "running", (name, state.stdout, failed.stdout)
        assert len(machine_group(host, name).device_programs()) == 1
        # Its own units' devices are still its own to close, within ours.
        null = host.pymachine("exec", host.prefix + name, "--", "sh", "-c", "echo x > /dev/null")
        assert null.returncode == 0
