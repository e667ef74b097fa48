"""Networks against real bridges, network namespaces, veth pairs and nftables (as root).

Every object a test makes is named from its own host root (bridges, veths and
the nft table carry the root's scope) or its machine names (namespaces
``pm-<prefix>...``); a finalizer removes whatever is left. Traffic goes only to
loopback and to the test's own namespaces.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import pytest

from pymachined import network, sockredirect
from pymachined.core import netplan, sockprog
from pymachined.core.layout import Layout
from pymachined.images import ImageRecord
from tests.waiting import wait_until

if TYPE_CHECKING:
    from tests.integration.conftest import Host

pytestmark = pytest.mark.integration

SPECS = """\
kind: network
name: "@n1"
subnet: 10.213.1.0/24
subnet6: fd42:213:1::/64
---
kind: network
name: "@n2"
subnet: 10.213.2.0/24
---
name: "@srv"
image: debian-bookworm-slim
packages: [python3]
network: "@n1"
address: 10.213.1.10
ports: ["127.0.0.1:18213:8080", "[::1]:18213:8080", "18214:8081/udp", "18216:8080"]
command: [python3, -m, http.server, --bind, "::", "8080"]  # IPv4 and IPv6 (subnet6)
---
name: "@cli"
image: debian-bookworm-slim
packages: [python3]
network: "@n1"
command: [sleep, infinity]
---
name: "@far"
image: debian-bookworm-slim
network: "@n2"
command: [sleep, infinity]
---
name: "@lone"
image: debian-bookworm-slim
network: none
command: [sleep, infinity]
---
name: "@shared"
image: debian-bookworm-slim
network: host
command: [sleep, infinity]
"""


def netns_of(host: Host, machine: str) -> str:
    """The named network namespace of one of the host's machines."""
    return netplan.netns_name(Layout(PurePosixPath(host.root)), host.prefix + machine)


def netns_run(
    host: Host, machine: str, *argv: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """argv on the host, inside a machine's network namespace."""
    return subprocess.run(
        ["ip", "netns", "exec", netns_of(host, machine), *argv],
        capture_output=True,
        text=True,
        check=check,
        timeout=30,
    )


def tcp_probe(address: str, port: int) -> list[str]:
    """A host python3 that connects to address:port and prints OK or the error."""
    code = (
        "import socket,sys\n"
        "try:\n"
        f"    s=socket.create_connection(({address!r},{port}),timeout=2)\n"
        "    s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); print('OK', s.recv(12).decode())\n"
        "except OSError as e:\n"
        "    print('FAIL', e)\n"
    )
    return ["python3", "-c", code]


def scoped_leftovers(host: Host) -> list[str]:
    """Links, namespaces and nft objects of this test's root that still exist."""
    layout = Layout(PurePosixPath(host.root))
    marker = f"pymachine:{netplan.scope(layout)}:"
    found = [
        f"link {p.name}"
        for p in Path("/sys/class/net").iterdir()
        if (p / "ifalias").exists() and (p / "ifalias").read_text().startswith(marker)
    ]
    netns = Path("/run/netns")
    if netns.is_dir():
        found += [
            f"netns {p.name}"
            for p in netns.iterdir()
            if p.name.startswith(netplan.netns_name(layout, host.prefix))
        ]
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    found += [f"nft {t}" for t in tables.splitlines() if netplan.table_name(layout) in t.split()]
    return found


FORWARDING = ("net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding")
# With br_netfilter, frames between two machines on one bridge pass conntrack,
# which hides a missing hairpin NAT; the test turns it off for a moment.
BRIDGE_NF = "net/bridge/bridge-nf-call-iptables"


@pytest.fixture
def net_host(host: Host, slim_image: ImageRecord) -> Iterator[Host]:
    """A host whose networks (and anything left of them) go after the test, and
    whose forwarding switches (which networks with nat turn on) are put back."""
    switches = {
        key: Path("/proc/sys", key).read_text()
        for key in (*FORWARDING, BRIDGE_NF)
        if Path("/proc/sys", key).exists()
    }
    yield host
    for name in host.machines():
        host.pymachine("destroy", "--yes", host.prefix + name, check=False)
    listed = host.pymachine("network", "ls", "-o", "json", check=False)
    for doc in json.loads(listed.stdout or "[]"):
        host.pymachine("network", "rm", doc["name"], check=False)
    layout = Layout(PurePosixPath(host.root))
    for leftover in scoped_leftovers(host):  # a failed test's remains, never others'
        kind, name = leftover.split(" ", 1)
        if kind == "link":
            subprocess.run(["ip", "link", "del", name], check=False)
        elif kind == "netns":
            subprocess.run(["ip", "netns", "del", name], check=False)
    for key, value in switches.items():
        Path("/proc/sys", key).write_text(value)
    subprocess.run(
        ["nft", "delete", "table", "inet", netplan.table_name(layout)],
        check=False,
        capture_output=True,
    )
    group = sockredirect.unified_root()
    if group is not None:  # and its [::1] redirect entries
        listening = sockprog.listening(network.host_sockets())
        sockredirect.sync(group, sockprog.owner_tag(layout.scope), {}, listening)


def udp_ask(family: socket.AddressFamily, address: str, port: int, data: bytes) -> bytes:
    """A datagram's answer (retried for a moment, until the server listens)."""
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.5)
        for _ in range(20):
            sock.sendto(data, (address, port))
            try:
                return sock.recv(100)
            except TimeoutError:
                continue
    raise AssertionError(f"no answer from {address} port {port}/udp")


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.status)


def wait_http(url: str) -> str:
    errors: list[OSError] = []

    def answer() -> str | None:
        try:
            return http_get(url)
        except OSError as exc:
            errors[:] = [exc]
            return None

    return wait_until(answer, f"an answer from {url}", 60, detail=lambda: errors)


def test_networks_connect_isolate_forward_and_go_away(net_host: Host) -> None:
    host = net_host
    p = host.prefix
    host.declare(SPECS)
    host.apply()
    machines = host.machines()
    assert machines["srv"]["address"] == "10.213.1.10"
    assert machines["cli"]["address"] == "10.213.1.2"  # the lowest free one
    assert machines["lone"]["address"] is None

    # Two machines on one network reach each other (TCP, from cli's namespace
    # and from inside srv itself to cli's address).
    wait_http("http://127.0.0.1:18213/")
    assert netns_run(host, "cli", *tcp_probe("10.213.1.10", 8080)).stdout.startswith("OK HTTP/1.0")
    inside = host.pymachine(
        "exec",
        p + "srv",
        "--",
        "python3",
        "-c",
        "import socket; socket.create_connection(('10.213.1.2', 9), timeout=2)",
        check=False,
    )
    assert "Connection refused" in inside.stderr  # reached cli, whose port 9 is closed
    # ... but not from another network.
    far = netns_run(host, "far", *tcp_probe("10.213.1.10", 8080)).stdout
    assert far.startswith("FAIL"), far
    # stats: network I/O from each machine's veth; none for a machine without one.
    sample = json.loads(
        host.pymachine("stats", p + "srv", p + "lone", "--no-stream", "-o", "json").stdout
    )
    traffic = {row["name"].removeprefix(p): (row["net_rx"], row["net_tx"]) for row in sample}
    assert traffic["srv"][0] > 0 and traffic["srv"][1] > 0, traffic
    assert traffic["lone"] == (None, None)

    # Interfaces: eth0 and lo on a network; lo only with none; the host's with host.
    def interfaces(name: str) -> set[str]:
        out = host.pymachine("exec", p + name, "--", "cat", "/proc/net/dev").stdout
        return {line.split(":")[0].strip() for line in out.splitlines() if ":" in line}

    assert interfaces("srv") == {"eth0", "lo"}
    assert interfaces("lone") == {"lo"}
    assert {"eth0", "lo"} <= interfaces("shared")
    assert interfaces("shared") == {
        line.split(":")[0].strip()
        for line in Path("/proc/net/dev").read_text().splitlines()
        if ":" in line
    }
    addresses = netns_run(host, "srv", "ip", "-br", "addr", "show", "eth0").stdout
    assert "10.213.1.10/24" in addresses and "fd42:213:1::a/64" in addresses
    route = netns_run(host, "srv", "ip", "route", "show", "default").stdout
    assert "via 10.213.1.1" in route

    # DNS: the machine asks its network's resolver, on the gateway (test_names).
    resolv = host.pymachine("exec", p + "srv", "--", "cat", "/etc/resolv.conf").stdout
    assert resolv.splitlines()[1:] == ["nameserver 10.213.1.1", "nameserver fd42:213:1::1"]

    # Port forwards from the host's loopback, IPv4 and IPv6.
    assert http_get("http://127.0.0.1:18213/") == "200"
    assert http_get("http://[::1]:18213/") == "200"
    rules = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True).stdout
    assert "udp dport 18214 dnat ip to 10.213.1.10:8081" in rules
    # A port published on every host address is reached from machines through
    # their gateways: from srv's own network (hairpin) and from another one,
    # which still cannot reach srv itself.
    if Path("/proc/sys", BRIDGE_NF).exists():
        Path("/proc/sys", BRIDGE_NF).write_text("0")  # put back by the fixture
    for machine, gateway in (("cli", "10.213.1.1"), ("far", "10.213.2.1")):
        through = netns_run(host, machine, *tcp_probe(gateway, 18216)).stdout
        assert through.startswith("OK HTTP/1.0"), (machine, through)
    assert netns_run(host, "far", *tcp_probe("10.213.1.10", 8080)).stdout.startswith("FAIL")
    # UDP: a server in srv's namespace answers through 127.0.0.1 (DNAT) and ::1
    # (the forwarder, to srv's IPv6 address).
    echo = subprocess.Popen(
        [
            "ip", "netns", "exec", netns_of(host, "srv"), "python3", "-c",
            "import socket\ns=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM)\n"
            "s.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_V6ONLY,0)\n"
            "s.bind(('::',8081))\n"
            "while True:\n d,a=s.recvfrom(100); s.sendto(b'echo '+d,a)",
        ]
    )  # fmt: skip
    try:
        for family, loopback in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            assert udp_ask(family, loopback, 18214, b"hi") == b"echo hi"
    finally:
        echo.kill()
        echo.wait()

    # Visible: network ls and inspect.
    doc = json.loads(host.pymachine("network", "inspect", p + "n1", "-o", "json").stdout)
    assert doc["subnet"] == "10.213.1.0/24" and doc["gateway"] == "10.213.1.1"
    assert {m["name"]: m["address"] for m in doc["machines"]} == {
        p + "cli": "10.213.1.2",
        p + "srv": "10.213.1.10",
    }
    assert Path("/sys/class/net", doc["bridge"]).exists()
    table = host.pymachine("network", "ls").stdout
    assert p + "n2" in table and "10.213.2.0/24" in table

    # What a unit runs before nspawn keeps a machine's intact network as it is
    # (the same namespace; the machine still answers).
    namespace = Path("/run/netns", netns_of(host, "srv"))
    inode = namespace.stat().st_ino
    host.pymachine("prepare", p + "srv")
    assert namespace.stat().st_ino == inode
    assert netns_run(host, "cli", *tcp_probe("10.213.1.10", 8080)).stdout.startswith("OK")

    # Converged: nothing to do; a restart keeps the allocated address.
    assert host.pymachine("plan", str(host.specs), check=False).returncode == 0
    host.pymachine("restart", p + "cli")
    assert host.machines()["cli"]["address"] == "10.213.1.2"
    assert netns_run(host, "cli", *tcp_probe("10.213.1.10", 8080)).stdout.startswith("OK")
    assert host.pymachine("plan", str(host.specs), check=False).returncode == 0

    # A bridge deleted behind pymachine's back is made again, its machines back on it.
    subprocess.run(["ip", "link", "del", doc["bridge"]], check=True)
    planned = host.pymachine("plan", str(host.specs), check=False)
    assert planned.returncode == 2 and "is missing" in planned.stdout
    host.apply()
    # The machines on it restart (their veths were off the bridge): srv's
    # server answers once it listens again.
    wait_until(
        lambda: netns_run(host, "cli", *tcp_probe("10.213.1.10", 8080)).stdout.startswith("OK"),
        "srv answering cli after the bridge came back",
        30,
    )
    assert host.pymachine("plan", str(host.specs), check=False).returncode == 0

    # A network whose subnet changes is made again; its machine moves with it.
    host.declare(SPECS.replace("10.213.2.0/24", "10.213.3.0/24"))
    assert "replace network" in host.apply().stderr
    assert host.machines()["far"]["address"] == "10.213.3.2"
    assert "10.213.3.2/24" in netns_run(host, "far", "ip", "-br", "addr").stdout
    assert host.pymachine("plan", str(host.specs), check=False).returncode == 0
    # Only its gateway changes: the machine keeps its address, routed anew.
    host.declare(SPECS.replace("10.213.2.0/24", "10.213.3.0/24\ngateway: 10.213.3.254"))
    host.apply()
    assert host.machines()["far"]["address"] == "10.213.3.2"
    route = netns_run(host, "far", "ip", "route", "show", "default").stdout
    assert "via 10.213.3.254" in route, route

    # A stopped machine loses its namespace, veth and rules.
    host.declare(SPECS.replace('ports: ["127', 'state: stopped\nports: ["127'))
    host.apply()
    assert not Path("/run/netns", netns_of(host, "srv")).exists()
    rules = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True).stdout
    assert "18213" not in rules
    with pytest.raises(OSError):
        http_get("http://127.0.0.1:18213/")

    # Prune: no trace of machines or networks.
    host.declare(
        'name: "@lone"\nimage: debian-bookworm-slim\nnetwork: none\ncommand: [sleep, infinity]\n'
    )
    host.apply("--prune")
    assert scoped_leftovers(host) == []
    links = subprocess.run(["ip", "link"], capture_output=True, text=True).stdout
    namespaces = subprocess.run(["ip", "netns"], capture_output=True, text=True).stdout
    ruleset = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True).stdout
    for machine in ("srv", "cli", "far"):
        veth = netplan.veth_name(Layout(PurePosixPath(host.root)), p + machine)
        assert veth not in links
        assert p + machine not in namespaces
        assert p + machine not in ruleset
    assert json.loads(host.pymachine("network", "ls", "-o", "json").stdout) == []


def test_a_declared_address_held_by_another_machine_fails_at_plan(net_host: Host) -> None:
    host = net_host
    one = '---\nname: "@one"\nimage: debian-bookworm-slim\nnetwork: "@n1"\n'
    host.declare(SPECS.split('---\nname: "@srv"')[0] + one + "command: [sleep, infinity]\n")
    host.apply()
    assert host.machines()["one"]["address"] == "10.213.1.2"
    links_before = sorted(p.name for p in Path("/sys/class/net").iterdir())
    two = (
        '---\nname: "@two"\nimage: debian-bookworm-slim\nnetwork: "@n1"\n'
        "address: 10.213.1.2\ncommand: [sleep, infinity]\n"
    )
    host.declare((host.specs / "machines.yaml").read_text().replace(host.prefix, "@") + two)
    failed = host.apply(check=False)
    assert failed.returncode == 1
    assert "machines.yaml:" in failed.stderr
    assert (
        f"address: 10.213.1.2 is already the address of machine '{host.prefix}one'" in failed.stderr
    )
    assert sorted(p.name for p in Path("/sys/class/net").iterdir()) == links_before
    assert "two" not in host.machines()


def test_a_host_port_in_use_is_refused(net_host: Host) -> None:
    host = net_host
    with contextlib.closing(socket.socket(socket.AF_INET6)) as busy:
        busy.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        busy.bind(("::1", 18215))
        busy.listen()
        host.declare(
            'kind: network\nname: "@n1"\nsubnet: 10.213.1.0/24\n---\n'
            'name: "@web"\nimage: debian-bookworm-slim\nnetwork: "@n1"\n'
            'ports: ["[::1]:18215:80"]\ncommand: [sleep, infinity]\n'
        )
        failed = host.apply(check=False)
    assert failed.returncode == 1
    assert "ports[0]: host port [::1]:18215/tcp is already in use by" in failed.stderr
    # Refused at plan time: no record, bridge, namespace, veth or rule.
    assert host.machines() == {}
    assert scoped_leftovers(host) == []


def test_bad_networks_fail_before_anything_is_made(net_host: Host) -> None:
    host = net_host
    host.declare(
        'kind: network\nname: "@n1"\nsubnet: 10.213.0.0/16\n---\n'
        'kind: network\nname: "@n2"\nsubnet: 10.213.1.0/24\n---\n'
        'name: "@web"\nimage: debian-bookworm-slim\nnetwork: "@n1"\naddress: 10.214.0.9\n'
        "command: [sleep, infinity]\n"
    )
    failed = host.apply(check=False)
    assert failed.returncode == 1
    assert "machines.yaml:7:1: subnet: 10.213.1.0/24 overlaps 10.213.0.0/16" in failed.stderr
    assert "machines.yaml:12:1: address: 10.214.0.9 is outside 10.213.0.0/16" in failed.stderr
    assert scoped_leftovers(host) == []
    assert host.machines() == {}


def test_a_stopped_machine_moved_off_a_network_lets_it_go(net_host: Host) -> None:
    host = net_host
    n1 = 'kind: network\nname: "@n1"\nsubnet: 10.213.1.0/24\n---\n'
    n2 = 'kind: network\nname: "@n2"\nsubnet: 10.213.2.0/24\n---\n'
    machine = 'name: "@m"\nimage: debian-bookworm-slim\ncommand: [sleep, infinity]\n'
    host.declare(n1 + n2 + machine + 'network: "@n1"\n')
    host.apply()
    assert host.machines()["m"]["address"] == "10.213.1.2"
    # Stopped, moved to n2, and n1 no longer declared: prune removes n1.
    host.declare(n2 + machine + 'network: "@n2"\nstate: stopped\n')
    host.apply("--prune")
    listed = json.loads(host.pymachine("network", "ls", "-o", "json").stdout)
    assert [doc["name"] for doc in listed] == [host.prefix + "n2"]
    host.declare(n2 + machine + 'network: "@n2"\n')
    host.apply()
    assert host.machines()["m"]["address"] == "10.213.2.2"
    # Renamed, same subnet: refused while the old one holds it; --prune moves.
    host.declare(n2.replace('"@n2"', '"@n3"') + machine + 'network: "@n3"\n')
    refused = host.apply(check=False)
    assert refused.returncode == 1
    assert "subnet: 10.213.2.0/24 overlaps 10.213.2.0/24 of network" in refused.stderr
    assert "apply with --prune" in refused.stderr
    host.apply("--prune")
    listed = json.loads(host.pymachine("network", "ls", "-o", "json").stdout)
    assert [doc["name"] for doc in listed] == [host.prefix + "n3"]
    host.wait_for(lambda m: m["m"]["state"] == "running", "m running on n3")
    assert netns_run(host, "m", "ip", "route", "show", "default").stdout.startswith(
        "default via 10.213.2.1"
    )


LINKED = """\
kind: network
name: "@n"
subnet: 10.236.1.0/24
---
name: "@a"
image: debian-bookworm-slim
network: "@n"
command: [sh, -c, "trap 'exit 0' TERM; while :; do sleep 0.1; done"]
---
name: "@b"
image: debian-bookworm-slim
network: "@n"
depends_on: ["@a"]
command: [sleep, infinity]
"""


def linked(host: Host, machine: str) -> bool:
    """Whether a machine's namespace has its address and its veth is on its bridge."""
    layout = Layout(PurePosixPath(host.root))
    veth = Path("/sys/class/net", netplan.veth_name(layout, host.prefix + machine))
    if not (veth / "master").exists():
        return False
    inside = netns_run(host, machine, "ip", "-4", "-o", "addr", "show", "dev", "eth0", check=False)
    return f"inet {host.machines()[machine]['address']}/" in inside.stdout


def test_a_broken_link_is_repaired_and_verbs_never_race_apply(net_host: Host) -> None:
    host = net_host
    host.declare(LINKED)
    host.apply()
    host.wait_for(lambda m: all(r["state"] == "running" for r in m.values()), "both running")
    assert linked(host, "a")
    # A veth deleted by hand: the plan sees it, the apply repairs it.
    veth = netplan.veth_name(Layout(PurePosixPath(host.root)), host.prefix + "a")
    subprocess.run(["ip", "link", "del", veth], check=True)
    planned = json.loads(host.pymachine("plan", str(host.specs), "-o", "json", check=False).stdout)
    assert [(p["action"], p["machine"]) for p in planned] == [("RestartMachine", host.prefix + "a")]
    assert f"its veth {veth} is missing" in planned[0]["reason"]
    host.apply()
    host.wait_for(lambda m: m["a"]["state"] == "running", "a running again")
    assert linked(host, "a")
    assert host.pymachine("plan", str(host.specs), check=False).returncode == 0
    # b needs a: stopping a says so, and does nothing without --yes.
    refused = host.pymachine("stop", host.prefix + "a", check=False)
    assert refused.returncode == 1
    assert f"{host.prefix}b needs {host.prefix}a" in refused.stderr
    assert host.machines()["a"]["state"] == "running"
    # A start racing an apply: both hold the host lock, so the machine always
    # ends up running with its network, whichever goes first.
    for _ in range(20):
        host.pymachine("stop", "--yes", host.prefix + "a")
        command = [sys.executable, "-m", "pymachined", "--root", str(host.root)]
        starting = subprocess.Popen([*command, "start", host.prefix + "a"], stderr=subprocess.PIPE)
        host.apply()
        assert starting.wait(timeout=120) == 0, starting.stderr.read() if starting.stderr else ""
        assert host.machines()["a"]["state"] == "running"
        assert linked(host, "a")
    assert host.pymachine("plan", str(host.specs), check=False).returncode == 0


# A machine with CAP_NET_RAW (no user namespace) sends hand-made TCP SYNs in
# Ethernet frames to its gateway's MAC: one for the gateway's own address (the
# control: the probe works) and one for 127.0.0.1, and reports which got a
# SYN-ACK back.
LOOPBACK_PROBE = """\
import json, os, random, socket, struct, sys, time

def checksum(data):
    if len(data) % 2:
        data += b"\\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF

def gateway():
    for line in open("/proc/net/route").read().splitlines()[1:]:
        fields = line.split()
        if fields[1] == "00000000":
            return socket.inet_ntoa(struct.pack("<I", int(fields[2], 16)))

def neighbour(address):
    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", (address, 9))
    for _ in range(50):
        for line in open("/proc/net/arp").read().splitlines()[1:]:
            fields = line.split()
            if fields[0] == address and fields[3] != "00:00:00:00:00:00":
                return bytes.fromhex(fields[3].replace(":", ""))
        time.sleep(0.1)
    raise SystemExit("no ARP entry for the gateway")

def syn(mac, gw_mac, source, target, sport, dport):
    src, dst = socket.inet_aton(source), socket.inet_aton(target)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x02, 64240, 0, 0)
    pseudo = src + dst + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", checksum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0, 64, 6, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return gw_mac + mac + b"\\x08\\x00" + ip + tcp

gw = gateway()
gw_mac = neighbour(gw)
mac = bytes.fromhex(open("/sys/class/net/eth0/address").read().strip().replace(":", ""))
probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
probe.connect((gw, 9))
me = probe.getsockname()[0]
raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
raw.bind(("eth0", 0))
raw.settimeout(0.2)
answered = {}
targets = {"control": (gw, int(sys.argv[2])), "loopback": ("127.0.0.1", int(sys.argv[1]))}
for what, (target, port) in targets.items():
    sport = random.randint(40000, 60000)
    answered[what] = False
    deadline = time.monotonic() + 4
    sent = 0
    while time.monotonic() < deadline and not answered[what]:
        if sent < time.monotonic():
            raw.send(syn(mac, gw_mac, me, target, sport, port))
            sent = time.monotonic() + 1
        try:
            frame = raw.recv(2048)
        except socket.timeout:
            continue
        if frame[12:14] != b"\\x08\\x00" or frame[23] != 6:
            continue
        header = (frame[14] & 0xF) * 4
        tcp = frame[14 + header :]
        tsport, tdport = struct.unpack("!HH", tcp[:4])
        if tsport == port and tdport == sport and tcp[13] & 0x12 == 0x12:
            answered[what] = True
print("PROBE " + json.dumps(answered), flush=True)
time.sleep(3600)
"""


def test_a_machine_cannot_reach_the_hosts_loopback(net_host: Host) -> None:
    # Ports and subnet of this test alone (19200-19299, 10.232.0.0/16).
    loopback_port, control_port = 19231, 19232
    listeners = []
    for address, port in (("127.0.0.1", loopback_port), ("10.232.31.1", control_port)):
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # The gateway's address exists once apply makes the bridge.
        listener.setsockopt(socket.IPPROTO_IP, 15, 1)  # IP_FREEBIND
        listener.bind((address, port))
        listener.listen(8)
        listeners.append(listener)
    try:
        net_host.declare(
            'kind: network\nname: "rb-lo"\nsubnet: 10.232.31.0/24\n---\n'
            + json.dumps(
                {
                    "name": "@raw",
                    "image": "debian-bookworm-slim",
                    "packages": ["python3"],
                    "network": "rb-lo",
                    "restart": "no",
                    "security": {"private_users": False},
                    "files": [{"path": "/probe.py", "content": LOOPBACK_PROBE}],
                    "command": ["python3", "/probe.py", str(loopback_port), str(control_port)],
                }
            )
        )
        net_host.apply()
        log = net_host.wait_for_output("raw", "PROBE ")
        report = json.loads(log.split("PROBE ", 1)[1].splitlines()[0])
        assert report["control"] is True  # crafted SYNs work and get answers
        assert report["loopback"] is False
    finally:
        for listener in listeners:
            listener.close()


def _echo_server(port: int) -> socket.socket:
    """A TCP server on 127.0.0.1 that answers each connection's first line."""
    import threading

    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(64)

    def answer(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.sendall(b"echo " + conn.recv(100))

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = server.accept()
                threading.Thread(target=answer, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return server


def _ask(port: int) -> bytes:
    with socket.create_connection(("::1", port), timeout=5) as sock:
        sock.sendall(b"hi")
        return sock.recv(100)


def test_a_forwarder_flooded_with_few_descriptors_keeps_serving() -> None:
    import resource
    import sys
    import time

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    server = _echo_server(19401)
    listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("::1", 19400))
    listener.listen(128)

    def few_descriptors() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    argv = [sys.executable, "-m", "pymachined.forward", "tcp", str(listener.fileno())]
    forwarder = subprocess.Popen(
        [*argv, "127.0.0.1", "19401", "flood-test"],
        pass_fds=(listener.fileno(),),
        preexec_fn=few_descriptors,
        stderr=subprocess.PIPE,
    )
    listener.close()
    flood: list[socket.socket] = []
    try:
        assert _ask(19400) == b"echo hi"
        for _ in range(2000):  # 2,000 clients that connect and then hold on
            sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.connect_ex(("::1", 19400))
            flood.append(sock)
        time.sleep(2)
        assert forwarder.poll() is None, "the forwarder died"
        for sock in flood:
            sock.close()
        flood.clear()

        def serving() -> bool:
            with contextlib.suppress(OSError):
                if _ask(19400) == b"echo hi":
                    return True
            assert forwarder.poll() is None, "the forwarder died"
            return False

        # The held clients' slots come back as their relays end.
        wait_until(serving, "the forwarder to serve again", 30)
        assert forwarder.poll() is None
    finally:
        for sock in flood:
            sock.close()
        forwarder.kill()
        forwarder.wait()
        server.close()


def test_a_dead_forwarder_is_seen_by_plan_and_started_again(net_host: Host) -> None:
    import os
    import signal

    host = net_host
    host.declare(
        """\
kind: network
name: "@rd1"
subnet: 10.234.1.0/24
---
name: "@fw"
image: debian-bookworm-slim
packages: [python3]
network: "@rd1"
ports: ["[::1]:19410:8080"]
command: [python3, -m, http.server, --bind, 0.0.0.0, "8080"]
"""
    )
    host.apply()
    url = "http://[::1]:19410/"
    assert wait_http(url) == "200"
    layout = Layout(PurePosixPath(host.root))
    pidfile = Path(layout.net_run_dir) / f"{host.prefix}fw.forwarders.json"
    (pid,) = json.loads(pidfile.read_text())["pids"]
    os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    with pytest.raises(OSError):
        http_get(url)
    planned = host.pymachine("plan", str(host.specs), check=False)
    assert planned.returncode == 2
    assert (
        f"start the port forwarders of {host.prefix}fw: 1 of its IPv6 port forwarders are gone"
        in planned.stdout
    )
    host.apply()
    assert wait_http(url) == "200"
    assert host.pymachine("plan", str(host.specs), check=False).returncode == 0
