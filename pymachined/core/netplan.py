"""Networks on paper: interface names, addresses and the nftables ruleset. Pure.

Everything here is computed from names, specs and records; ``network.py`` is
the edge that makes it real with pyroute2 and ``nft``.

Host-wide names (bridges, host-side veths, the nft table) carry a *scope*: empty
for the host's real root, a short hash of the root directory otherwise, so a
pymachine under ``--root`` (a test, a trial run) never meets the host's own.
Every interface name fits the kernel's 15 characters whatever the spec's name.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import PurePath

from pymachined.core.layout import Layout
from pymachined.core.spec import Network, Port, Protocol
from pymachined.errors import PymachineError

IFNAMSIZ = 15
MACHINE_IFNAME = "eth0"
"""The machine's side of its veth pair, as users of other container tools expect."""

Address = ipaddress.IPv4Address


def scope(layout: Layout) -> str:
    """The scope of host-wide names: '' for the real root, else a hash of the root."""
    return layout.scope


def _short(prefix: str, *parts: str) -> str:
    digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()
    return (prefix + digest)[:IFNAMSIZ]


def bridge_name(layout: Layout, network: Network) -> str:
    """The bridge of a network: its declared name, else ``pmbr-`` and a hash."""
    return network.bridge or _short("pmbr-", scope(layout), network.name)


def veth_name(layout: Layout, machine: str) -> str:
    """The host side of a machine's veth pair: ``pmve-`` and a hash of its name."""
    return _short("pmve-", scope(layout), machine)


def netns_name(layout: Layout, machine: str) -> str:
    """The named network namespace (under /run/netns) a machine runs in."""
    return layout.netns_name(machine)


def mac_address(layout: Layout, network: str, machine: str) -> str:
    """The MAC address of a machine's eth0 on a network: from a hash of its
    name, the network's and the scope, as nspawn derives its veths' own, so
    that it is the same at every start and peers' neighbour entries for the
    machine stay right. Locally administered, unicast."""
    digest = hashlib.sha256("\0".join(("mac", scope(layout), network, machine)).encode()).digest()
    first = (digest[0] & 0xFE) | 0x02
    return ":".join(f"{b:02x}" for b in (first, *digest[1:6]))


NAMESPACE_SYSCTLS = (
    # Every port may be bound: the namespace belongs to the host's user
    # namespace, where a machine's root holds no capability, so without this
    # a server in a machine with a user namespace cannot bind port 80 (Docker
    # sets the same in each container's namespace).
    ("net/ipv4/ip_unprivileged_port_start", "0"),
)


def interface_sysctls(ifname: str) -> tuple[tuple[str, str], ...]:
    """The sysctls (paths under /proc/sys) set on a machine's interface in its
    namespace before it goes up: the kernel announces the machine (a
    gratuitous ARP, an unsolicited neighbour advertisement) whenever the
    link's address changes."""
    return (
        (f"net/ipv4/conf/{ifname}/arp_notify", "1"),
        (f"net/ipv6/conf/{ifname}/ndisc_notify", "1"),
    )


def _mac_bytes(mac: str) -> bytes:
    return bytes(int(part, 16) for part in mac.split(":"))


def gratuitous_arp(mac: str, address: Address) -> bytes:
    """An Ethernet frame that announces address at mac to the whole link: an
    ARP request for the address itself, as the kernel's own announcements are."""
    sender = _mac_bytes(mac)
    ip = address.packed
    ethernet = b"\xff" * 6 + sender + b"\x08\x06"
    arp = b"\x00\x01\x08\x00\x06\x04\x00\x01" + sender + ip + b"\x00" * 6 + ip
    return ethernet + arp


def neighbour_advertisement(mac: str, address: ipaddress.IPv6Address) -> bytes:
    """An unsolicited ICMPv6 neighbour advertisement of address at mac (the
    override flag set, so peers replace what they had; the kernel fills in
    the checksum of a raw ICMPv6 socket)."""
    header = b"\x88\x00\x00\x00" + b"\x20\x00\x00\x00"  # type 136, code 0; flag O
    option = b"\x02\x01" + _mac_bytes(mac)  # the target's link-layer address
    return header + address.packed + option


def table_name(layout: Layout) -> str:
    """The nft table pymachine owns (``inet`` family)."""
    tag = scope(layout)
    return f"pymachine-{tag}" if tag else "pymachine"


def host_addresses(network: Network) -> Iterator[Address]:
    """Every address a machine may get on a network, lowest first: its hosts but
    the gateway."""
    gateway = network.gateway_address
    return (a for a in network.subnet.hosts() if a != gateway)


def _assignable(network: Network, address: Address) -> bool:
    subnet = network.subnet
    return address in subnet and address not in (
        subnet.network_address,
        subnet.broadcast_address,
        network.gateway_address,
    )


def allocate(
    network: Network,
    taken: Iterable[Address],
    *,
    wanted: Address | None = None,
    previous: Address | None = None,
) -> Address:
    """A machine's address: the declared one, else the one it had if still free,
    else the lowest free host address."""
    if wanted is not None:
        return wanted
    busy = set(taken)
    if previous is not None and previous not in busy and _assignable(network, previous):
        return previous
    for candidate in host_addresses(network):
        if candidate not in busy:
            return candidate
    raise PymachineError(
        f"network {network.name} has no free address left in {network.subnet}",
        hint="use a larger subnet, or remove machines from it",
    )


def address6(network: Network, address: Address) -> ipaddress.IPv6Address | None:
    """A machine's IPv6 address: the same offset in subnet6 as in subnet."""
    if network.subnet6 is None:
        return None
    offset = int(address) - int(network.subnet.network_address)
    return network.subnet6.network_address + offset


def gateway6(network: Network) -> ipaddress.IPv6Address | None:
    """The bridge's IPv6 address: the gateway's offset in subnet6, as a
    machine's is its address's (so the two never clash)."""
    return address6(network, network.gateway_address)


@dataclass(frozen=True)
class Bridge:
    """A network's bridge, as the ruleset needs it."""

    network: str
    bridge: str
    subnet: ipaddress.IPv4Network
    subnet6: ipaddress.IPv6Network | None
    nat: bool
    resolver: tuple[str, ...] = ()  # the gateway addresses its name resolver listens on


@dataclass(frozen=True)
class Forward:
    """A host port forwarded by the kernel (DNAT) to a machine's address, IPv4
    or IPv6 (both addresses of one family)."""

    machine: str
    bridge: str
    protocol: Protocol
    host_port: int
    address: Address | ipaddress.IPv6Address
    port: int
    host_ip: Address | ipaddress.IPv6Address | None = None  # None: every local address


def ipv4_forwards(
    machine: str, bridge: str, address: Address, ports: Iterable[Port]
) -> list[Forward]:
    """A machine's port forwards over IPv4 that nft makes: those on every host
    address or on an IPv4 one."""
    return [
        _forward(machine, bridge, port, address, _specific(port.host_ip))
        for port in ports
        if port.host_ip is None or isinstance(port.host_ip, ipaddress.IPv4Address)
    ]


def ipv6_forwards(
    machine: str, bridge: str, address: ipaddress.IPv6Address, ports: Iterable[Port]
) -> list[Forward]:
    """A machine's port forwards over IPv6 that nft makes, to its IPv6 address:
    those on every host address or on an IPv6 one but ``::1``. The kernel
    cannot DNAT ``::1`` to another host (IPv6 has no ``route_localnet``: such a
    packet is dropped as a martian), so ``::1`` is the forwarders' work alone."""
    forwards = []
    for port in ports:
        host_ip = port.host_ip
        if isinstance(host_ip, ipaddress.IPv4Address) or (
            host_ip is not None and host_ip.is_loopback
        ):
            continue
        specific = None if host_ip is None or host_ip.is_unspecified else host_ip
        forwards.append(_forward(machine, bridge, port, address, specific))
    return forwards


def _forward(
    machine: str,
    bridge: str,
    port: Port,
    address: Address | ipaddress.IPv6Address,
    host_ip: Address | ipaddress.IPv6Address | None,
) -> Forward:
    return Forward(
        machine=machine,
        bridge=bridge,
        protocol=port.protocol,
        host_port=port.host,
        address=address,
        port=port.machine,
        host_ip=host_ip,
    )


def _specific(host_ip: Address | ipaddress.IPv6Address | None) -> ipaddress.IPv4Address | None:
    """An IPv4 host address to match, or None for every one (0.0.0.0 included,
    as in docker's ports)."""
    if isinstance(host_ip, ipaddress.IPv4Address) and not host_ip.is_unspecified:
        return host_ip
    return None


def _quote(name: str) -> str:
    return '"' + name + '"'


def _dnat(forward: Forward) -> str:
    if isinstance(forward.address, ipaddress.IPv6Address):
        match = (
            f"ip6 daddr {forward.host_ip}"
            if forward.host_ip is not None
            else "meta nfproto ipv6 fib daddr type local ip6 daddr != ::1"
        )
        target = f"ip6 to [{forward.address}]:{forward.port}"
    else:
        match = (
            f"ip daddr {forward.host_ip}"
            if forward.host_ip is not None
            else "meta nfproto ipv4 fib daddr type local"
        )
        target = f"ip to {forward.address}:{forward.port}"
    proto = forward.protocol.value
    return (
        f"{match} {proto} dport {forward.host_port} dnat {target} comment {_quote(forward.machine)}"
    )


def _resolver_chain(bridges: Sequence[Bridge]) -> list[str]:
    """A network's resolver answers its own bridge (and the host) only: DNS to
    its gateway addresses from any other interface (another network's bridge,
    which the forward chain cannot stop, since the gateway is a local address)
    is dropped, so no machine learns another network's names."""
    lines = []
    for b in bridges:
        for address in b.resolver:
            family = "ip6" if ":" in address else "ip"
            lines.append(
                f'\t\tiifname != {{ "lo", {_quote(b.bridge)} }} {family} daddr {address} '
                "meta l4proto { tcp, udp } th dport 53 drop"
            )
    if not lines:
        return []
    return [
        "\tchain resolvers {",
        "\t\ttype filter hook prerouting priority raw; policy accept;",
        *lines,
        "\t}",
    ]


def ruleset(table: str, bridges: Sequence[Bridge], forwards: Sequence[Forward]) -> str:
    """The whole nft script for pymachine's table, run as one transaction: it
    creates the table (a no-op if present), deletes it and, if there is anything
    to say, makes it again, so the rules are replaced atomically."""
    head = f"table inet {table}\ndelete table inet {table}\n"
    if not bridges and not forwards:
        return head
    lines = [f"table inet {table} {{"]
    if bridges:
        # route_localnet (for DNAT of published ports on 127.0.0.1) would let a
        # machine that crafts a frame for 127.0.0.1 reach the host's loopback-only
        # services (CVE-2020-8558): drop such packets from every bridge at raw
        # priority, before conntrack and NAT. Replies of forwarded connections
        # are addressed to the bridge's gateway, never to 127.0.0.0/8.
        lines += [
            "\tchain loopback {",
            "\t\ttype filter hook prerouting priority raw; policy accept;",
        ]
        for b in bridges:
            br = _quote(b.bridge)
            lines.append(f"\t\tiifname {br} ip daddr 127.0.0.0/8 drop")
            lines.append(f"\t\tiifname {br} ip6 daddr ::1 drop")
        lines.append("\t}")
        lines += _resolver_chain(bridges)
    lines += [
        "\tchain prerouting {",
        "\t\ttype nat hook prerouting priority dstnat; policy accept;",
    ]
    lines += [f"\t\t{_dnat(f)}" for f in forwards]
    lines += ["\t}", "\tchain output {", "\t\ttype nat hook output priority -100; policy accept;"]
    lines += [f"\t\t{_dnat(f)}" for f in forwards]
    lines += [
        "\t}",
        "\tchain postrouting {",
        "\t\ttype nat hook postrouting priority srcnat; policy accept;",
    ]
    for b in bridges:
        br = _quote(b.bridge)
        # Forwards from the host's loopback reach the machine from 127.0.0.1,
        # which it would answer itself: give them the bridge's address.
        lines.append(f"\t\toifname {br} ip saddr 127.0.0.0/8 masquerade")
        # A machine reaching a port forward of its own network (hairpin): the
        # server would answer it directly, from an address it did not call.
        lines.append(f"\t\toifname {br} ip saddr {b.subnet} ct status dnat masquerade")
        if b.subnet6 is not None:
            lines.append(f"\t\toifname {br} ip6 saddr {b.subnet6} ct status dnat masquerade")
        if b.nat:
            lines.append(f"\t\tip saddr {b.subnet} oifname != {br} masquerade")
            if b.subnet6 is not None:
                lines.append(f"\t\tip6 saddr {b.subnet6} oifname != {br} masquerade")
    lines += [
        "\t}",
        "\tchain forward {",
        "\t\ttype filter hook forward priority filter; policy accept;",
    ]
    if len(bridges) > 1:
        # Published ports are open to every network, as to any other client.
        lines.append("\t\tct status dnat accept")
    for a in bridges:
        for b in bridges:
            if a.bridge != b.bridge:
                lines.append(f"\t\tiifname {_quote(a.bridge)} oifname {_quote(b.bridge)} drop")
    lines += ["\t}", "}"]
    return head + "\n".join(lines) + "\n"


def nft_apply_argv(path: PurePath) -> list[str]:
    """nft reading a script file (one transaction)."""
    return ["nft", "-f", str(path)]


def nft_list_argv(table: str) -> list[str]:
    """nft printing pymachine's table."""
    return ["nft", "list", "table", "inet", table]
