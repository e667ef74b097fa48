"""Confinement and resource limits, checked from inside running machines (as root).

Each machine runs a probe (written into it with ``files:``) as its own command,
so what it reports is what the machine's processes get: the bounding set,
seccomp filter and user namespace of PID 1, not those of a process entered
from outside. The probe prints one ``PROBE {json}`` line to the console log
and sleeps.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from pymachined.files import host_layout
from tests.waiting import wait_until

if TYPE_CHECKING:
    from tests.integration.conftest import Host

pytestmark = pytest.mark.integration

# systemd-nspawn(1), --capability=: the bounding set every machine keeps;
# CAP_NET_ADMIN too when the machine has its own network.
NSPAWN_DEFAULT_CAPABILITIES = {
    "AUDIT_CONTROL",
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "IPC_OWNER",
    "KILL",
    "LEASE",
    "LINUX_IMMUTABLE",
    "MKNOD",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_RAW",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_CHROOT",
    "SYS_NICE",
    "SYS_PTRACE",
    "SYS_RESOURCE",
    "SYS_TTY_CONFIG",
}
# capability(7) numbers, for decoding CapBnd masks.
CAPABILITY_NUMBERS = {
    "CHOWN": 0,
    "DAC_OVERRIDE": 1,
    "DAC_READ_SEARCH": 2,
    "FOWNER": 3,
    "FSETID": 4,
    "KILL": 5,
    "SETGID": 6,
    "SETUID": 7,
    "SETPCAP": 8,
    "LINUX_IMMUTABLE": 9,
    "NET_BIND_SERVICE": 10,
    "NET_BROADCAST": 11,
    "NET_ADMIN": 12,
    "NET_RAW": 13,
    "IPC_LOCK": 14,
    "IPC_OWNER": 15,
    "SYS_MODULE": 16,
    "SYS_RAWIO": 17,
    "SYS_CHROOT": 18,
    "SYS_PTRACE": 19,
    "SYS_PACCT": 20,
    "SYS_ADMIN": 21,
    "SYS_BOOT": 22,
    "SYS_NICE": 23,
    "SYS_RESOURCE": 24,
    "SYS_TIME": 25,
    "SYS_TTY_CONFIG": 26,
    "MKNOD": 27,
    "LEASE": 28,
    "AUDIT_WRITE": 29,
    "AUDIT_CONTROL": 30,
    "SETFCAP": 31,
    "MAC_OVERRIDE": 32,
    "MAC_ADMIN": 33,
    "SYSLOG": 34,
    "WAKE_ALARM": 35,
    "BLOCK_SUSPEND": 36,
    "AUDIT_READ": 37,
    "PERFMON": 38,
    "BPF": 39,
    "CHECKPOINT_RESTORE": 40,
}
SYSCALLS = {
    "x86_64": {"kexec_load": 246, "bpf": 321, "open_by_handle_at": 304, "sethostname": 170},
    "aarch64": {"kexec_load": 104, "bpf": 280, "open_by_handle_at": 265, "sethostname": 161},
}

PROBE = """\
import ctypes, errno, json, os, sys, time

def status():
    fields = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields

def attempt(what):
    try:
        what()
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))

def write(path):
    with open(path, "w") as handle:
        handle.write("x")

libc = ctypes.CDLL(None, use_errno=True)
calls = {}
for name, number in json.loads(sys.argv[1]).items():
    result = libc.syscall(number, 0, 0, 0, 0, 0)
    calls[name] = "ok" if result >= 0 else errno.errorcode.get(ctypes.get_errno(), "?")
forks = 0
if os.environ.get("FORKS"):
    children = []
    for _ in range(int(os.environ["FORKS"])):
        try:
            pid = os.fork()
        except OSError:
            break
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        children.append(pid)
    forks = len(children)
    for pid in children:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
oom = None
if os.environ.get("ALLOCATE"):
    pid = os.fork()
    if pid == 0:
        block = bytearray(int(os.environ["ALLOCATE"]))
        for i in range(0, len(block), 4096):
            block[i] = 1
        os._exit(0)
    _, code = os.waitpid(pid, 0)
    oom = os.WTERMSIG(code) if os.WIFSIGNALED(code) else -os.WEXITSTATUS(code)
fields = status()
report = {
    "uid": os.getuid(),
    "cap_bnd": fields["CapBnd"],
    "seccomp": fields["Seccomp"],
    "no_new_privs": fields["NoNewPrivs"],
    "uid_map": open("/proc/self/uid_map").read().split(),
    "calls": calls,
    "write_root": attempt(lambda: write("/probe-write")),
    "write_tmpfs": attempt(lambda: write("/scratch/x")) if os.path.isdir("/scratch") else None,
    "write_ro_bind": attempt(lambda: write("/ro/x")) if os.path.isdir("/ro") else None,
    "write_rw_bind": attempt(lambda: write("/rw/x")) if os.path.isdir("/rw") else None,
    "forks": forks,
    "oom_signal": oom,
}
print("PROBE " + json.dumps(report), flush=True)
while True:
    time.sleep(3600)
"""


def syscalls() -> dict[str, int]:
    table = SYSCALLS.get(platform.machine())
    if table is None:
        pytest.fail(f"no system call numbers for {platform.machine()}: add them to SYSCALLS")
    return table


def machine(name: str, **fields: Any) -> dict[str, Any]:
    """A probe machine (slim image with python3, as the examples use)."""
    return {
        "name": f"@{name}",
        "image": "debian-bookworm-slim",
        "packages": ["python3"],
        "network": "none",
        "restart": "no",
        "files": [{"path": "/probe.py", "content": PROBE}],
        "command": ["python3", "/probe.py", json.dumps(syscalls())],
        **fields,
    }


def declare(host: Host, *machines: dict[str, Any]) -> None:
    host.declare(yaml.safe_dump_all(machines, sort_keys=False))


def reports(host: Host, name: str) -> list[dict[str, Any]]:
    """Every probe report in a machine's console log, oldest first (the log
    is appended to across restarts)."""
    logs = host.pymachine("logs", host.prefix + name, check=False).stdout
    return [
        json.loads(line.removeprefix("PROBE "))
        for line in logs.splitlines()
        if line.startswith("PROBE ")
    ]


def probe(host: Host, name: str, after: int = 0) -> dict[str, Any]:
    """The probe's report from a machine's console log: the first one written
    after the first `after` reports (the one of the after-th restart)."""
    return wait_until(
        lambda: reports(host, name)[after:][:1] or None,
        f"probe report {after + 1} from {name}",
        60,
        detail=lambda: host.pymachine("logs", host.prefix + name, check=False).stdout,
    )[0]


def capabilities(mask: str) -> set[str]:
    value = int(mask, 16)
    return {name for name, bit in CAPABILITY_NUMBERS.items() if value >> bit & 1}


def host_capabilities() -> set[str]:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapBnd:"):
            return capabilities(line.split()[1])
    raise AssertionError("no CapBnd in /proc/self/status")


def test_default_and_declared_confinement_from_inside(host: Host, tmp_path: Path) -> None:
    rw = tmp_path / "rw"
    ro = tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    rw.chmod(0o1777)  # the machine's root is an unprivileged user on the host
    ro.chmod(0o1777)  # writable on the host, yet the bind is read-only
    declare(
        host,
        machine("default"),
        machine(
            "declared",
            user="daemon",
            read_only=True,
            tmpfs=["/scratch"],
            binds=[f"{ro}:/ro:ro", f"{rw}:/rw"],
            security={
                "capabilities": {"add": ["NET_ADMIN", "SYS_TIME"], "drop": ["MKNOD"]},
                "no_new_privileges": True,
                "seccomp": {"deny": ["sethostname"]},
            },
        ),
        machine("optout", security={"private_users": False}),
    )
    result = host.apply()
    assert "optout runs without a user namespace" in result.stderr
    assert "default runs without" not in result.stderr

    default = probe(host, "default")
    # In its own user namespace a machine starts from a full bounding set (the
    # kernel gives a new user namespace every capability, over its own ids
    # only) and nspawn cuts it to its default set; network: none is a private
    # network, so CAP_NET_ADMIN is kept.
    assert capabilities(default["cap_bnd"]) == NSPAWN_DEFAULT_CAPABILITIES | {"NET_ADMIN"}
    assert default["seccomp"] == "2"
    assert default["no_new_privs"] == "0"
    inside, outside, count = default["uid_map"]
    assert inside == "0" and outside != "0" and count == "65536"
    for call in ("kexec_load", "bpf", "open_by_handle_at"):
        assert default["calls"][call] == "EPERM", call
    assert default["write_root"] == "ok"

    declared = probe(host, "declared")
    assert declared["uid"] == 1  # daemon
    expected = (NSPAWN_DEFAULT_CAPABILITIES | {"NET_ADMIN", "SYS_TIME"}) - {"MKNOD"}
    assert capabilities(declared["cap_bnd"]) == expected
    assert declared["no_new_privs"] == "1"
    assert declared["calls"]["sethostname"] == "EPERM"
    assert declared["write_root"] == "EROFS"
    assert declared["write_tmpfs"] == "ok"
    assert declared["write_ro_bind"] == "EROFS"
    assert declared["write_rw_bind"] == "ok"
    assert (rw / "x").read_text() == "x"
    assert not (ro / "x").exists()

    optout = probe(host, "optout")
    assert optout["uid_map"] == ["0", "0", "4294967295"]
    # Without a user namespace the machine's set is cut from the host's own.
    expected = (NSPAWN_DEFAULT_CAPABILITIES | {"NET_ADMIN"}) & host_capabilities()
    assert capabilities(optout["cap_bnd"]) == expected

    # The range is kept: a restart finds the same one in the root's ownership.
    root = host.root / f"var/lib/pymachine/machines/{host.prefix}default/rootfs"
    assert root.stat().st_uid == int(outside)
    document = json.loads(host.pymachine("inspect", host.prefix + "default").stdout)
    assert document["user_namespace"]["uid_base"] == int(outside)
    optout_document = json.loads(host.pymachine("inspect", host.prefix + "optout").stdout)
    assert optout_document["user_namespace"] is None
    assert len(reports(host, "default")) == 1
    host.pymachine("restart", host.prefix + "default")
    assert probe(host, "default", after=1)["uid_map"][1] == outside


def test_a_bind_through_a_symlink_is_refused_and_nothing_changes(
    host: Host, tmp_path: Path
) -> None:
    outside = tmp_path / "secret"
    outside.mkdir()
    link = tmp_path / "innocent"
    link.symlink_to(outside)
    declare(host, machine("b", binds=[f"{link}:/data"]))
    result = host.apply(check=False)
    assert result.returncode == 1
    assert "machines.yaml:1" in result.stderr or "machines.yaml:" in result.stderr
    assert f"binds[0]: bind source {link} is a symlink" in result.stderr
    assert host.machines() == {}
    assert not (host.root / "var/lib/pymachine/machines").exists() or not any(
        (host.root / "var/lib/pymachine/machines").iterdir()
    )


def cgroup_dir(host: Host, controller: str, name: str) -> Path:
    """A machine's group in one v1 controller ("unified" on v2), scoped by the root."""
    group = host_layout(host.root).cgroup_name(name)
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        return Path("/sys/fs/cgroup", group)
    return Path("/sys/fs/cgroup", controller, group)


def read_cgroup(host: Host, controller: str, name: str, file: str) -> str:
    return (cgroup_dir(host, controller, name) / file).read_text().strip()


def test_pids_and_memory_limits_hold_and_change_live(host: Host) -> None:
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        controllers = {"pids": "unified", "memory": "unified"}
        pids_file, memory_file = "pids.max", "memory.max"
    else:
        controllers = {"pids": "pids", "memory": "memory"}
        pids_file, memory_file = "pids.max", "memory.limit_in_bytes"
    declare(
        host,
        machine("forks", environment={"FORKS": "200"}, resources={"pids": 64}),
        machine("hog", environment={"ALLOCATE": str(256 << 20)}, resources={"memory": "64M"}),
        machine("bystander"),
    )
    host.apply()
    forks = probe(host, "forks")
    assert 0 < forks["forks"] < 64  # the python process itself counts too
    hog = probe(host, "hog")
    assert hog["oom_signal"] == 9  # killed by the OOM killer, inside the machine
    probe(host, "bystander")
    machines = host.machines()
    assert machines["hog"]["state"] == "running"  # its PID 1 lived on
    assert machines["bystander"]["state"] == "running"

    def oom_events() -> list[dict[str, Any]] | None:
        lines = host.pymachine("events", "-o", "json").stdout.splitlines()
        return [e for e in map(json.loads, lines) if e["event"] == "oom"] or None

    ooms = wait_until(oom_events, "an oom event", 10, interval=0.3)
    assert [e["machine"] for e in ooms] == [host.prefix + "hog"]
    stats = json.loads(host.pymachine("stats", "--no-stream", "-o", "json").stdout)
    by_name = {row["name"]: row for row in stats}
    assert by_name[host.prefix + "hog"]["memory_limit"] == 64 << 20

    # Limits change on the running machines: no restart, new values in the cgroups.
    pid_before = {n: m["pid"] for n, m in host.machines().items()}
    spec = (host.specs / "machines.yaml").read_text()
    host.declare(
        spec.replace(host.prefix, "@")
        .replace("pids: 64", "pids: 128")
        .replace("memory: 64M", "memory: 128M")
    )
    plan = json.loads(host.pymachine("plan", str(host.specs), "-o", "json", check=False).stdout)
    assert {(a["action"], a["machine"].removeprefix(host.prefix)) for a in plan} == {
        ("WriteFiles", "forks"),
        ("UpdateLimits", "forks"),
        ("WriteFiles", "hog"),
        ("UpdateLimits", "hog"),
    }
    host.apply()
    assert {n: m["pid"] for n, m in host.machines().items()} == pid_before
    assert read_cgroup(host, controllers["pids"], host.prefix + "forks", pids_file) == "128"
    hog_memory = read_cgroup(host, controllers["memory"], host.prefix + "hog", memory_file)
    assert hog_memory == str(128 << 20)
    assert host.pymachine("plan", str(host.specs), check=False).returncode == 0


DEVICE_PROBE = """\
import errno, json, os, time

def attempt(what):
    try:
        what()
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))

def use(path, flags):
    os.close(os.open(path, flags))

def pty():
    for fd in os.openpty():  # /dev/ptmx, then the slave in /dev/pts
        os.close(fd)

def made(path, kind, major, minor):
    # Any node may be made where the kernel lets the machine (as runc allows),
    # on the /dev tmpfs, which is not nodev: it must still open nothing.
    def make_and_open():
        os.mknod(path, kind | 0o600, os.makedev(major, minor))
        try:
            use(path, os.O_RDWR | os.O_NOCTTY)
        finally:
            os.unlink(path)
    return make_and_open

root_options = [
    line.split()[5] for line in open("/proc/self/mountinfo") if line.split()[4] == "/"
][-1]
report = {
    "planted_block": attempt(lambda: use("/root/disk", os.O_RDWR)),
    "planted_block_ro": attempt(lambda: use("/root/disk", os.O_RDONLY)),
    "planted_char": attempt(lambda: use("/root/kmsg", os.O_RDONLY)),
    "mknod_dev_block": attempt(made("/dev/rb-disk", 0o060000, 7, 0)),
    "host_console": attempt(made("/dev/rb-console", 0o020000, 5, 1)),
    "null": attempt(lambda: open("/dev/null", "w").write("x")),
    "zero": attempt(lambda: open("/dev/zero", "rb").read(8)),
    "full": attempt(lambda: use("/dev/full", os.O_RDONLY)),
    "random": attempt(lambda: open("/dev/random", "rb").read(8)),
    "urandom": attempt(lambda: open("/dev/urandom", "rb").read(8)),
    "pty": attempt(pty),
    "root_options": root_options.split(","),
    "devices_list": open("/sys/fs/cgroup/devices/devices.list").read().splitlines()
    if os.path.exists("/sys/fs/cgroup/devices/devices.list")
    else None,
}
print("PROBE " + json.dumps(report), flush=True)
while True:
    time.sleep(3600)
"""

# An image whose build plants device nodes in its tree: the host's first loop
# device (block 7:0) and /dev/kmsg (char 1:11).
HOSTILE_IMAGE = {
    "kind": "image",
    "name": "rb-planted-devices",
    "from": "debian-bookworm-slim",
    "packages": ["python3"],
    "script": "mknod /root/disk b 7 0 && mknod /root/kmsg c 1 11",
}


def device_machine(name: str, **fields: Any) -> dict[str, Any]:
    return {
        "name": f"@{name}",
        "image": "rb-planted-devices",
        "network": "none",
        "restart": "no",
        "files": [{"path": "/probe.py", "content": DEVICE_PROBE}],
        "command": ["python3", "/probe.py"],
        **fields,
    }


def test_a_machine_opens_only_the_devices_it_is_allowed(host: Host) -> None:
    # Shifting an overlay root to a user namespace's ids copies each planted
    # node up (a mknod as the machine, which its list allows, as runc's does):
    # the default machine starts too, and its nodes open nothing either.
    declare(
        host,
        HOSTILE_IMAGE,
        device_machine("default"),
        device_machine("optout", security={"private_users": False}),
        device_machine("copied", rootfs="copy"),
        device_machine("copied-optout", rootfs="copy", security={"private_users": False}),
    )
    host.apply()
    for name in ("default", "optout", "copied", "copied-optout"):
        report = probe(host, name)
        denied = {"EPERM", "EACCES", "ENXIO"}
        keys = ("planted_block", "planted_block_ro", "planted_char", "mknod_dev_block")
        for key in (*keys, "host_console"):
            assert report[key] in denied, (name, key, report[key])
        for key in ("null", "zero", "full", "random", "urandom", "pty"):
            assert report[key] == "ok", (name, key, report[key])
        assert "nodev" in report["root_options"], (name, report["root_options"])
        assert "nosuid" not in report["root_options"]  # setuid binaries still work
        if not Path("/sys/fs/cgroup/cgroup.controllers").exists():
            rules = report["devices_list"]
            assert rules is not None and "a *:* rwm" not in rules, (name, rules)
            assert "c 1:3 rwm" in rules and "c 136:* rw" in rules, (name, rules)
            # Any node may be made, none but the list's opened: no block device.
            assert "b *:* m" in rules and "c *:* m" in rules, (name, rules)
            opened = [r for r in rules if set(r.split()[-1]) & {"r", "w"}]
            assert not any(r.startswith(("a ", "b ")) for r in opened), (name, rules)


def test_two_roots_keep_their_machines_cgroups_apart(host: Host, other_host: Host) -> None:
    # One machine name under two roots: each gets its own groups, its own
    # limits, and stopping one leaves the other running.
    declare(host, machine("same", resources={"pids": 64}))
    declare(other_host, machine("same", resources={"pids": 100}))
    host.apply()
    other_host.apply()
    name = host.prefix + "same"
    probe(host, "same")
    probe(other_host, "same")
    first, second = cgroup_dir(host, "pids", name), cgroup_dir(other_host, "pids", name)
    assert first != second
    assert read_cgroup(host, "pids", name, "pids.max") == "64"
    assert read_cgroup(other_host, "pids", name, "pids.max") == "100"
    pid = host.machines()["same"]["pid"]
    other_host.pymachine("stop", name)
    assert other_host.machines()["same"]["state"] != "running"
    time.sleep(0.5)
    assert host.machines()["same"]["state"] == "running"
    assert host.machines()["same"]["pid"] == pid
    assert Path(f"/proc/{pid}").exists()
    assert read_cgroup(host, "pids", name, "pids.max") == "64"
    assert int(read_cgroup(host, "pids", name, "pids.current")) > 0
    # A symlink to a root names the same root: the same machines, the same groups.
    link = host.root.parent / "link"
    link.symlink_to(host.root)
    assert host_layout(link) == host_layout(host.root)
    via_link = dataclasses.replace(host, root=link)
    assert via_link.machines()["same"]["pid"] == pid
