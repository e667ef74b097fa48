"""``pymachine exec`` confined as the machine's PID 1, checked from inside (as root).

Each command exec'd below reads its own /proc/self and the machine's /proc/1
(PID 1 as the machine sees it) and the test compares the two: what an operator
runs with exec gets no more than the machine's own processes do.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from pymachined.core.parsers import parse_proc_status
from tests.integration.test_confinement import declare, machine, probe, syscalls

if TYPE_CHECKING:
    from tests.integration.conftest import Host

pytestmark = pytest.mark.integration

# Runs inside: the confinement of the exec'd process and of PID 1, the system
# calls the machine denies, and the id of the process.
COMPARE = """\
import ctypes, errno, json, os, sys
libc = ctypes.CDLL(None, use_errno=True)
calls = {}
for name, number in json.loads(sys.argv[1]).items():
    result = libc.syscall(number, 0, 0, 0, 0, 0)
    calls[name] = "ok" if result >= 0 else errno.errorcode.get(ctypes.get_errno(), "?")
def side(pid):
    read = lambda f: open(f"/proc/{pid}/{f}").read()
    return {"status": read("status"), "cgroup": read("cgroup"), "uid_map": read("uid_map")}
print(json.dumps({"self": side("self"), "pid1": side(1), "calls": calls, "cwd": os.getcwd()}))
"""

FORK = """\
import os, time
children = []
for _ in range(200):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    children.append(pid)
print(len(children))
for pid in children:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
"""

FIELDS = (
    "CapInh",
    "CapPrm",
    "CapEff",
    "CapBnd",
    "CapAmb",
    "NoNewPrivs",
    "Seccomp",
    "Seccomp_filters",
    "Uid",
    "Gid",
    "Groups",
)


def status_fields(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in FIELDS:
            fields[key] = value.strip()
    return fields


def compare(host: Host, name: str, *options: str) -> dict[str, object]:
    result = host.pymachine(
        "exec", *options, host.prefix + name, "--", "python3", "-c", COMPARE, json.dumps(syscalls())
    )
    report: dict[str, object] = json.loads(result.stdout)
    return report


def test_exec_is_confined_as_the_machines_pid_1(host: Host, tmp_path: Path) -> None:
    declare(
        host,
        machine("default", environment={"GREETING": "hi"}),
        machine("optout", security={"private_users": False}),
        machine(
            "declared",
            user="daemon",
            workdir="/tmp",
            security={
                "capabilities": {"drop": ["MKNOD", "NET_RAW"]},
                "no_new_privileges": True,
                "seccomp": {"deny": ["sethostname"]},
            },
        ),
    )
    host.apply()
    for name in ("default", "optout", "declared"):
        probe(host, name)  # PID 1 runs its payload
        report = compare(host, name)
        mine, pid1 = report["self"], report["pid1"]
        assert isinstance(mine, dict) and isinstance(pid1, dict)
        assert status_fields(mine["status"]) == status_fields(pid1["status"]), name
        assert mine["cgroup"] == pid1["cgroup"], name
        assert mine["uid_map"] == pid1["uid_map"], name
        confinement = parse_proc_status(mine["status"])
        assert confinement.seccomp == 2 and confinement.seccomp_filters >= 1, name
        calls = report["calls"]
        assert isinstance(calls, dict)
        for call in ("kexec_load", "bpf", "open_by_handle_at"):
            assert calls[call] == "EPERM", (name, call)
        if name == "optout":
            # Not host root with every capability: the machine's bounding set.
            assert mine["uid_map"].split() == ["0", "0", "4294967295"]
            assert not confinement.cap_bnd >> 16 & 1  # CAP_SYS_MODULE
        if name == "declared":
            assert confinement.no_new_privs
            assert calls["sethostname"] == "EPERM"
            assert confinement.cap_eff == 0  # daemon, as PID 1
            assert report["cwd"] == "/tmp"
        else:
            assert not confinement.no_new_privs
        if name == "default":
            assert mine["uid_map"].split()[1] != "0"

    # The machine's environment, user and working directory, each overridable.
    default = host.prefix + "default"
    shown = host.pymachine("exec", default, "--", "sh", "-c", "echo $GREETING $HOME; id -u; pwd")
    assert shown.stdout.split() == ["hi", "/root", "0", "/"]
    shown = host.pymachine(
        "exec",
        "-u",
        "daemon",
        "-w",
        "/tmp",
        "-e",
        "GREETING=hello",
        "-e",
        "EXTRA=a=b",
        default,
        "--",
        "sh",
        "-c",
        "echo $GREETING $EXTRA $HOME $USER; id -u; id -G; pwd",
    )
    assert shown.stdout.split() == ["hello", "a=b", "/usr/sbin", "daemon", "1", "1", "/tmp"]
    declared = host.prefix + "declared"
    assert host.pymachine("exec", declared, "--", "id", "-un").stdout == "daemon\n"
    assert host.pymachine("exec", "-u", "root", declared, "--", "id", "-u").stdout == "0\n"
    unknown = host.pymachine("exec", "-u", "nobody-here", default, "--", "true", check=False)
    assert unknown.returncode == 125
    assert "no user 'nobody-here' in the machine's /etc/passwd" in unknown.stderr
    bad = host.pymachine("exec", "-e", "NOEQUALS", default, "--", "true", check=False)
    assert bad.returncode == 2 and "not KEY=VALUE" in bad.stderr

    # Exit codes: the command's, 128+N for signal N, 127 for no such command.
    assert host.pymachine("exec", default, "--", "sh", "-c", "exit 7", check=False).returncode == 7
    killed = host.pymachine("exec", default, "--", "sh", "-c", "kill -9 $$", check=False)
    assert killed.returncode == 137
    killed = host.pymachine("exec", default, "--", "sh", "-c", "kill -TERM $$", check=False)
    assert killed.returncode == 143
    missing = host.pymachine("exec", default, "--", "no-such-command", check=False)
    assert missing.returncode == 127 and "no-such-command: command not found" in missing.stderr
    piped = subprocess.run(
        host.argv("exec", default, "--", "cat"),
        input="hi\n",
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert (piped.returncode, piped.stdout) == (0, "hi\n")

    # A paused machine is not entered (the command would hang in its frozen group).
    host.pymachine("pause", default)
    paused = host.pymachine("exec", default, "--", "true", check=False)
    assert paused.returncode == 1
    assert f"machine {default} is paused" in paused.stderr
    assert f"pymachine unpause {default}" in paused.stderr
    assert host.pymachine("shell", default, check=False).returncode == 1
    host.pymachine("unpause", default)
    assert host.pymachine("exec", default, "--", "true").returncode == 0

    # A hostile root: /etc/passwd made a FIFO, then a link out of the root.
    # Neither blocks nor leads to the host's files.
    host.pymachine("exec", default, "--", "sh", "-c", "rm /etc/passwd; mkfifo /etc/passwd")
    fifo = subprocess.run(
        host.argv("exec", "-u", "daemon", default, "--", "true"),
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert fifo.returncode == 125 and "/etc/passwd is not a regular file" in fifo.stderr
    # Root by number needs no account files, so the machine can be repaired.
    repaired = host.pymachine("exec", default, "--", "sh", "-c", "echo $HOME; rm /etc/passwd")
    assert repaired.stdout == "/\n"
    outside = tmp_path / "passwd"
    outside.write_text("hostuser:x:4321:4321::/:/bin/sh\n")
    link = f"ln -s ../../../../../../..{outside} /etc/passwd"
    host.pymachine("exec", default, "--", "sh", "-c", link)
    linked = host.pymachine("exec", "-u", "hostuser", default, "--", "true", check=False)
    assert linked.returncode == 125 and "no user 'hostuser'" in linked.stderr


def test_pids_limit_holds_for_processes_started_through_exec(host: Host) -> None:
    declare(host, machine("forks", resources={"pids": 64}))
    host.apply()
    probe(host, "forks")
    count = int(host.pymachine("exec", host.prefix + "forks", "--", "python3", "-c", FORK).stdout)
    # PID 1 and the exec'd python count too.
    assert 0 < count < 64
