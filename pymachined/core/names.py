"""Names on declared networks, on paper: the hosts file each network's resolver
answers from, the resolv.conf its machines get, the resolver's files. Pure.

Each declared network has one resolver (dnsmasq) on the host, listening only on
the network's gateway addresses; ``pymachined/names.py`` is the edge that keeps
it running and its hosts file current.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import PurePosixPath

from pymachined.core.layout import Layout
from pymachined.core.netplan import address6, gateway6, table_name
from pymachined.core.spec import Network

RESOLV_CONF = "/etc/resolv.conf"


@dataclass(frozen=True)
class Entry:
    """A machine on a network, as its peers resolve it."""

    name: str
    address: ipaddress.IPv4Address
    address6: ipaddress.IPv6Address | None = None
    hostname: str | None = None


def entry(
    network: Network, name: str, address: ipaddress.IPv4Address, hostname: str | None
) -> Entry:
    """A machine's entry on a network: its IPv4 address and, where the network
    has IPv6, the one its veth gets beside it."""
    return Entry(name, address, address6(network, address), hostname)


def hosts_text(network: str, entries: Iterable[Entry]) -> str:
    """The hosts file of a network's resolver: one line an address, the machine's
    name then its hostname (when it has one, and it is another), by name."""
    lines = [f"# pymachine: the machines on network {network}"]
    for item in sorted(entries, key=lambda e: (e.name, e.address)):
        names = item.name if item.hostname in (None, item.name) else f"{item.name} {item.hostname}"
        lines.append(f"{item.address} {names}")
        if item.address6 is not None:
            lines.append(f"{item.address6} {names}")
    return "\n".join(lines) + "\n"


def listen_addresses(network: Network) -> list[str]:
    """Where a network's resolver listens: its gateway addresses, and nowhere else."""
    out = [str(network.gateway_address)]
    six = gateway6(network)
    if six is not None:
        out.append(str(six))
    return out


def resolv_conf_text(network: Network) -> str:
    """The /etc/resolv.conf of a machine on a network: its resolver, on the gateway."""
    lines = [f"# pymachine: the resolver of network {network.name}"]
    lines += [f"nameserver {address}" for address in listen_addresses(network)]
    return "\n".join(lines) + "\n"


def names_base(layout: Layout) -> PurePosixPath:
    """Where the resolvers' files are: ``/run/pymachine/names`` for the real root,
    ``/run/pymachine-SCOPE/names`` otherwise. Host-wide, as the bridges are,
    since a resolver drops to ``nobody``, who must reach its hosts file: a
    root under a private directory (a test's) would hide it."""
    return PurePosixPath("/run") / table_name(layout) / "names"


def names_dir(layout: Layout, network: str) -> PurePosixPath:
    """One network's resolver files: ``hosts.d/`` (the hosts file it watches),
    ``upstream.conf``, ``pid`` and ``resolver.log``."""
    return names_base(layout) / network


def resolver_unit(network: str) -> str:
    """The transient unit a resolver runs as under systemd; the dot keeps it
    apart from every machine's ``pymachine-NAME.service`` (names have none)."""
    return f"pymachine-names.{network}.service"
