"""The [::1] connect redirect, for real: the connect6 program at the root of
the unified cgroup tree sends a host client of [::1]:PORT straight to the
machine's IPv6 address (the client's socket is connected to the machine, and
the machine sees the client's own address and port), only while the relay
holds the port; a process in a machine keeps its own loopback; a host where
bpf(2) cannot attach warns once and the relay carries ::1 as before."""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import socket
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import pytest

from pymachined import network, sockredirect
from pymachined.core import sockprog
from pymachined.core.layout import Layout
from pymachined.core.sockprog import Target
from tests.integration.test_network import net_host, netns_run  # noqa: F401
from tests.waiting import wait_until

if TYPE_CHECKING:
    from tests.integration.conftest import Host

pytestmark = pytest.mark.integration

GATEWAY6 = "fd42:234:6::1"
MACHINE6 = "fd42:234:6::b"
PORT = 18263  # every host address (so ::1 too)
LOOPBACK_PORT = 18264  # [::1] alone
STALE_PORT = 18265  # an entry of a root that is gone

# Answers each TCP client with the address and port it came from.
SERVER = """\
import socket
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", 8080)); s.listen()
while True:
    c, peer = s.accept(); c.sendall(f"{peer[0]} {peer[1]}".encode()); c.close()
"""

SPECS = f"""\
kind: network
name: "@root6"
subnet: 10.234.6.0/24
subnet6: fd42:234:6::/64
nat: false
---
name: "@seen"
image: debian-bookworm-slim
packages: [python3]
network: "@root6"
address: 10.234.6.11
ports: ["{PORT}:8080", "[::1]:{LOOPBACK_PORT}:8080", "{PORT}:8080/udp"]
command: [python3, -c, {json.dumps(f"exec({SERVER!r})")}]
"""


def owner(host: Host) -> bytes:
    return sockprog.owner_tag(Layout(PurePosixPath(host.root)).scope)


def connect(port: int) -> tuple[tuple[str, int], tuple[str, int], str]:
    """A host client of [::1]:port: where its socket is connected, its own
    address and port, and what the machine saw."""
    with socket.create_connection(("::1", port), timeout=5) as sock:
        peer = sock.getpeername()[:2]
        own = sock.getsockname()[:2]
        return peer, own, sock.recv(100).decode()


def answered(port: int) -> tuple[tuple[str, int], tuple[str, int], str] | None:
    try:
        found = connect(port)
    except OSError:
        return None
    return found if found[2] else None


@pytest.fixture
def group() -> Path:
    found = network.redirect_group()
    assert found is not None, "this host has a unified cgroup tree (v2 or hybrid)"
    assert os.environ.get(network.REDIRECT_ENV) is None
    return found


def test_by_default_the_redirect_is_at_the_unified_root_while_relays_hold_its_ports(
    net_host: Host,  # noqa: F811
    group: Path,
) -> None:
    host = net_host
    assert group == sockredirect.unified_root()
    # An entry left by a root that ended with its relays: nothing listens there.
    stale = Target(ipaddress.IPv6Address("fd42:234:7::9"), 80, sockprog.owner_tag("gone"))
    sockredirect.sync(group, stale.owner, {STALE_PORT: stale}, {STALE_PORT})
    assert sockredirect.held(group)[STALE_PORT] == stale

    host.declare(SPECS)
    host.apply()
    mine = owner(host)
    entries = sockredirect.held(group)
    assert entries[PORT] == Target(ipaddress.IPv6Address(MACHINE6), 8080, mine)
    assert entries[LOOPBACK_PORT] == Target(ipaddress.IPv6Address(MACHINE6), 8080, mine)
    assert STALE_PORT not in entries  # dropped by the apply's sync
    assert [a.name for a in sockredirect.ours(group)] == [sockprog.NAME]

    # The client is connected to the machine itself, not to a relay on ::1,
    # and the machine sees the client's own address and port.
    for port in (PORT, LOOPBACK_PORT):
        found = wait_until(functools.partial(answered, port), f"[::1]:{port}", 60)
        peer, own, seen = found
        assert peer == (MACHINE6, 8080)
        assert own[0] == GATEWAY6  # the host's address on the bridge, as nft's DNAT gives
        assert seen == f"{own[0]} {own[1]}"

    # In the machine, ::1 is its own loopback: nothing there is redirected.
    probe = (
        "import socket\n"
        "try:\n"
        f"    socket.create_connection(('::1', {PORT}), timeout=2); print('connected')\n"
        "except OSError as e:\n"
        "    print(type(e).__name__)\n"
    )
    inside = netns_run(host, "seen", "python3", "-c", probe).stdout.strip()
    assert inside == "ConnectionRefusedError"

    # A stop ends the relays and the entries with them.
    host.pymachine("stop", host.prefix + "seen", "--yes")
    left = sockredirect.held(group)
    assert not any(t.owner == mine for t in left.values())
    if not left:  # no other root's machine publishes on ::1: no program runs
        assert sockredirect.ours(group) == []
    with pytest.raises(OSError):
        connect(PORT)


def test_where_the_redirect_cannot_attach_apply_warns_once_and_the_relay_carries_it(
    net_host: Host,  # noqa: F811
    tmp_path: Path,
) -> None:
    host = net_host
    host.declare(SPECS)
    nowhere = str(tmp_path / "not-a-cgroup")
    Path(nowhere).mkdir()
    done = host.apply(env={network.REDIRECT_ENV: nowhere})
    warnings = [line for line in done.stderr.splitlines() if "connect redirect" in line]
    assert len(warnings) == 1, done.stderr
    assert warnings[0].startswith(f"warning: the [::1] connect redirect on {nowhere} is not in use")
    assert "relay ::1 instead" in warnings[0]
    real = sockredirect.unified_root()
    assert real is not None
    assert not any(t.owner == owner(host) for t in sockredirect.held(real).values())

    found = wait_until(lambda: answered(PORT), "the relay on [::1]", 60)
    peer, _own, seen = found
    assert peer == ("::1", PORT)  # connected to the relay
    assert seen.split()[0] == GATEWAY6  # which connects from the gateway
