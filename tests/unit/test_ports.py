"""Published ports against the host's sockets: /proc/net lines as the kernel
writes them, and which of them hold a port a machine would publish."""

from __future__ import annotations

import ipaddress
import sys

import pytest

from pymachined.core import ports
from pymachined.core.parsers import Socket, parse_proc_net
from pymachined.core.spec import Machine, Port

HEADER = (
    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt"
    "   uid  timeout inode\n"
)


def word(address: str) -> str:
    """An address as /proc/net prints it: each 32-bit word in the host's order."""
    raw = ipaddress.ip_address(address).packed
    return "".join(
        f"{int.from_bytes(raw[i : i + 4], sys.byteorder):08X}" for i in range(0, len(raw), 4)
    )


def line(address: str, port: int, state: str, inode: int) -> str:
    return (
        f"   0: {word(address)}:{port:04X} {word('0.0.0.0' if '.' in address else '::')}:0000 "
        f"{state} 00000000:00000000 00:00000000 00000000     0        0 {inode} 1 0\n"
    )


def test_proc_net_gives_listening_tcp_and_unconnected_udp_sockets() -> None:
    tcp = HEADER + line("127.0.0.1", 18241, "0A", 11) + line("10.0.0.2", 40000, "01", 12)
    assert parse_proc_net(tcp, "tcp") == [
        Socket("tcp", ipaddress.IPv4Address("127.0.0.1"), 18241, 11)
    ]
    tcp6 = HEADER + line("::", 18242, "0A", 21) + line("fd42:232::1", 80, "0A", 22)
    assert [(str(s.address), s.port, s.inode) for s in parse_proc_net(tcp6, "tcp")] == [
        ("::", 18242, 21),
        ("fd42:232::1", 80, 22),
    ]
    udp = HEADER + line("0.0.0.0", 5353, "07", 31) + line("127.0.0.1", 5000, "01", 32)
    assert parse_proc_net(udp, "udp") == [Socket("udp", ipaddress.IPv4Address("0.0.0.0"), 5353, 31)]
    assert parse_proc_net(HEADER + "   0: garbage\n" + "x" * 10, "tcp") == []


def test_proc_net_of_this_host_is_read_whole() -> None:
    with open("/proc/net/tcp") as handle:  # a real file, in whatever order this host has
        text = handle.read()
    listening = sum(1 for row in text.splitlines()[1:] if row.split()[3] == "0A")
    assert len(parse_proc_net(text, "tcp")) == listening


def sock(address: str, port: int = 18241, protocol: str = "tcp", inode: int = 1) -> Socket:
    return Socket(protocol, ipaddress.ip_address(address), port, inode)


def port(text: str) -> Port:
    machine = Machine.model_validate(
        {"name": "web", "command": ["true"], "network": "n", "ports": [text]}
    )
    return machine.ports[0]


@pytest.mark.parametrize(
    ("published", "held", "clash"),
    [
        ("127.0.0.1:18241:80", "127.0.0.1", True),
        ("127.0.0.1:18241:80", "0.0.0.0", True),  # a wildcard bind covers it
        ("127.0.0.1:18241:80", "::", True),  # dual-stack by default
        ("127.0.0.1:18241:80", "::ffff:127.0.0.1", True),
        ("127.0.0.1:18241:80", "127.0.0.2", False),
        ("127.0.0.1:18241:80", "::1", False),
        ("18241:80", "127.0.0.1", True),  # DNAT takes every local address
        ("18241:80", "10.1.2.3", True),
        ("18241:80", "::1", True),  # and its forwarder binds ::
        ("0.0.0.0:18241:80", "127.0.0.1", True),
        ("0.0.0.0:18241:80", "::1", False),  # IPv4 only
        ("[::1]:18241:80", "::1", True),
        ("[::1]:18241:80", "::", True),
        ("[::1]:18241:80", "0.0.0.0", False),
        ("[::1]:18241:80", "fd42:232::1", False),
        ("[::]:18241:80", "fd42:232::1", True),
        ("[::]:18241:80", "127.0.0.1", False),
        ("127.0.0.1:18242:80", "127.0.0.1", False),  # another port
    ],
)
def test_a_socket_covers_a_published_port(published: str, held: str, clash: bool) -> None:
    assert ports.covers(port(published), sock(held)) is clash


def test_protocols_are_apart() -> None:
    assert not ports.covers(port("18241:53/udp"), sock("0.0.0.0"))
    assert ports.covers(port("18241:53/udp"), sock("0.0.0.0", protocol="udp"))
    assert not ports.covers(port("18241:53"), sock("0.0.0.0", protocol="udp"))


def test_clashes_name_the_holder_but_not_the_machines_own_forwarders() -> None:
    published = [port("127.0.0.1:18241:80"), port("[::1]:18241:80"), port("18243:53/udp")]
    sockets = [sock("0.0.0.0", inode=5), sock("::1", inode=6), sock("::", 18243, "udp", 7)]
    found = ports.candidates(published, sockets)
    assert [(i, s.inode) for i, s in found] == [(0, 5), (1, 6), (2, 7)]
    own = ports.Process(900, "python3")  # the machine's forwarder
    theirs = ports.Process(901, "python3")  # another machine's
    nginx = ports.Process(77, "nginx")
    owners = {5: [nginx], 6: [own], 7: [theirs]}
    assert ports.clashes(found, owners, own={900}) == [
        (0, "host port 0.0.0.0:18241/tcp is already in use by nginx (pid 77)"),
        (2, "host port [::]:18243/udp is already in use by python3 (pid 901)"),
    ]
    # Its own forwarder and another process at once: a clash, naming the other.
    assert ports.clashes(found[1:2], {6: [own, nginx]}, own={900}) == [
        (1, "host port [::1]:18241/tcp is already in use by nginx (pid 77)")
    ]
    # Held by nobody pymachine can see (gone meanwhile, or hidden): still a clash.
    assert ports.clashes(found[:1], {}, own={900}) == [
        (0, "host port 0.0.0.0:18241/tcp is already in use by another process")
    ]
