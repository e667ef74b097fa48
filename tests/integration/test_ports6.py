"""Published ports over IPv6: the kernel's DNAT to a machine's IPv6 address,
where the machine sees the client's own address, and ::1 (the redirect for
TCP, the forwarder for UDP).

The client is a network namespace this test makes, on a veth pair to the host
(this kernel has no dummy interfaces): nothing leaves the host."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from tests.integration.test_network import net_host, netns_run, udp_ask  # noqa: F401
from tests.waiting import wait_until

if TYPE_CHECKING:
    from tests.integration.conftest import Host

pytestmark = pytest.mark.integration

HOST6 = "fd42:233:fe::1"  # the host's end of the client's veth
CLIENT6 = "fd42:233:fe::2"
GATEWAY6 = "fd42:233:2::1"
MACHINE6 = "fd42:233:2::a"

# Answers each TCP client and each datagram with the address it came from.
SERVER = """\
import socket, threading
def tcp():
    s = socket.socket(socket.AF_INET6)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", 8080)); s.listen()
    while True:
        c, peer = s.accept(); c.sendall(peer[0].encode()); c.close()
threading.Thread(target=tcp, daemon=True).start()
u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
u.bind(("::", 8080))
while True:
    data, peer = u.recvfrom(100); u.sendto(peer[0].encode(), peer)
"""

SPECS = f"""\
kind: network
name: "@v6"
subnet: 10.233.2.0/24
subnet6: fd42:233:2::/64
nat: false
---
name: "@seer"
image: debian-bookworm-slim
packages: [python3]
network: "@v6"
address: 10.233.2.10
ports: ["18254:8080", "18254:8080/udp", "[::1]:18255:8080"]
command: [python3, -c, {json.dumps(f"exec({SERVER!r})")}]
"""


@pytest.fixture
def client(net_host: Host) -> Iterator[str]:  # noqa: F811
    """A namespace with CLIENT6, routed to the host's HOST6 over a veth pair."""
    ns, veth = f"{net_host.prefix}c6", f"{net_host.prefix}c6h"
    for argv in (
        ["ip", "netns", "add", ns],
        ["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns],
        ["ip", "addr", "add", f"{HOST6}/64", "dev", veth, "nodad"],
        ["ip", "link", "set", veth, "up"],
        ["ip", "-n", ns, "link", "set", "lo", "up"],
        ["ip", "-n", ns, "addr", "add", f"{CLIENT6}/64", "dev", "eth0", "nodad"],
        ["ip", "-n", ns, "link", "set", "eth0", "up"],
    ):
        subprocess.run(argv, check=True)
    yield ns
    subprocess.run(["ip", "link", "del", veth], check=False)
    subprocess.run(["ip", "netns", "del", ns], check=False)


def ask_in(ns: str, protocol: str, address: str, port: int) -> str:
    """What the server answered a client in namespace ns (or FAIL and why)."""
    code = (
        "import socket,sys\n"
        f"kind = socket.SOCK_STREAM if {protocol!r} == 'tcp' else socket.SOCK_DGRAM\n"
        "s = socket.socket(socket.AF_INET6, kind); s.settimeout(1)\n"
        "for _ in range(10):\n"
        "    try:\n"
        f"        s.connect(({address!r}, {port})); s.send(b'hi'); print(s.recv(100).decode())\n"
        "        sys.exit(0)\n"
        "    except OSError as e:\n"
        "        err = e\n"
        "print('FAIL', err)\n"
    )
    done = subprocess.run(
        ["ip", "netns", "exec", ns, "python3", "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return done.stdout.strip()


def tcp_answer(address: str, port: int) -> str | None:
    try:
        with socket.create_connection((address, port), timeout=2) as sock:
            return sock.recv(100).decode() or None
    except OSError:
        return None


def test_a_machine_sees_its_ipv6_clients_and_loopback6_reaches_it(
    net_host: Host,  # noqa: F811
    client: str,
) -> None:
    host = net_host
    host.declare(SPECS)
    host.apply()
    addresses = netns_run(host, "seer", "ip", "-br", "addr", "show", "eth0").stdout
    assert f"{MACHINE6}/64" in addresses
    rules = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True).stdout
    assert f"tcp dport 18254 dnat ip6 to [{MACHINE6}]:8080" in rules
    assert f"udp dport 18254 dnat ip6 to [{MACHINE6}]:8080" in rules
    assert "dport 18255 dnat ip6" not in rules  # ::1 only: the forwarder's alone

    # ::1: TCP through the connect redirect (test_sockredirect), UDP through
    # the forwarder; either way the host connects from its gateway address.
    answer = wait_until(lambda: tcp_answer("::1", 18255), "the forwarder on [::1]:18255", 60)
    assert answer == GATEWAY6
    assert tcp_answer("::1", 18254) == GATEWAY6  # every host address includes ::1
    assert udp_ask(socket.AF_INET6, "::1", 18254, b"hi") == GATEWAY6.encode()
    # IPv4 is still DNATed to the machine's IPv4 address.
    assert tcp_answer("127.0.0.1", 18254) == "::ffff:10.233.2.1"

    # A client on another host (here a namespace on a veth) reaching the host's
    # IPv6 address: DNAT in the kernel, and the machine sees the client.
    assert ask_in(client, "tcp", HOST6, 18254) == CLIENT6
    assert ask_in(client, "udp", HOST6, 18254) == CLIENT6
    # The host itself, on its own non-loopback address: DNAT in output.
    assert tcp_answer(HOST6, 18254) == HOST6
