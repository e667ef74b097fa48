"""Networks on paper: names, addresses, the nft ruleset, and the plan for
networks (each plan case also checks that planning after its apply gives nothing)."""

from __future__ import annotations

import ipaddress
import json
from dataclasses import replace
from pathlib import Path, PurePosixPath

import pytest

from pymachined.core import netplan
from pymachined.core.actions import CreateNetwork, RemoveNetwork, ReplaceNetwork
from pymachined.core.desired import Desired, DesiredNetwork, desire, desire_networks, file_hash
from pymachined.core.layout import Layout
from pymachined.core.plan import Observed, ObservedNetwork, plan
from pymachined.core.recipes import Salts
from pymachined.core.records import MachineRecord, NetworkRecord, parse_network_record, stored
from pymachined.core.render import NSPAWN_BINARY, nspawn_run_argv
from pymachined.core.spec import Machine, Network, Protocol
from pymachined.core.validate import (
    SpecSet,
    check_recorded_addresses,
    check_recorded_networks,
    load_set,
)
from pymachined.errors import PymachineError
from pymachined.supervise.base import RunState, Status

HOST = Layout()
TRIAL = Layout(PurePosixPath("/tmp/trial-root"))
SALTS = Salts(bootstrap="debootstrap 1.0 http://mirror", derive="layer")
A = ipaddress.IPv4Address


def net(**fields: object) -> Network:
    return Network.model_validate(
        {"kind": "network", "name": "backend", "subnet": "10.70.0.0/24", **fields}
    )


# -- names ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "web-1", "x" * 63])
def test_interface_names_fit_the_kernel_whatever_the_name(name: str) -> None:
    for layout in (HOST, TRIAL):
        veth = netplan.veth_name(layout, name)
        bridge = netplan.bridge_name(layout, net(name=name))
        assert len(veth) <= netplan.IFNAMSIZ and veth.startswith("pmve-")
        assert len(bridge) <= netplan.IFNAMSIZ and bridge.startswith("pmbr-")


def test_names_are_deterministic_distinct_and_scoped_by_root() -> None:
    assert netplan.veth_name(HOST, "web") == netplan.veth_name(HOST, "web")
    assert netplan.veth_name(HOST, "web") != netplan.veth_name(HOST, "db")
    # Names that share a 15-character prefix still differ.
    long_a, long_b = "a" * 40 + "-one", "a" * 40 + "-two"
    assert netplan.veth_name(HOST, long_a) != netplan.veth_name(HOST, long_b)
    assert netplan.veth_name(HOST, "web") != netplan.veth_name(TRIAL, "web")
    assert netplan.netns_name(HOST, "web") == "pm-web"
    assert netplan.netns_name(TRIAL, "web") == f"pm-{TRIAL.scope}-web"
    assert nspawn_run_argv(Machine(name="web", command=["true"], network="n"), TRIAL)[1] == (
        f"--net=/run/netns/pm-{TRIAL.scope}-web"
    )
    assert netplan.table_name(HOST) == "pymachine"
    assert netplan.table_name(TRIAL).startswith("pymachine-")
    assert netplan.bridge_name(TRIAL, net(bridge="br-lab")) == "br-lab"


# -- addresses -----------------------------------------------------------------


def test_allocation_takes_the_lowest_free_address_but_the_gateway() -> None:
    network = net()
    assert netplan.allocate(network, []) == A("10.70.0.2")
    assert netplan.allocate(network, [A("10.70.0.2"), A("10.70.0.3")]) == A("10.70.0.4")
    with_gateway = net(gateway="10.70.0.2")
    assert netplan.allocate(with_gateway, []) == A("10.70.0.1")


def test_allocation_keeps_a_previous_address_while_it_is_free() -> None:
    network = net()
    assert netplan.allocate(network, [], previous=A("10.70.0.77")) == A("10.70.0.77")
    taken = [A("10.70.0.77")]
    assert netplan.allocate(network, taken, previous=A("10.70.0.77")) == A("10.70.0.2")
    # An address from another subnet (the network changed) is not kept.
    assert netplan.allocate(network, [], previous=A("10.71.0.5")) == A("10.70.0.2")
    assert netplan.allocate(network, [], previous=A("10.70.0.1")) == A("10.70.0.2")


def test_a_declared_address_wins_and_a_full_network_is_an_error() -> None:
    tiny = net(subnet="10.70.0.0/30")  # hosts .1 (gateway) and .2
    assert netplan.allocate(tiny, [], wanted=A("10.70.0.2")) == A("10.70.0.2")
    assert netplan.allocate(tiny, []) == A("10.70.0.2")
    with pytest.raises(PymachineError, match=r"no free address left in 10\.70\.0\.0/30"):
        netplan.allocate(tiny, [A("10.70.0.2")])


def test_ipv6_addresses_mirror_the_ipv4_offset() -> None:
    network = net(subnet6="fd00:70::/64")
    assert netplan.address6(network, A("10.70.0.10")) == ipaddress.IPv6Address("fd00:70::a")
    assert netplan.gateway6(network) == ipaddress.IPv6Address("fd00:70::1")
    assert netplan.address6(net(), A("10.70.0.10")) is None
    # Another gateway: the bridge's IPv6 address follows it, never a machine's.
    moved = net(subnet6="fd00:70::/64", gateway="10.70.0.254")
    assert netplan.gateway6(moved) == ipaddress.IPv6Address("fd00:70::fe")
    assert netplan.address6(moved, A("10.70.0.1")) != netplan.gateway6(moved)


# -- the ruleset ---------------------------------------------------------------


def bridge(name: str, subnet: str, nat: bool = True, subnet6: str | None = None) -> netplan.Bridge:
    return netplan.Bridge(
        name,
        f"pmbr-{name}",
        ipaddress.IPv4Network(subnet),
        ipaddress.IPv6Network(subnet6) if subnet6 else None,
        nat,
    )


def test_the_ruleset_replaces_the_table_in_one_script() -> None:
    script = netplan.ruleset(
        "pymachine",
        [bridge("a", "10.1.0.0/24", subnet6="fd00:1::/64"), bridge("b", "10.2.0.0/24", nat=False)],
        [
            netplan.Forward("web", "pmbr-a", Protocol.TCP, 8080, A("10.1.0.5"), 80),
            netplan.Forward("dns", "pmbr-a", Protocol.UDP, 5353, A("10.1.0.6"), 53, A("127.0.0.1")),
        ],
    )
    lines = [line.strip() for line in script.splitlines()]
    assert lines[:3] == [
        "table inet pymachine",
        "delete table inet pymachine",
        "table inet pymachine {",
    ]
    dnat_any = (
        'meta nfproto ipv4 fib daddr type local tcp dport 8080 dnat ip to 10.1.0.5:80 comment "web"'
    )
    dnat_lo = 'ip daddr 127.0.0.1 udp dport 5353 dnat ip to 10.1.0.6:53 comment "dns"'
    assert lines.count(dnat_any) == 2  # prerouting (from outside) and output (from the host)
    assert lines.count(dnat_lo) == 2
    assert 'ip saddr 10.1.0.0/24 oifname != "pmbr-a" masquerade' in lines
    assert 'ip6 saddr fd00:1::/64 oifname != "pmbr-a" masquerade' in lines
    assert not any("ip saddr 10.2.0.0/24 oifname !=" in line for line in lines)  # nat: false
    assert 'oifname "pmbr-b" ip saddr 127.0.0.0/8 masquerade' in lines
    assert 'oifname "pmbr-a" ip saddr 10.1.0.0/24 ct status dnat masquerade' in lines  # hairpin
    # Networks are isolated from each other, but for published ports.
    forward = lines[lines.index("chain forward {") :]
    assert forward[2:5] == [
        "ct status dnat accept",
        'iifname "pmbr-a" oifname "pmbr-b" drop',
        'iifname "pmbr-b" oifname "pmbr-a" drop',
    ]
    # Nothing from a bridge reaches the host's loopback, before NAT sees it.
    loopback = lines[lines.index("chain loopback {") :]
    assert loopback[1:6] == [
        "type filter hook prerouting priority raw; policy accept;",
        'iifname "pmbr-a" ip daddr 127.0.0.0/8 drop',
        'iifname "pmbr-a" ip6 daddr ::1 drop',
        'iifname "pmbr-b" ip daddr 127.0.0.0/8 drop',
        'iifname "pmbr-b" ip6 daddr ::1 drop',
    ]


def test_nft_forwards_leave_ipv6_host_addresses_to_the_forwarders() -> None:
    machine = Machine.model_validate(
        {
            "name": "web",
            "command": ["true"],
            "network": "backend",
            "ports": ["8080:80", "127.0.0.1:5353:53/udp", "[::1]:8443:443", "0.0.0.0:9090:90"],
        }
    )
    forwards = netplan.ipv4_forwards("web", "pmbr-a", A("10.70.0.5"), machine.ports)
    assert [(f.host_ip, f.host_port, f.protocol, f.port) for f in forwards] == [
        (None, 8080, Protocol.TCP, 80),
        (A("127.0.0.1"), 5353, Protocol.UDP, 53),
        (None, 9090, Protocol.TCP, 90),  # 0.0.0.0: every host address, as docker reads it
    ]


def test_nft_forwards_over_ipv6_go_to_the_machines_ipv6_address_but_from_loopback() -> None:
    machine = Machine.model_validate(
        {
            "name": "web",
            "command": ["true"],
            "network": "backend",
            "ports": [
                "8080:80",
                "127.0.0.1:5353:53/udp",
                "[::1]:8443:443",
                "[::]:9090:90",
                "[fd00:99::7]:7070:70/udp",
            ],
        }
    )
    six = ipaddress.IPv6Address("fd00:70::5")
    forwards = netplan.ipv6_forwards("web", "pmbr-a", six, machine.ports)
    assert [(f.host_ip, f.host_port, f.protocol, f.address, f.port) for f in forwards] == [
        (None, 8080, Protocol.TCP, six, 80),
        (None, 9090, Protocol.TCP, six, 90),  # [::]: every host IPv6 address
        (ipaddress.IPv6Address("fd00:99::7"), 7070, Protocol.UDP, six, 70),
    ]  # ::1 is left to the forwarder: the kernel drops it DNATed to another host
    script = netplan.ruleset(
        "pymachine", [bridge("a", "10.70.0.0/24", subnet6="fd00:70::/64")], forwards
    )
    lines = [line.strip() for line in script.splitlines()]
    every = (
        "meta nfproto ipv6 fib daddr type local ip6 daddr != ::1 tcp dport 8080 "
        'dnat ip6 to [fd00:70::5]:80 comment "web"'
    )
    one = 'ip6 daddr fd00:99::7 udp dport 7070 dnat ip6 to [fd00:70::5]:70 comment "web"'
    assert lines.count(every) == 2 and lines.count(one) == 2  # prerouting and output
    assert not any("dnat ip to" in line for line in lines)
    # A machine of the network reaching a published port through its gateway.
    assert 'oifname "pmbr-a" ip6 saddr fd00:70::/64 ct status dnat masquerade' in lines


def test_a_network_without_subnet6_has_no_ipv6_hairpin() -> None:
    script = netplan.ruleset("pymachine", [bridge("b", "10.2.0.0/24")], [])
    assert "ip6 saddr" not in script


def test_an_empty_ruleset_only_deletes_the_table() -> None:
    assert netplan.ruleset("pymachine-x", [], []) == (
        "table inet pymachine-x\ndelete table inet pymachine-x\n"
    )


def test_nft_argv() -> None:
    assert netplan.nft_apply_argv(PurePosixPath("/run/pymachine/net/rules.nft")) == [
        "nft",
        "-f",
        "/run/pymachine/net/rules.nft",
    ]


# -- desired state and plans ---------------------------------------------------

SPECS = """\
kind: network
name: backend
subnet: 10.70.0.0/24
---
name: web
image: debian-bookworm-slim
command: [sleep, infinity]
network: backend
ports: ["8080:80"]
"""


def spec_set(repo: Path, tmp_path: Path, text: str = SPECS) -> SpecSet:
    path = tmp_path / "specs.yaml"
    path.write_text(text)
    return load_set([path], repo / "machines")


def test_a_machine_on_a_network_joins_its_namespace_and_keeps_pymachines_resolv_conf() -> None:
    machine = Machine(name="web", command=["true"], network="backend")
    argv = nspawn_run_argv(machine, HOST)
    assert argv[:4] == ["/usr/bin/nsenter", "--net=/run/netns/pm-web", "--", NSPAWN_BINARY]
    assert "--resolv-conf=off" in argv  # its network's resolver, written by pymachine
    assert not any(a.startswith("--network-namespace-path") for a in argv)
    for mode in ("none", "host"):  # nspawn knows these; the host's resolvers serve them
        argv = nspawn_run_argv(Machine(name="web", command=["true"], network=mode), HOST)
        assert ("--private-network" in argv) == (mode == "none")
        assert not any(a.startswith("--resolv-conf") for a in argv)


def converged_networks(networks: dict[str, DesiredNetwork]) -> dict[str, ObservedNetwork]:
    return {
        name: ObservedNetwork(
            name,
            NetworkRecord(name, want.bridge, want.config_hash, want.network),
            bridge_up=True,
        )
        for name, want in networks.items()
    }


def test_networks_are_created_first_and_then_plan_nothing(repo: Path, tmp_path: Path) -> None:
    specs = spec_set(repo, tmp_path)
    desired = desire(specs, HOST, repo / "templates", SALTS)
    networks = desire_networks(specs, HOST)
    actions = plan(desired, {}, [], networks=networks, observed_networks={})
    assert isinstance(actions[0], CreateNetwork)
    assert actions[0].as_json() == {
        "action": "CreateNetwork",
        "network": "backend",
        "reason": "new network",
        "bridge": netplan.bridge_name(HOST, specs.networks["backend"]),
    }
    assert actions[0].describe() == "create network backend: new network"
    assert desired["web"].network == specs.networks["backend"]
    seen = converged_networks(networks)
    again = plan({}, {}, [], networks=networks, observed_networks=seen)
    assert again == []


def test_a_missing_bridge_is_made_again(repo: Path, tmp_path: Path) -> None:
    networks = desire_networks(spec_set(repo, tmp_path), HOST)
    seen = {n: replace_up(o) for n, o in converged_networks(networks).items()}
    actions = plan({}, {}, [], networks=networks, observed_networks=seen)
    assert [(a.kind, a.reason) for a in actions] == [
        ("CreateNetwork", f"its bridge {networks['backend'].bridge} is missing")
    ]


def replace_up(observed: ObservedNetwork) -> ObservedNetwork:
    return ObservedNetwork(observed.name, observed.record, bridge_up=False)


def test_a_changed_network_is_replaced_and_its_machines_restart(repo: Path, tmp_path: Path) -> None:
    before = spec_set(repo, tmp_path)
    after = spec_set(repo, tmp_path, SPECS.replace("10.70.0.0/24", "10.71.0.0/24"))
    old = desire(before, HOST, repo / "templates", SALTS)
    new = desire(after, HOST, repo / "templates", SALTS)
    assert old["web"].config_hash != new["web"].config_hash
    networks = desire_networks(after, HOST)
    seen = converged_networks(desire_networks(before, HOST))
    actions = plan({}, {}, [], networks=networks, observed_networks=seen)
    assert [type(a) for a in actions] == [ReplaceNetwork]


def networked(repo: Path, tmp_path: Path, text: str) -> tuple[dict[str, Observed], Desired]:
    """A running web as the first apply of SPECS leaves it (at 10.70.0.2),
    and the desired state of text."""
    first = desire(spec_set(repo, tmp_path, SPECS), HOST, repo / "templates", SALTS)["web"]
    record = MachineRecord(
        name="web",
        config_hash=first.config_hash,
        layers=first.layer_keys,
        files={str(f.path): file_hash(f.content) for f in first.files},
        address="10.70.0.2",
        network="backend",
        run=first.run,
        spec=first.machine,
    )
    seen = Observed(
        "web",
        record,
        root=first.layer_keys,
        root_mode=first.machine.rootfs,
        files=record.files,
        status=Status("web", RunState.RUNNING, pid=100),
    )
    want = desire(spec_set(repo, tmp_path, text), HOST, repo / "templates", SALTS)["web"]
    return {"web": seen}, want


def machine_plan(repo: Path, tmp_path: Path, text: str) -> list[tuple[str, str]]:
    observed, want = networked(repo, tmp_path, text)
    built = [layer.key for layer in want.layers]
    return [(a.kind, a.reason) for a in plan({"web": want}, observed, built)]


def test_a_change_of_ports_alone_is_made_in_place(repo: Path, tmp_path: Path) -> None:
    assert machine_plan(repo, tmp_path, SPECS) == []
    moved = SPECS.replace('"8080:80"', '"127.0.0.1:8081:80", "[::1]:8081:80/udp"')
    assert machine_plan(repo, tmp_path, moved) == [
        ("UpdatePorts", "ports: +127.0.0.1:8081:80/tcp, +[::1]:8081:80/udp, -8080:80/tcp")
    ]
    # Taken in: the record holds the new ports, and nothing is left to do.
    observed, want = networked(repo, tmp_path, moved)
    record = observed["web"].record
    assert record is not None
    updated = {"web": replace(observed["web"], record=replace(record, spec=want.machine))}
    assert plan({"web": want}, updated, [layer.key for layer in want.layers]) == []
    # With a restart for another reason, the restart takes the ports in.
    both = moved.replace("[sleep, infinity]", "[sleep, '3600']")
    kinds = [kind for kind, _ in machine_plan(repo, tmp_path, both)]
    assert "RestartMachine" in kinds and "UpdatePorts" not in kinds


def test_pinning_the_address_a_machine_has_is_no_change(repo: Path, tmp_path: Path) -> None:
    assert machine_plan(repo, tmp_path, SPECS + "address: 10.70.0.2\n") == []
    assert machine_plan(repo, tmp_path, SPECS + "address: 10.70.0.9\n") == [
        ("RestartMachine", "address: 10.70.0.2 -> 10.70.0.9")
    ]


def test_prune_removes_only_recorded_networks_after_machines() -> None:
    record = NetworkRecord("old", "pmbr-old", "h", net(name="old"))
    observed = {
        "old": ObservedNetwork("old", record, bridge_up=True),
        "handmade": ObservedNetwork("handmade", None, bridge_up=True),
    }
    machine = MachineRecord(name="m", config_hash="h", layers=())
    machines = {"m": Observed("m", record=machine)}
    assert plan({}, machines, [], observed_networks=observed) == []
    actions = plan({}, machines, [], prune=True, observed_networks=observed)
    assert [(a.kind, a.machine) for a in actions] == [
        ("RemoveMachine", "m"),
        ("RemoveNetwork", "old"),
    ]
    assert isinstance(actions[-1], RemoveNetwork)


def test_network_records_round_trip() -> None:
    record = NetworkRecord("lab", "pmbr-1", "abc", net(name="lab"), created="now")
    text = json.dumps(stored(record))
    assert parse_network_record(text, Path("lab.json")) == record
    assert json.loads(text)["spec"]["subnet"] == str(record.spec.subnet)
    assert (json.loads(text)["version"], json.loads(text)["kind"]) == (1, "network")


# -- addresses held on record --------------------------------------------------


def test_a_declared_address_held_by_another_machine_is_reported_with_its_line(
    repo: Path, tmp_path: Path
) -> None:
    specs = spec_set(repo, tmp_path, SPECS + "address: 10.70.0.2\n")
    holder = MachineRecord("db", "h", (), address="10.70.0.2", network="backend")
    problems = check_recorded_addresses(specs, [holder])
    assert [(p.line, p.field) for p in problems] == [(10, "address")]
    assert "10.70.0.2 is already the address of machine 'db'" in problems[0].message
    # Its own record, or another network, is no clash.
    mine = MachineRecord("web", "h", (), address="10.70.0.2", network="backend")
    elsewhere = MachineRecord("db", "h", (), address="10.70.0.2", network="other")
    assert check_recorded_addresses(specs, [mine, elsewhere]) == []


# -- the CLI -------------------------------------------------------------------


def test_network_ls_and_inspect_read_the_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from pymachined.state import StateStore
    from tests.unit.test_cli import run_cli

    layout = Layout(PurePosixPath(tmp_path))
    store = StateStore(layout)
    spec = net(subnet6="fd00:70::/64")
    store.put_network(NetworkRecord("backend", "pmbr-test", "h", spec, created="then"))
    store.put(MachineRecord("web", "h", (), address="10.70.0.2", network="backend"))
    store.put(MachineRecord("solo", "h", ()))
    monkeypatch.setenv("PYMACHINE_ROOT", str(tmp_path))
    code, out, _ = run_cli(monkeypatch, capsys, "network", "ls")
    assert code == 0
    assert out.split("\n")[1].split() == [
        "backend",
        "pmbr-test",
        "10.70.0.0/24",
        "fd00:70::/64",
        "10.70.0.1",
        "web=10.70.0.2",
    ]
    code, out, _ = run_cli(monkeypatch, capsys, "network", "inspect", "backend", "-o", "json")
    doc = json.loads(out)
    assert doc["machines"] == [
        {
            "name": "web",
            "address": "10.70.0.2",
            "interface": netplan.veth_name(layout, "web"),
            "attached": False,
        }
    ]
    code, _, err = run_cli(monkeypatch, capsys, "network", "inspect", "nope")
    assert code == 1 and "no network named 'nope'" in err


def test_an_undeclared_network_on_record_keeps_its_subnet_and_bridge_until_pruned(
    repo: Path, tmp_path: Path
) -> None:
    declared = spec_set(
        repo, tmp_path, "kind: network\nname: new\nsubnet: 10.9.0.0/24\nbridge: br-lab\n"
    )

    def held(subnet: str, bridge: str) -> NetworkRecord:
        spec = Network.model_validate({"kind": "network", "name": "old", "subnet": subnet})
        return NetworkRecord("old", bridge, "h", spec)

    [overlap] = check_recorded_networks(declared, [held("10.9.0.0/16", "pmbr-x")], prune=False)
    assert overlap.field == "subnet" and overlap.line == 3  # the subnet: line
    assert "10.9.0.0/24 overlaps 10.9.0.0/16 of network 'old'" in overlap.message
    [bridge] = check_recorded_networks(declared, [held("10.8.0.0/24", "br-lab")], prune=False)
    assert bridge.field == "bridge"
    assert check_recorded_networks(declared, [held("10.9.0.0/16", "br-lab")], prune=True) == []
    assert check_recorded_networks(declared, [held("10.8.0.0/24", "pmbr-x")], prune=False) == []


def test_a_machines_mac_is_stable_distinct_local_and_unicast() -> None:
    mac = netplan.mac_address(HOST, "backend", "web")
    assert mac == netplan.mac_address(HOST, "backend", "web")
    others = {
        netplan.mac_address(HOST, "backend", "db"),
        netplan.mac_address(HOST, "frontend", "web"),
        netplan.mac_address(TRIAL, "backend", "web"),
        netplan.mac_address(HOST, "backendweb", ""),
    }
    assert mac not in others and len(others) == 4
    for each in (mac, *others):
        first = int(each.split(":")[0], 16)
        assert first & 0x02 and not first & 0x01, each  # locally administered, unicast
        assert len(bytes.fromhex(each.replace(":", ""))) == 6


def test_announcements_name_the_machines_address_and_mac() -> None:
    mac = "02:11:22:33:44:55"
    frame = netplan.gratuitous_arp(mac, A("10.232.0.7"))
    assert frame.hex() == (
        "ffffffffffff" "021122334455" "0806"  # broadcast, from the machine, ARP
        "0001" "0800" "06" "04" "0001"  # Ethernet, IPv4, a request
        "021122334455" "0ae80007"  # sender: the machine
        "000000000000" "0ae80007"  # target: its own address
    )  # fmt: skip
    advert = netplan.neighbour_advertisement(mac, ipaddress.IPv6Address("fd42:232::7"))
    assert advert[0] == 136 and advert[4] & 0x20  # a neighbour advertisement, override
    assert advert[8:24] == ipaddress.IPv6Address("fd42:232::7").packed
    assert advert[24:] == bytes.fromhex("0201021122334455")


def test_namespaces_let_machines_bind_low_ports_and_announce_themselves() -> None:
    assert ("net/ipv4/ip_unprivileged_port_start", "0") in netplan.NAMESPACE_SYSCTLS
    assert dict(netplan.interface_sysctls("eth0")) == {
        "net/ipv4/conf/eth0/arp_notify": "1",
        "net/ipv6/conf/eth0/ndisc_notify": "1",
    }
