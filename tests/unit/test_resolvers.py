"""Names on declared networks on paper: hosts files, resolv.conf, the resolver's
command line, its nft chain, and a dead resolver as drift in the plan."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path, PurePosixPath

from pymachined.core import names, netplan
from pymachined.core.commands import resolver_argv, transient_service_argv
from pymachined.core.desired import desire_networks
from pymachined.core.layout import Layout
from pymachined.core.plan import plan
from pymachined.core.spec import Network
from tests.unit.test_netplan import converged_networks, spec_set

A = ipaddress.IPv4Address


def net(**fields: object) -> Network:
    return Network.model_validate(
        {"kind": "network", "name": "backend", "subnet": "10.70.0.0/24", **fields}
    )


def test_hosts_file_names_each_machine_and_its_hostname_on_both_families() -> None:
    network = net(subnet6="fd42:70::/64")
    entries = [
        names.entry(network, "web", A("10.70.0.3"), "www.example.test"),
        names.entry(network, "db", A("10.70.0.2"), None),
        names.entry(network, "cache", A("10.70.0.4"), "cache"),  # its own name: once
    ]
    assert names.hosts_text("backend", entries) == (
        "# pymachine: the machines on network backend\n"
        "10.70.0.4 cache\n"
        "fd42:70::4 cache\n"
        "10.70.0.2 db\n"
        "fd42:70::2 db\n"
        "10.70.0.3 web www.example.test\n"
        "fd42:70::3 web www.example.test\n"
    )
    assert names.hosts_text("empty", []) == "# pymachine: the machines on network empty\n"
    v4only = names.entry(net(), "db", A("10.70.0.2"), None)
    assert names.hosts_text("backend", [v4only]).splitlines()[1:] == ["10.70.0.2 db"]


def test_machines_ask_their_gateway_and_the_resolver_listens_there_only() -> None:
    assert names.resolv_conf_text(net()) == (
        "# pymachine: the resolver of network backend\nnameserver 10.70.0.1\n"
    )
    dual = net(subnet6="fd42:70::/64", gateway="10.70.0.254")
    assert names.listen_addresses(dual) == ["10.70.0.254", "fd42:70::fe"]
    assert names.resolv_conf_text(dual).splitlines()[1:] == [
        "nameserver 10.70.0.254",
        "nameserver fd42:70::fe",
    ]


def test_resolver_files_are_host_wide_and_scoped_by_root() -> None:
    assert names.names_dir(Layout(), "backend") == PurePosixPath("/run/pymachine/names/backend")
    trial = Layout(PurePosixPath("/tmp/trial-root"))
    scoped = names.names_dir(trial, "backend")
    assert scoped == PurePosixPath(f"/run/pymachine-{trial.scope}/names/backend")
    # Never a machine's unit: machine names have no dot.
    assert names.resolver_unit("backend") == "pymachine-names.backend.service"


def test_resolver_argv() -> None:
    argv = resolver_argv(
        PurePosixPath("/run/pymachine/names/backend"),
        ["10.70.0.1", "fd42:70::1"],
        PurePosixPath("/etc/resolv.conf"),
    )
    assert argv == [
        "dnsmasq",
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--bind-dynamic",
        "--listen-address=10.70.0.1",
        "--listen-address=fd42:70::1",
        "--no-hosts",
        "--hostsdir=/run/pymachine/names/backend/hosts.d",
        "--resolv-file=/etc/resolv.conf",
        "--domain-needed",
        "--bogus-priv",
        "--pid-file=/run/pymachine/names/backend/pid",
        "--log-facility=-",
    ]
    assert not any(a.startswith(("--dhcp", "--interface", "--user")) for a in argv)
    # A network without NAT: its machines' names only, nothing forwarded.
    closed = resolver_argv(PurePosixPath("/run/x"), ["10.70.0.1"], None)
    assert "--no-resolv" in closed and not any(a.startswith("--resolv-file") for a in closed)
    assert transient_service_argv("u.service", ["dnsmasq", "-k"]) == [
        "systemd-run",
        "--quiet",
        "--collect",
        "--unit=u.service",
        "--property=Restart=always",
        "--property=RestartSec=200ms",
        "--",
        "dnsmasq",
        "-k",
    ]


def test_dns_to_a_gateway_from_any_other_interface_is_dropped() -> None:
    bridges = [
        netplan.Bridge(
            "a",
            "br-a",
            ipaddress.IPv4Network("10.70.0.0/24"),
            None,
            False,
            ("10.70.0.1", "fd42:70::1"),
        ),
        netplan.Bridge(
            "b", "br-b", ipaddress.IPv4Network("10.71.0.0/24"), None, False, ("10.71.0.1",)
        ),
    ]
    script = netplan.ruleset("pymachine", bridges, [])
    chain = script.split("chain resolvers {", 1)[1].split("}\n", 1)[0]
    assert "type filter hook prerouting priority raw; policy accept;" in chain
    assert (
        'iifname != { "lo", "br-a" } ip daddr 10.70.0.1 meta l4proto { tcp, udp } th dport 53 drop'
        in chain
    )
    assert 'iifname != { "lo", "br-a" } ip6 daddr fd42:70::1' in chain
    assert 'iifname != { "lo", "br-b" } ip daddr 10.71.0.1' in chain
    # Bridges without a resolver (as callers that give none) get no chain.
    plain = [dataclasses.replace(b, resolver=()) for b in bridges]
    assert "chain resolvers" not in netplan.ruleset("pymachine", plain, [])


def test_a_resolver_not_running_recreates_its_network_then_plans_nothing(
    repo: Path, tmp_path: Path
) -> None:
    networks = desire_networks(spec_set(repo, tmp_path), Layout())
    seen = converged_networks(networks)
    dead = {
        n: dataclasses.replace(o, resolver="its name resolver is not running")
        for n, o in seen.items()
    }
    actions = plan({}, {}, [], networks=networks, observed_networks=dead)
    assert [(a.kind, a.reason) for a in actions] == [
        ("CreateNetwork", "its name resolver is not running")
    ]
    assert plan({}, {}, [], networks=networks, observed_networks=seen) == []
