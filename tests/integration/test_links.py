"""Links as users of Compose expect, against real machines (as root): low ports
bind in a machine with a user namespace, a machine keeps its MAC address across
a stop and a start and its peer reaches it again at once, a host port held by
another process is refused at plan time, and a change of ports alone is applied
to the running machine.

Subnets 10.232.0.0/16 and fd42:232::/48, host ports 18241-18249 only; traffic
goes to loopback and to the test's own namespaces.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.integration.test_network import http_get, net_host, netns_of, netns_run, wait_http
from tests.waiting import wait_until

if TYPE_CHECKING:
    from tests.integration.conftest import Host

pytestmark = pytest.mark.integration
__all__ = ["net_host"]  # the fixture, shared with test_network

# Binds port 80 as the machine's root (in its user namespace), on IPv6 and
# IPv4 (published IPv6 ports reach a machine with an IPv6 address over IPv6),
# says when it listens (the host's clock: one kernel), and answers every
# connection.
LISTENER = (
    "import socket,time\n"
    "s=socket.socket(socket.AF_INET6); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
    "s.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_V6ONLY,0)\n"
    "s.bind(('::',80)); s.listen(64)\n"
    "print('listening', time.time(), flush=True)\n"
    "while True:\n"
    "    c,_=s.accept(); c.sendall(b'HTTP/1.0 200 OK\\r\\n\\r\\nup'); c.close()\n"
)

SPECS = f"""\
kind: network
name: "@ln"
subnet: 10.232.1.0/24
subnet6: fd42:232:1::/64
---
name: "@db"
image: debian-bookworm-slim
packages: [python3]
network: "@ln"
address: 10.232.1.10
ports: ["127.0.0.1:18241:80", "[::1]:18241:80"]
# Even with it, the machine's root cannot change its link: the namespace is
# the host user namespace's.
security:
  capabilities:
    add: [NET_ADMIN]
files:
  - path: /srv/listen.py
    content: {json.dumps(LISTENER)}
command: [python3, -u, /srv/listen.py]
---
name: "@peer"
image: debian-bookworm-slim
network: "@ln"
command: [sleep, infinity]
"""

# A peer's loop of TCP connects to ADDRESS:80, every 20 ms with a 200 ms
# timeout, each line "time ok|fail"; it ends 3 s after a success that follows
# a failure (or after 180 s).
PEER_LOOP = (
    "import socket,sys,time\n"
    "end=time.time()+180; failed=False; back=None\n"
    "while time.time()<end and (back is None or time.time()<back+3):\n"
    "    t=time.time()\n"
    "    try:\n"
    "        socket.create_connection((sys.argv[1],80),timeout=0.2).close(); ok=True\n"
    "    except OSError:\n"
    "        ok=False; failed=True\n"
    "    if ok and failed and back is None: back=t\n"
    "    print(t, 'ok' if ok else 'fail', flush=True)\n"
    "    time.sleep(0.02)\n"
)


# SIOCSIFHWADDR on eth0, as `ip link set eth0 address` does.
SET_MAC = (
    "import fcntl,socket,struct; s=socket.socket(); "
    "fcntl.ioctl(s,0x8924,struct.pack('16sH6s8x',b'eth0',1,b'\\x02\\x00\\x00\\x00\\x00\\x01'))"
)


def mac_of(host: Host, machine: str) -> str:
    """The MAC address of a machine's eth0."""
    shown = netns_run(host, machine, "cat", "/sys/class/net/eth0/address").stdout
    return shown.strip()


def listening_since(host: Host, machine: str, count: int) -> float:
    """When a LISTENER machine last began to listen, once it has done so count times."""
    log = host.root / f"var/lib/pymachine/machines/{host.prefix}{machine}/console.log"

    def stamps() -> list[float] | None:
        text = log.read_text() if log.exists() else ""
        found = [float(line.split()[-1]) for line in text.splitlines() if "listening" in line]
        return found if len(found) >= count else None

    return wait_until(stamps, f"{machine} listening {count} time(s)", 60, interval=0.05)[-1]


def test_low_port_stable_mac_and_peer_back_within_a_second(net_host: Host) -> None:
    host = net_host
    p = host.prefix
    host.declare(SPECS)
    host.apply()
    # Port 80 in a machine with a user namespace, published on 127.0.0.1 and ::1.
    listening_since(host, "db", 1)
    assert wait_http("http://127.0.0.1:18241/") == "200"
    assert http_get("http://[::1]:18241/") == "200"
    mac = mac_of(host, "db")

    # A hostile root in the machine can neither lower its neighbours' view of
    # it (a new MAC address) nor put the port floor back.
    hostile = host.pymachine("exec", p + "db", "--", "python3", "-c", SET_MAC, check=False)
    assert hostile.returncode != 0 and "Operation not permitted" in hostile.stderr, hostile
    floor = host.pymachine(
        "exec", p + "db", "--", "sh", "-c",
        "echo 1024 > /proc/sys/net/ipv4/ip_unprivileged_port_start", check=False,
    )  # fmt: skip
    assert floor.returncode != 0, floor
    # Nor forge another machine's ARP answers: no raw socket on the link
    # (Docker's default NET_RAW allows one).
    raw = "import socket; socket.socket(socket.AF_PACKET, socket.SOCK_RAW)"
    forged = host.pymachine("exec", p + "db", "--", "python3", "-c", raw, check=False)
    assert forged.returncode != 0 and "Operation not permitted" in forged.stderr, forged
    assert mac_of(host, "db") == mac
    assert (
        netns_run(host, "db", "sysctl", "-n", "net.ipv4.ip_unprivileged_port_start").stdout == "0\n"
    )

    loop = subprocess.Popen(
        [
            "ip", "netns", "exec", netns_of(host, "peer"),
            sys.executable, "-c", PEER_LOOP, "10.232.1.10",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        time.sleep(1)  # the peer reaches db, so it has a neighbour entry for it
        host.pymachine("stop", p + "db")
        host.pymachine("start", p + "db")
        since = listening_since(host, "db", 2)
        out, _ = loop.communicate(timeout=200)
    finally:
        loop.kill()
    lines = [line.split() for line in out.splitlines()]
    assert lines and lines[0][1] == "ok", out[:500]
    failed = [float(t) for t, r in lines if r == "fail"]
    assert failed, "the peer never saw db down"
    back = next(float(t) for t, r in lines if r == "ok" and float(t) > failed[0])
    print(f"peer back {back - since:.3f} s after db listened again")
    assert mac_of(host, "db") == mac  # the same MAC address after the start
    assert back - since < 1.0, (back - since, out[-2000:])
    assert host.pymachine("plan", str(host.specs), check=False).returncode == 0


PORTS = """\
kind: network
name: "@pn"
subnet: 10.232.2.0/24
---
name: "@web"
image: debian-bookworm-slim
packages: [python3]
network: "@pn"
ports: ["127.0.0.1:18243:80", "18244:53/udp"]
command: [python3, -m, http.server, --bind, 0.0.0.0, "80"]
"""


def bound(
    family: socket.AddressFamily, kind: socket.SocketKind, address: str, port: int
) -> socket.socket:
    sock = socket.socket(family, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    if kind == socket.SOCK_STREAM:
        sock.listen(8)
    return sock


def refused(host: Host, port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_held_host_ports_are_refused_and_a_change_of_ports_is_made_live(net_host: Host) -> None:
    host = net_host
    p = host.prefix
    host.declare(PORTS)
    me = f"(pid {os.getpid()})"
    # A host listener on the published address, and a dual-stack UDP one on ::.
    tcp = bound(socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1", 18243)
    udp = bound(socket.AF_INET6, socket.SOCK_DGRAM, "::", 18244)
    with tcp, udp:
        for verb in ("plan", "apply"):
            args = (verb, str(host.specs)) + (("--yes",) if verb == "apply" else ())
            out = host.pymachine(*args, check=False)
            assert out.returncode == 1, out
            assert (
                "machines.yaml:9:9: ports[0]: host port 127.0.0.1:18243/tcp is already in use by"
                in out.stderr
            ), out.stderr
            assert "ports[1]: host port [::]:18244/udp is already in use by" in out.stderr
            assert me in out.stderr
        # Nothing changed: no record, no namespace, no rules.
        assert host.machines() == {}
        assert not Path("/run/netns", netns_of(host, "web")).exists()
        tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
        assert p not in tables
    host.apply()
    first = host.payload("web")
    assert wait_http("http://127.0.0.1:18243/") == "200"

    # A change of ports alone: published in place, the machine not restarted.
    moved = PORTS.replace('"127.0.0.1:18243:80"', '"127.0.0.1:18245:80", "[::1]:18245:80"')
    host.declare(moved)
    applied = host.apply()
    assert "change the ports of" in applied.stderr and "restart" not in applied.stderr, (
        applied.stderr
    )
    assert host.payload("web") == first
    assert http_get("http://127.0.0.1:18245/") == "200"
    assert http_get("http://[::1]:18245/") == "200"
    assert refused(host, 18243)
    assert host.pymachine("plan", str(host.specs), check=False).returncode == 0
    # Pinning the address it has is no change either.
    address = host.machines()["web"]["address"]
    host.declare(moved.replace('network: "@pn"', f'network: "@pn"\naddress: {address}'))
    assert host.pymachine("plan", str(host.specs), check=False).returncode == 0

    # A listener that comes while the machine is stopped keeps its port: the
    # start by name is refused, and leaves no namespace behind.
    host.pymachine("stop", p + "web")
    with bound(socket.AF_INET, socket.SOCK_STREAM, "0.0.0.0", 18245):
        start = host.pymachine("start", p + "web", check=False)
        assert start.returncode == 1 and "cannot publish port 18245/tcp" in start.stderr, start
        assert me in start.stderr
        assert not Path("/run/netns", netns_of(host, "web")).exists()
    host.pymachine("start", p + "web")
    assert wait_http("http://127.0.0.1:18245/") == "200"


NGINX = """\
kind: network
name: "@wn"
subnet: 10.232.3.0/24
subnet6: fd42:232:3::/64
---
name: "@nginx"
image: debian-bookworm-slim
packages: [nginx]
network: "@wn"
ports: ["127.0.0.1:18246:80", "[::1]:18246:80"]
command: [nginx, -g, "daemon off;"]
"""


def test_nginx_with_its_stock_config_serves_port_80_in_a_user_namespace(net_host: Host) -> None:
    host = net_host
    host.declare(NGINX)
    host.apply()
    inspect = json.loads(host.pymachine("inspect", host.prefix + "nginx", "-o", "json").stdout)
    assert inspect["spec"]["security"]["private_users"] is True
    for url in ("http://127.0.0.1:18246/", "http://[::1]:18246/"):
        assert wait_http(url) == "200"
        with urllib.request.urlopen(url, timeout=5) as response:
            assert b"Welcome to nginx" in response.read()
