"""Names on declared networks (as root): machines resolve their peers, and
only those, through their network's resolver; names follow machines as they
come and go; outward names go to the host's upstream servers.

Subnets 10.231.0.0/16 and fd42:231::/48, machine and network names with the
test's prefix. The upstream server is the test's own, on 127.231.0.53 (the
host root's etc/resolv.conf names it), so no query leaves the machine.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import pytest

from pymachined.core import names
from pymachined.core.layout import Layout
from tests.integration.test_network import net_host, netns_run
from tests.waiting import wait_until

if TYPE_CHECKING:
    from tests.integration.conftest import Host

pytestmark = pytest.mark.integration

__all__ = ["net_host"]

UPSTREAM = "127.231.0.53"
OUTWARD = ("outward.pymachine.test", "10.231.99.99")

SPECS = """\
kind: network
name: "@a"
subnet: 10.231.1.0/24
subnet6: fd42:231:1::/64
---
kind: network
name: "@b"
subnet: 10.231.2.0/24
nat: false
---
name: "@web"
image: debian-bookworm-slim
packages: [python3]
network: "@a"
hostname: www
command: [python3, -m, http.server, --bind, 0.0.0.0, "8080"]
---
name: "@cli"
image: debian-bookworm-slim
packages: [python3]
network: "@a"
command: [sleep, infinity]
---
name: "@far"
image: debian-bookworm-slim
network: "@b"
command: [sleep, infinity]
"""

LATE = """\
---
name: "@late"
image: debian-bookworm-slim
packages: [python3]
network: "@a"
command: [python3, -c, "import time; print('up', time.time(), flush=True); time.sleep(1e6)"]
"""


def dns_query(name: str, qtype: int = 1, ident: int = 0x2310) -> bytes:
    """A DNS query for name (A by default), recursion desired."""
    question = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return (
        struct.pack(">HHHHHH", ident, 0x0100, 1, 0, 0, 0) + question + struct.pack(">HH", qtype, 1)
    )


@contextlib.contextmanager
def fake_upstream() -> Iterator[None]:
    """A DNS server on UPSTREAM:53 answering one name's A query; empty answers
    (NOERROR) to everything else."""
    stop = threading.Event()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((UPSTREAM, 53))
    sock.settimeout(0.2)

    def serve() -> None:
        while not stop.is_set():
            try:
                data, peer = sock.recvfrom(512)
            except TimeoutError:
                continue
            end = data.index(b"\0", 12) + 5
            labels, i = [], 12
            while data[i]:
                labels.append(data[i + 1 : i + 1 + data[i]].decode())
                i += 1 + data[i]
            qtype = struct.unpack(">H", data[end - 4 : end - 2])[0]
            answer = b""
            if ".".join(labels) == OUTWARD[0] and qtype == 1:
                answer = struct.pack(">HHHIH", 0xC00C, 1, 1, 60, 4) + socket.inet_aton(OUTWARD[1])
            head = data[:2] + struct.pack(">HHHHH", 0x8180, 1, 1 if answer else 0, 0, 0)
            sock.sendto(head + data[12:end] + answer, peer)
        sock.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@pytest.fixture
def names_host(net_host: Host) -> Iterator[Host]:
    """net_host whose root names the test's own upstream resolver."""
    etc = net_host.root / "etc"
    etc.mkdir(exist_ok=True)
    (etc / "resolv.conf").write_text(f"nameserver {UPSTREAM}\n")
    with fake_upstream():
        yield net_host


def resolve(host: Host, machine: str, name: str) -> subprocess.CompletedProcess[str]:
    """getent hosts name, inside machine."""
    return host.pymachine("exec", host.prefix + machine, "--", "getent", "hosts", name, check=False)


def names_dir(host: Host, network: str) -> Path:
    return Path(names.names_dir(Layout(PurePosixPath(host.root)), host.prefix + network))


def ask(host: Host, machine: str, server: str, name: str) -> str:
    """From machine's namespace (a host python3), one UDP query to server:53:
    'rcode=N answers=M', or 'timeout'."""
    code = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET,"
        "socket.SOCK_DGRAM); s.settimeout(1.5)\n"
        "s.sendto(bytes.fromhex(sys.argv[2]), (sys.argv[1], 53))\n"
        "try:\n    r=s.recv(512); print(f'rcode={r[3]&15} answers={r[7]}')\n"
        "except TimeoutError:\n    print('timeout')\n"
    )
    query = dns_query(name).hex()
    return netns_run(host, machine, "python3", "-c", code, server, query).stdout.strip()


def test_peers_resolve_by_name_and_only_on_their_network(names_host: Host) -> None:
    host = names_host
    p = host.prefix
    host.declare(SPECS)
    host.apply()
    machines = host.machines()
    web = machines["web"]["address"]

    # Peers by name and by hostname, themselves too; IPv4 and IPv6.
    web6 = str(ipaddress.IPv6Address("fd42:231:1::") + int(web.rsplit(".", 1)[1]))
    got = resolve(host, "cli", p + "web")
    assert got.returncode == 0, got.stderr
    assert got.stdout.split()[0] in (web, web6), got.stdout
    v4 = host.pymachine("exec", p + "cli", "--", "getent", "ahostsv4", "www").stdout
    assert v4.split()[0] == web, v4
    v6 = host.pymachine("exec", p + "cli", "--", "getent", "ahostsv6", p + "web").stdout
    assert v6.split()[0] == web6, v6
    own = host.pymachine("exec", p + "web", "--", "getent", "ahostsv4", p + "web").stdout
    assert own.split()[0] == web
    assert resolve(host, "web", p + "cli").stdout.split()[1:] == [p + "cli"]

    # HTTP by name from a peer.
    wait_http_from = host.pymachine(
        "exec",
        p + "cli",
        "--",
        "python3",
        "-c",
        f"import urllib.request as u; print(u.urlopen('http://{p}web:8080/', timeout=5).status)",
        check=False,
    )
    assert wait_http_from.stdout.strip() == "200", wait_http_from.stderr

    # Another network's machine cannot resolve them, through its own resolver
    # or by asking network a's resolver directly (dropped), over IPv4 or IPv6.
    assert resolve(host, "far", p + "web").returncode == 2
    assert resolve(host, "far", "www").returncode == 2
    assert ask(host, "far", "10.231.2.1", p + "web") == "rcode=3 answers=0"
    assert ask(host, "far", "10.231.1.1", p + "web") == "timeout"
    assert ask(host, "cli", "10.231.2.1", p + "far") == "timeout"
    assert ask(host, "cli", "10.231.1.1", p + "web") == "rcode=0 answers=1"

    # Outward names go to the upstream server the host's resolv.conf names,
    # which only the host reaches (loopback): the resolver asks it for them.
    out = host.pymachine("exec", p + "cli", "--", "getent", "ahostsv4", OUTWARD[0]).stdout
    assert out.split()[0] == OUTWARD[1], out
    # ... but not on a network without NAT, where names would be a way out.
    assert resolve(host, "far", OUTWARD[0]).returncode == 2
    # A single label is never sent upstream.
    assert resolve(host, "cli", "nosuchmachine").returncode == 2

    # A second apply changes nothing.
    assert host.pymachine("plan", str(host.specs), check=False).returncode == 0

    # A new machine resolves at once, before its payload runs; nobody restarts.
    before = {n: row["pid"] for n, row in host.machines().items()}
    loop = subprocess.Popen(
        [
            *host.argv(),
            "exec",
            p + "cli",
            "--",
            "python3",
            "-c",
            "import socket,time,sys\n"
            "while True:\n"
            "    try:\n"
            "        socket.getaddrinfo(sys.argv[1], 80, socket.AF_INET)\n"
            "        print(time.time()); break\n"
            "    except socket.gaierror:\n"
            "        time.sleep(0.02)\n",
            p + "late",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        host.declare(SPECS + LATE)
        host.apply()
        out_loop, _ = loop.communicate(timeout=30)
    finally:
        loop.kill()
    up = float(host.wait_for_output("late", "up ").split("up ", 1)[1].split()[0])
    resolved = float(out_loop.strip())
    print(f"late resolved {resolved - up:+.3f} s from its payload's start")
    assert resolved - up < 1.0
    after = {n: row["pid"] for n, row in host.machines().items()}
    assert all(after[n] == pid for n, pid in before.items()), (before, after)
    assert resolve(host, "web", p + "late").returncode == 0

    # Stopped, it no longer resolves; the others still do.
    host.pymachine("stop", p + "late")
    assert resolve(host, "cli", p + "late").returncode == 2
    assert resolve(host, "cli", p + "web").returncode == 0


def gone(pid: int) -> bool:
    """Whether pid has ended (a zombie counts)."""
    try:
        return not Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True


def test_a_killed_resolver_is_drift_and_removal_leaves_nothing(names_host: Host) -> None:
    host = names_host
    p = host.prefix
    host.declare(SPECS)
    host.apply()
    directory = names_dir(host, "a")
    pid = int((directory / "pid").read_text())
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: gone(pid), "the resolver to die", 10)
    assert resolve(host, "cli", p + "web").returncode == 2
    planned = host.pymachine("plan", str(host.specs), check=False)
    assert planned.returncode == 2
    assert "its name resolver is not running" in planned.stdout
    host.apply()
    assert resolve(host, "cli", p + "web").returncode == 0
    assert int((directory / "pid").read_text()) != pid
    assert host.pymachine("plan", str(host.specs), check=False).returncode == 0

    # A machine that brings its own /etc/resolv.conf keeps it.
    own = SPECS.replace(
        'command: [sleep, infinity]\n---\nname: "@far"',
        'files:\n  - path: /etc/resolv.conf\n    content: "nameserver 10.231.1.77\\n"\n'
        'command: [sleep, infinity]\n---\nname: "@far"',
    )
    host.declare(own)
    host.apply()
    kept = host.pymachine("exec", p + "cli", "--", "cat", "/etc/resolv.conf").stdout
    assert kept == "nameserver 10.231.1.77\n"

    # Removal stops the resolvers and leaves none of their files.
    resolvers = [int((names_dir(host, n) / "pid").read_text()) for n in ("a", "b")]
    for name in ("web", "cli", "far"):
        host.pymachine("destroy", "--yes", p + name)
    for name in ("a", "b"):
        host.pymachine("network", "rm", p + name)
    assert all(gone(pid) for pid in resolvers)
    assert not names_dir(host, "a").exists() and not names_dir(host, "b").exists()
    rules = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True).stdout
    assert "10.231.1.1" not in rules
    assert not Path(names.names_base(Layout(PurePosixPath(host.root)))).parent.exists()


TARGET = Path("/tmp/pymachine-names-hostile-target")
HOSTILE = f"""\
kind: image
name: "@resolvplant"
from: debian-bookworm-slim
script: |
  set -e
  ln -sf {TARGET} /etc/resolv.conf
  mkfifo /etc/.resolv.conf.pymachine-tmp
---
kind: network
name: "@h"
subnet: 10.231.3.0/24
---
name: "@h1"
image: "@resolvplant"
network: "@h"
command: [sleep, infinity]
"""


def test_a_planted_resolv_conf_is_replaced_never_followed(names_host: Host) -> None:
    host = names_host
    TARGET.write_text("host file\n")
    try:
        host.declare(HOSTILE)
        result = host.pymachine("apply", str(host.specs), "--yes", check=False)
        assert result.returncode == 0, result.stderr
        assert TARGET.read_text() == "host file\n"
        root = host.root / f"var/lib/pymachine/machines/{host.prefix}h1/rootfs"
        written = root / "etc/resolv.conf"
        assert not written.is_symlink() and written.is_file()
        assert written.read_text().splitlines()[1:] == ["nameserver 10.231.3.1"]
        assert not os.path.lexists(root / "etc/.resolv.conf.pymachine-tmp")
        own = resolve(host, "h1", host.prefix + "h1")
        assert own.stdout.split()[0] == "10.231.3.2", own
    finally:
        TARGET.unlink(missing_ok=True)
