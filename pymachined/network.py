"""Networks made real: bridges, network namespaces, veth pairs, addresses,
routes, the nft table and the IPv6 port forwarders.

The edge of networking; names, addresses and rule text come from the pure
``netplan``. pyroute2 is imported inside the functions that need it, so the
CLI stays light. Every bridge and host-side veth pymachine makes carries an
interface alias (``pymachine:<scope>:<name>``); nothing without it is deleted.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pymachined import files, names, procs, run, sockredirect
from pymachined.core import netplan, parsers, ports, sockprog
from pymachined.core.layout import Layout
from pymachined.core.names import listen_addresses
from pymachined.core.netplan import MACHINE_IFNAME
from pymachined.core.records import MachineRecord, NetworkRecord
from pymachined.core.spec import Machine, Network, Protocol
from pymachined.errors import PymachineError
from pymachined.state import StateStore

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
IFA_F_NODAD = 0x02  # an IPv6 address usable at once, without duplicate detection
BR_STATE_FORWARDING = 3  # a bridge port's state once it forwards (linux/if_bridge.h)
ANNOUNCE_WAIT = 2.0  # seconds a new veth may take to become a forwarding bridge port


def _marker(layout: Layout, name: str) -> str:
    return f"pymachine:{netplan.scope(layout) or 'host'}:{name}"


def link_exists(ifname: str) -> bool:
    """Whether the host has an interface of that name."""
    return Path("/sys/class/net", ifname).exists()


def machine_traffic(layout: Layout, machine: str) -> tuple[int, int] | None:
    """Bytes a machine on a declared network has received and sent, read from
    the host side of its veth pair (what the host sends, the machine
    receives); None for a machine without one (network host or none)."""
    statistics = Path("/sys/class/net") / netplan.veth_name(layout, machine) / "statistics"
    try:
        received = int((statistics / "tx_bytes").read_text())
        sent = int((statistics / "rx_bytes").read_text())
    except (OSError, ValueError):
        return None
    return received, sent


def netns_exists(layout: Layout, machine: str) -> bool:
    """Whether a machine's named network namespace exists."""
    return (NETNS_DIR / netplan.netns_name(layout, machine)).exists()


def _alias(ifname: str) -> str:
    try:
        return Path("/sys/class/net", ifname, "ifalias").read_text().strip()
    except OSError:
        return ""


def _links_lock(layout: Layout) -> contextlib.AbstractContextManager[None]:
    """Held while making bridges and namespaces: an apply and machine units
    (which make what they lack as the host boots) may get there at once."""
    return files.locked(Path(layout.net_run_dir) / "links.lock")


def _sysctl(key: str, value: str) -> None:
    path = Path("/proc/sys") / key.replace(".", "/")
    with path.open("w") as handle:
        handle.write(value)


@contextlib.contextmanager
def _ipr(netns: str | None = None) -> Iterator[Any]:
    """A netlink socket in the host's network namespace, or in a named one.

    For a named one, this thread alone enters it just long enough to open the
    socket (setns(2) is per thread; a socket stays in the namespace it was
    made in): far quicker than pyroute2's NetNS, which starts a process."""
    from pyroute2 import IPRoute

    if netns is None:
        with IPRoute() as ipr:
            yield ipr
        return
    with _entered(netns):
        ipr = IPRoute()
    with ipr:
        yield ipr


@contextlib.contextmanager
def _entered(netns: str) -> Iterator[None]:
    """This thread alone in a named network namespace for a moment: what it
    opens there (a socket, a file under /proc/sys/net) stays of that namespace."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(NETNS_DIR / netns, os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(target)
    finally:
        os.close(own)


def _setns(fd: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise PymachineError(f"cannot enter a network namespace: {os.strerror(errno)}")


def _index(ipr: Any, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise PymachineError(f"interface {ifname} vanished while pymachine set it up")
    return int(found[0])


# -- bridges ------------------------------------------------------------------


def create_bridge(layout: Layout, network: Network) -> str:
    """Make (or finish) a network's bridge with its gateway addresses, and let it
    route from the host's loopback; its name. A bridge of that name that
    pymachine did not make is refused."""
    bridge = netplan.bridge_name(layout, network)
    marker = _marker(layout, network.name)
    with _links_lock(layout), _ipr() as ipr:
        if link_exists(bridge) and _alias(bridge) != marker:
            raise PymachineError(
                f"interface {bridge} exists and was not made by pymachine for network "
                f"{network.name}",
                hint="choose another bridge: name in the network's spec",
            )
        if not link_exists(bridge):
            ipr.link("add", ifname=bridge, kind="bridge")
        index = _index(ipr, bridge)
        ipr.link("set", index=index, ifalias=marker)
        have = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=index)}
        gateway = str(network.gateway_address)
        if gateway not in have:
            ipr.addr("add", index=index, address=gateway, prefixlen=network.subnet.prefixlen)
        gateway6 = netplan.gateway6(network)
        if gateway6 is not None and network.subnet6 is not None and str(gateway6) not in have:
            _sysctl(f"net.ipv6.conf.{bridge}.disable_ipv6", "0")
            ipr.addr(
                "add",
                index=index,
                address=str(gateway6),
                prefixlen=network.subnet6.prefixlen,
                flags=IFA_F_NODAD,
            )
        ipr.link("set", index=index, state="up")
    # Port forwards from 127.0.0.1 leave through the bridge (then masqueraded).
    _sysctl(f"net.ipv4.conf.{bridge}.route_localnet", "1")
    if network.nat:
        # As every container engine does: masquerading outward needs forwarding.
        _sysctl("net.ipv4.ip_forward", "1")
    if network.subnet6 is not None:
        # Masquerading outward, and published ports DNATed to the machines'
        # IPv6 addresses (which the forwarders listening on [::] served before).
        _sysctl("net.ipv6.conf.all.forwarding", "1")
    return bridge


def reconnect(layout: Layout, bridge: str, machines: list[str]) -> None:
    """Put machines' host-side veths (those that exist) back on a bridge made
    again, such as after someone deleted it."""
    with _ipr() as ipr:
        master = _index(ipr, bridge)
        for machine in machines:
            host_side = netplan.veth_name(layout, machine)
            if link_exists(host_side) and _alias(host_side) == _marker(layout, machine):
                ipr.link("set", index=_index(ipr, host_side), master=master, state="up")


def remove_bridge(layout: Layout, record: NetworkRecord) -> None:
    """Delete a network's bridge if it is there and pymachine made it."""
    if link_exists(record.bridge) and _alias(record.bridge) == _marker(layout, record.name):
        with _ipr() as ipr:
            ipr.link("del", index=_index(ipr, record.bridge))


# -- machines -----------------------------------------------------------------


def attach(
    layout: Layout,
    machine: str,
    network: Network,
    address: ipaddress.IPv4Address,
) -> None:
    """A machine's network namespace with loopback, and a veth pair from the
    network's bridge (host side) to ``eth0`` inside, addressed and routed
    through the gateway. One that is already so is kept (an apply and the
    machine's unit may both get here as the host boots); whatever else was left
    of an earlier one goes first."""
    bridge = netplan.bridge_name(layout, network)
    if not link_exists(bridge):
        raise PymachineError(
            f"the bridge {bridge} of network {network.name} is missing",
            hint="run pymachine apply, which makes it again",
        )
    with _links_lock(layout):
        if not _attached(layout, machine, network, address):
            detach(layout, machine)
            _make_namespace(layout, machine, network, bridge, address)
        else:
            # One made by an earlier pymachine gets the sysctls as it restarts
            # (its MAC address stays until it is made again).
            _tune(netplan.netns_name(layout, machine))


def _attached(
    layout: Layout, machine: str, network: Network, address: ipaddress.IPv4Address
) -> bool:
    """Whether a machine's namespace is as attach makes it: its veth on the
    network's bridge, its addresses inside, its default route via the gateway."""
    host_side = netplan.veth_name(layout, machine)
    if not netns_exists(layout, machine) or _alias(host_side) != _marker(layout, machine):
        return False
    master = Path("/sys/class/net", host_side, "master").resolve().name
    if master != netplan.bridge_name(layout, network):
        return False
    wanted = {str(address)}
    address6 = netplan.address6(network, address)
    if address6 is not None:
        wanted.add(str(address6))
    with _ipr(netplan.netns_name(layout, machine)) as ns:
        found = ns.link_lookup(ifname=MACHINE_IFNAME)
        if not found:
            return False
        have = {a.get_attr("IFA_ADDRESS") for a in ns.get_addr(index=found[0])}
        gateways = {r.get_attr("RTA_GATEWAY") for r in ns.get_default_routes(family=socket.AF_INET)}
    return wanted <= have and gateways == {str(network.gateway_address)}


def link_problem(layout: Layout, machine: str, network: Network) -> str | None:
    """What is wrong with a running machine's link to its network, from what the
    host shows (its namespace, its veth and the bridge that veth is on), or
    None. Cheap: no netlink, no entering the namespace."""
    host_side = netplan.veth_name(layout, machine)
    bridge = netplan.bridge_name(layout, network)
    if not netns_exists(layout, machine):
        return f"its network namespace {netplan.netns_name(layout, machine)} is missing"
    if not link_exists(host_side) or _alias(host_side) != _marker(layout, machine):
        return f"its veth {host_side} is missing"
    master = Path("/sys/class/net", host_side, "master")
    if not master.exists() or master.resolve().name != bridge:
        return f"its veth {host_side} is not on the bridge {bridge}"
    return None


def _make_namespace(
    layout: Layout,
    machine: str,
    network: Network,
    bridge: str,
    address: ipaddress.IPv4Address,
) -> None:
    from pyroute2 import netns

    name = netplan.netns_name(layout, machine)
    host_side = netplan.veth_name(layout, machine)
    mac = netplan.mac_address(layout, network.name, machine)
    netns.create(name)
    with _ipr() as ipr:
        ipr.link(
            "add",
            ifname=host_side,
            kind="veth",
            peer={"ifname": MACHINE_IFNAME, "net_ns_fd": name},
        )
        index = _index(ipr, host_side)
        ipr.link(
            "set",
            index=index,
            master=_index(ipr, bridge),
            ifalias=_marker(layout, machine),
            state="up",
        )
    address6 = netplan.address6(network, address)
    with _ipr(name) as ns:
        ns.link("set", index=_index(ns, "lo"), state="up")
        inside = _index(ns, MACHINE_IFNAME)
        ns.link("set", index=inside, address=mac)
        _tune(name)
        ns.addr("add", index=inside, address=str(address), prefixlen=network.subnet.prefixlen)
        if address6 is not None and network.subnet6 is not None:
            ns.addr(
                "add",
                index=inside,
                address=str(address6),
                prefixlen=network.subnet6.prefixlen,
                flags=IFA_F_NODAD,
            )
        ns.link("set", index=inside, state="up")
        ns.route("add", dst="default", gateway=str(network.gateway_address))
        gateway6 = netplan.gateway6(network)
        if gateway6 is not None:
            ns.route("add", dst="::/0", gateway=str(gateway6), family=socket.AF_INET6)
    _announce(name, host_side, mac, address, address6)


def _tune(netns: str) -> None:
    """The sysctls of a machine's namespace and of its eth0 (see netplan)."""
    with _entered(netns):
        for key, value in (*netplan.NAMESPACE_SYSCTLS, *netplan.interface_sysctls(MACHINE_IFNAME)):
            _write_sysctl(key, value)


def _write_sysctl(key: str, value: str) -> None:
    """Set a sysctl (a path under /proc/sys) of this thread's network
    namespace; one the kernel lacks (IPv6 turned off) is left out."""
    with contextlib.suppress(FileNotFoundError):
        (Path("/proc/sys") / key).write_text(value)


def _announce(
    netns: str,
    host_side: str,
    mac: str,
    address: ipaddress.IPv4Address,
    address6: ipaddress.IPv6Address | None,
) -> None:
    """Tell the machine's peers where it is now: a gratuitous ARP (and an
    unsolicited neighbour advertisement) from its eth0, once the bridge
    forwards from its port, so that a peer whose neighbour entry names
    another MAC address (the machine's before stable ones, or another
    machine's that had the address) replaces it at once rather than after
    its probes fail. Best effort: a peer without an entry asks anyway."""
    state = Path("/sys/class/net", host_side, "brport", "state")
    deadline = time.monotonic() + ANNOUNCE_WAIT
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            if int(state.read_text()) == BR_STATE_FORWARDING:
                break
        time.sleep(0.005)
    with contextlib.suppress(OSError), _entered(netns):
        index = socket.if_nametoindex(MACHINE_IFNAME)
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as raw:
            raw.bind((MACHINE_IFNAME, 0))
            raw.send(netplan.gratuitous_arp(mac, address))
        if address6 is not None:
            with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) as icmp:
                icmp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
                icmp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
                icmp.bind((str(address6), 0, 0, index))
                icmp.sendto(
                    netplan.neighbour_advertisement(mac, address6), ("ff02::1", 0, 0, index)
                )


def detach(layout: Layout, machine: str) -> None:
    """Remove a machine's IPv6 forwarders, host-side veth and network namespace,
    whichever exist."""
    stop_forwarders(layout, machine)
    host_side = netplan.veth_name(layout, machine)
    if link_exists(host_side) and _alias(host_side) == _marker(layout, machine):
        with _ipr() as ipr:
            ipr.link("del", index=_index(ipr, host_side))
    if netns_exists(layout, machine):
        from pyroute2 import netns

        netns.remove(netplan.netns_name(layout, machine))


# -- nftables -----------------------------------------------------------------


# A machine whose network is up: its name, record, bridge and addresses.
Up = tuple[str, MachineRecord, str, ipaddress.IPv4Address, ipaddress.IPv6Address | None]


def _up(
    layout: Layout, state: StateStore, networks: dict[str, tuple[str, Network]]
) -> Iterator[Up]:
    """Each machine whose network is up: its name, record, bridge and
    addresses (IPv6 where its network has subnet6)."""
    for name, record in state.all().items():
        if (
            record.address is None
            or record.network not in networks
            or not netns_exists(layout, name)
        ):
            continue
        bridge, spec = networks[record.network]
        address = ipaddress.IPv4Address(record.address)
        yield name, record, bridge, address, netplan.address6(spec, address)


def _forwards(
    machines: list[Up],
) -> Iterator[netplan.Forward]:
    """The port forwards nft makes for every machine whose network is up: IPv4,
    and IPv6 for those with an IPv6 address."""
    for name, record, bridge, address, address6 in machines:
        ports = record.spec.ports if record.spec else []
        yield from netplan.ipv4_forwards(name, bridge, address, ports)
        if address6 is not None:
            yield from netplan.ipv6_forwards(name, bridge, address6, ports)


def sync_rules(layout: Layout, state: StateStore) -> str:
    """Rewrite pymachine's nft table from the records, in one transaction: NAT
    and isolation for every recorded network, DNAT for the ports of every
    machine whose network is up; the script it ran. Under a lock across
    processes (an apply and units starting at boot rewrite it too), so that
    each rewrite reads the records and namespaces after the one before loaded.
    The networks' names go with it: the hosts files, from the same records."""
    with files.locked(Path(layout.net_run_dir) / "rules.lock"):
        networks = state.networks()
        bridges = []
        by_name: dict[str, tuple[str, Network]] = {}
        for record in networks.values():
            spec = record.spec
            bridges.append(
                netplan.Bridge(
                    spec.name,
                    record.bridge,
                    spec.subnet,
                    spec.subnet6,
                    spec.nat,
                    tuple(listen_addresses(spec)),
                )
            )
            by_name[record.name] = (record.bridge, spec)
        machines = list(_up(layout, state, by_name))
        forwards = list(_forwards(machines))
        script = netplan.ruleset(netplan.table_name(layout), bridges, forwards)
        path = Path(layout.net_run_dir) / "rules.nft"
        files.atomic_write(path, script, 0o600)
        run.run(netplan.nft_apply_argv(path))
        names.sync_names(layout, state)
        sync_redirects(layout, machines)
        return script


# -- the [::1] connect redirect -----------------------------------------------

REDIRECT_ENV = "PYMACHINE_SOCKREDIRECT_CGROUP"
_redirect_warned: set[str] = set()


def redirect_group() -> Path | None:
    """Where the ``[::1]`` connect redirect attaches: the root of the unified
    cgroup tree, unless ``PYMACHINE_SOCKREDIRECT_CGROUP`` names another group
    (or is ``none``, for none: ``::1`` then goes through the relays alone)."""
    chosen = os.environ.get(REDIRECT_ENV)
    if chosen is None:
        return sockredirect.unified_root()
    if chosen in ("", "none"):
        return None
    return Path(chosen)


def sync_redirects(
    layout: Layout,
    machines: list[Up],
) -> None:
    """Point ``[::1]:PORT`` straight at each machine with an IPv6 address that
    publishes TCP PORT on ``::1``, while its relay holds the port (the relay
    carries the rest: UDP, and machines without IPv6). A host where bpf(2)
    cannot do it gets one warning per process, and the relays carry ``::1``
    as before: never an error."""
    group = redirect_group()
    if group is None:
        return
    owner = sockprog.owner_tag(layout.scope)
    want: dict[int, sockprog.Target] = {}
    for _name, record, _bridge, _address, address6 in machines:
        if address6 is not None and record.spec is not None:
            want |= sockprog.targets(record.spec.ports, address6, owner)
    try:
        sockredirect.sync(group, owner, want, sockprog.listening(host_sockets()))
    except OSError as exc:
        if want and str(group) not in _redirect_warned:
            _redirect_warned.add(str(group))
            print(
                f"warning: the [::1] connect redirect on {group} is not in use: "
                f"{exc.strerror or exc}; the port forwarders relay ::1 instead",
                file=sys.stderr,
            )


# -- IPv6 forwarders ----------------------------------------------------------


def _pidfile(layout: Layout, machine: str) -> Path:
    return Path(layout.net_run_dir) / f"{machine}.forwarders.json"


def _bind6(protocol: Protocol, listen: str, port: int) -> socket.socket:
    """A bound IPv6-only socket (listening, for TCP) for a forwarder to inherit."""
    kind = socket.SOCK_STREAM if protocol is Protocol.TCP else socket.SOCK_DGRAM
    sock = socket.socket(socket.AF_INET6, kind)
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if protocol is Protocol.TCP:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((listen, port))
        if protocol is Protocol.TCP:
            sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def _target(
    layout: Layout, machine: Machine, address: ipaddress.IPv4Address
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Where a machine's forwarders relay to: its IPv6 address on a network
    with subnet6 (where nft sends the other IPv6 clients too), else its IPv4 one."""
    record = StateStore(layout).network(machine.network) if machine.network else None
    if record is None:
        return address
    return netplan.address6(record.spec, address) or address


def start_forwarders(layout: Layout, machine: Machine, address: ipaddress.IPv4Address) -> list[int]:
    """One forwarder process per port forward over IPv6: it listens on the
    host's IPv6 address (or every one) and relays to the machine. It carries
    what nft cannot: ``::1`` (never DNATed to another host), and every IPv6
    client of a machine without an IPv6 address. The sockets are bound here,
    so a port already in use fails the start at once. Forwarders the machine
    had are ended first. Their pids."""
    stop_forwarders(layout, machine.name)
    target = _target(layout, machine, address)
    pids: list[int] = []
    log = Path(layout.machine_dir(machine.name)) / "forwarders.log"
    try:
        for port in machine.ports:
            if port.host_ip is not None and not isinstance(port.host_ip, ipaddress.IPv6Address):
                continue
            listen = str(port.host_ip) if port.host_ip is not None else "::"
            try:
                sock = _bind6(port.protocol, listen, port.host)
            except OSError as exc:
                if port.host_ip is None and exc.errno == errno.EAFNOSUPPORT:
                    continue  # a host without IPv6: the IPv4 forward is all there is
                raise PymachineError(
                    f"cannot forward [{listen}]:{port.host}/{port.protocol.value} to machine "
                    f"{machine.name}: {exc.strerror}",
                    hint="another program uses that port; change ports: in the spec",
                ) from exc
            argv = [
                sys.executable,
                "-m",
                "pymachined.forward",
                port.protocol.value,
                str(sock.fileno()),
                str(target),
                str(port.machine),
                machine.name,
            ]
            with sock, log.open("ab") as output:
                child = run.spawn(argv, output, pass_fds=(sock.fileno(),))
            pids.append(child.pid)
    finally:
        if pids:  # recorded even if a later port failed, so that detach ends them
            files.atomic_write_json(_pidfile(layout, machine.name), {"pids": pids})
    return pids


def _recorded_forwarders(layout: Layout, machine: str) -> list[int]:
    try:
        pids = json.loads(_pidfile(layout, machine).read_text()).get("pids", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [p for p in pids if isinstance(p, int)]


def _forwarders(layout: Layout, machine: str) -> set[int]:
    """The recorded forwarders of a machine that still run as its forwarders."""
    return {p for p in _recorded_forwarders(layout, machine) if _is_forwarder(p, machine)}


def forwarders_gone(layout: Layout, machine: str) -> list[int]:
    """The recorded IPv6 forwarders of a machine that no longer run (one that
    ran out of descriptors, or was killed), so that plan starts them again."""
    return [p for p in _recorded_forwarders(layout, machine) if not _is_forwarder(p, machine)]


def _is_forwarder(pid: int, machine: str) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"pymachined.forward" in argv and machine.encode() in argv


def stop_forwarders(layout: Layout, machine: str) -> None:
    """End a machine's forwarders (only processes that still are its forwarders),
    and wait until they are gone, their ports free, before this returns."""
    path = _pidfile(layout, machine)
    try:
        pids = json.loads(path.read_text()).get("pids", [])
    except (OSError, ValueError):
        return
    for pid in pids:
        if not isinstance(pid, int):
            continue
        procs.end(pid, lambda candidate: _is_forwarder(candidate, machine))
    path.unlink(missing_ok=True)


# -- host ports ---------------------------------------------------------------

PROC_NET = (("tcp", "tcp"), ("tcp6", "tcp"), ("udp", "udp"), ("udp6", "udp"))


def host_sockets() -> list[parsers.Socket]:
    """The sockets that hold ports in the host's network namespace (this
    process's: the one published ports are on)."""
    found: list[parsers.Socket] = []
    for name, protocol in PROC_NET:
        with contextlib.suppress(OSError):  # no IPv6 on this host
            found += parsers.parse_proc_net(Path("/proc/net", name).read_text(), protocol)
    return found


def socket_owners(inodes: set[int]) -> dict[int, list[ports.Process]]:
    """The processes holding each of these socket inodes, found through their
    descriptors (a process that ends meanwhile is left out)."""
    owners: dict[int, list[ports.Process]] = {}
    if not inodes:
        return owners
    wanted = {f"socket:[{inode}]": inode for inode in inodes}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            held = {
                wanted[t] for fd in (entry / "fd").iterdir() if (t := str(fd.readlink())) in wanted
            }
            if not held:
                continue
            name = (entry / "comm").read_text().strip()
        except OSError:
            continue
        for inode in held:
            owners.setdefault(inode, []).append(ports.Process(int(entry.name), name))
    return owners


def port_clashes(layout: Layout, machine: Machine) -> list[tuple[int, str]]:
    """Each (index in machine's ports, message) of a port some other host
    process already holds; the machine's own forwarders (the pids on its
    record that still are) are no clash."""
    if not machine.ports:
        return []
    found = ports.candidates(machine.ports, host_sockets())
    if not found:
        return []
    owners = socket_owners({s.inode for _, s in found})
    return ports.clashes(found, owners, own=_forwarders(layout, machine.name))


def check_ports(layout: Layout, machine: Machine) -> None:
    """Refuse to publish a machine's ports while another process holds one
    (checked again as it starts: a listener may have come since the plan)."""
    found = port_clashes(layout, machine)
    if found:
        index, message = found[0]
        port = machine.ports[index]
        raise PymachineError(
            f"cannot publish port {port.host}/{port.protocol.value} of machine {machine.name}: "
            f"{message}",
            hint="stop that process, or publish another host port (ports: in the spec)",
        )
