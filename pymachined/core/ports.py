"""Published ports against the host's own sockets: which host process already
holds a port a machine would publish. Pure.

A port forward takes a host port from everyone: the nft DNAT of an IPv4
forward rewrites connections before any host socket sees them (a listener on
that port would silently lose its clients), and an IPv6 forwarder cannot bind
a port in use. So a published port is refused while another process holds it,
as Docker's ``address already in use``. ``network.port_clashes`` reads the
facts (``/proc/net`` and the processes' descriptors); this module decides.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from pymachined.core.parsers import Socket
from pymachined.core.spec import Port


@dataclass(frozen=True)
class Process:
    """A host process that holds a socket."""

    pid: int
    name: str  # its comm


def covers(port: Port, socket: Socket) -> bool:
    """Whether a host socket holds (part of) what port publishes.

    An IPv4 forward without an address (or on 0.0.0.0) takes the port on every
    local IPv4 address, 127.0.0.1 included; one on an address takes it there.
    An IPv6 forward binds its address (``::`` without one). A socket on ``::``
    is taken as dual-stack (the kernel's default, and /proc does not tell
    IPV6_V6ONLY), so it holds the IPv4 port too, as Docker finds."""
    if socket.protocol != port.protocol.value or socket.port != port.host:
        return False
    wanted = port.host_ip
    held = socket.address
    if isinstance(held, ipaddress.IPv6Address) and held.ipv4_mapped is not None:
        held = held.ipv4_mapped
    if wanted is None or isinstance(wanted, ipaddress.IPv4Address):
        if isinstance(held, ipaddress.IPv4Address):
            everywhere = wanted is None or wanted.is_unspecified
            return everywhere or held.is_unspecified or held == wanted
        if held.is_unspecified:
            return True
    if isinstance(wanted, ipaddress.IPv4Address) or not isinstance(held, ipaddress.IPv6Address):
        return False
    return wanted is None or wanted.is_unspecified or held.is_unspecified or held == wanted


def candidates(ports: Sequence[Port], sockets: Iterable[Socket]) -> list[tuple[int, Socket]]:
    """Each (index in ports, host socket) where a socket holds a port."""
    held = list(sockets)
    return [(i, s) for i, port in enumerate(ports) for s in held if covers(port, s)]


def _where(socket: Socket) -> str:
    address = socket.address
    shown = f"[{address}]" if isinstance(address, ipaddress.IPv6Address) else str(address)
    return f"{shown}:{socket.port}/{socket.protocol}"


def clashes(
    found: Iterable[tuple[int, Socket]],
    owners: Mapping[int, Sequence[Process]],
    own: Collection[int] = (),
) -> list[tuple[int, str]]:
    """Each (index in ports, message) of a port another process holds. A
    socket held only by the machine's own forwarders (their pids, ``own``)
    is no clash; one whose holder cannot be found (it went away, or lives in
    a process pymachine cannot see) is named by itself."""
    out: list[tuple[int, str]] = []
    for index, socket in found:
        holders = owners.get(socket.inode, ())
        if holders and all(p.pid in own for p in holders):
            continue
        others = [p for p in holders if p.pid not in own]
        who = ", ".join(f"{p.name} (pid {p.pid})" for p in others[:3]) or "another process"
        out.append((index, f"host port {_where(socket)} is already in use by {who}"))
    return out
