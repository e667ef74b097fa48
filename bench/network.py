"""Benchmarks of machine networking, each with a baseline measured in the same run. As root.

- network setup per machine (namespace, veth pair on the bridge, addresses,
  routes, loopback) with ``network.attach``, beside the same setup done by a
  bare loop of ``ip`` commands;
- 50 machines on one bridge: attaching all of them, rewriting the nft table
  with a port forward each, and every machine reaching the first one over TCP
  (from inside its namespace);
- teardown per machine with ``network.detach``.

Everything is made under a private root (its own bridge names and nft table)
and removed at the end.

    .venv/bin/python bench/network.py [--machines 50] [--json FILE]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path, PurePosixPath

from pymachined import network
from pymachined.core import netplan
from pymachined.core.layout import Layout
from pymachined.core.records import MachineRecord, NetworkRecord
from pymachined.core.spec import Machine, Network
from pymachined.state import StateStore

TARGET_SETUP_MS = 50.0


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def bare_setup(
    layout: Layout, name: str, bridge: str, address: str, gateway: str, prefix: int
) -> None:
    """The baseline: the same namespace and veth made with ip(8)."""
    ns = netplan.netns_name(layout, name)
    veth = f"bv{abs(hash(name)) % 10**10}"
    for argv in (
        ["ip", "netns", "add", ns],
        ["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns],
        ["ip", "link", "set", veth, "master", bridge, "up"],
        ["ip", "-n", ns, "link", "set", "lo", "up"],
        ["ip", "-n", ns, "addr", "add", f"{address}/{prefix}", "dev", "eth0"],
        ["ip", "-n", ns, "link", "set", "eth0", "up"],
        ["ip", "-n", ns, "route", "add", "default", "via", gateway],
    ):
        subprocess.run(argv, check=True)
    subprocess.run(["ip", "link", "del", veth], check=True)
    subprocess.run(["ip", "netns", "del", ns], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machines", type=int, default=50)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="pymachine-bench-net-"))
    layout = Layout(PurePosixPath(root))
    state = StateStore(layout)
    tag = f"pmb{os.getpid() % 100000}"
    spec = Network.model_validate(
        {"kind": "network", "name": f"{tag}-net", "subnet": "10.214.0.0/24", "nat": False}
    )
    names = [f"{tag}-m{i:02d}" for i in range(args.machines)]
    results: dict[str, object] = {}
    made: list[str] = []
    try:
        start = time.perf_counter()
        import pyroute2  # noqa: F401 - timed apart from the bridge

        results["pyroute2_import_ms"] = ms(time.perf_counter() - start)
        start = time.perf_counter()
        bridge = network.create_bridge(layout, spec)
        results["bridge_ms"] = ms(time.perf_counter() - start)
        state.put_network(NetworkRecord(spec.name, bridge, "", spec))

        baseline = []
        for i in range(10):
            start = time.perf_counter()
            bare_setup(layout, f"{tag}-b{i}", bridge, f"10.214.0.{200 + i}", "10.214.0.1", 24)
            baseline.append(time.perf_counter() - start)

        setup = []
        for index, name in enumerate(names):
            address = ipaddress.IPv4Address(f"10.214.0.{10 + index}")
            start = time.perf_counter()
            network.attach(layout, name, spec, address)
            setup.append(time.perf_counter() - start)
            made.append(name)
            state.put(
                MachineRecord(
                    name,
                    "",
                    (),
                    address=str(address),
                    network=spec.name,
                    spec=Machine.model_validate(
                        {
                            "name": name,
                            "command": ["true"],
                            "network": spec.name,
                            "ports": [f"{20000 + index}:80"],
                        }
                    ),
                )
            )
        start = time.perf_counter()
        script = network.sync_rules(layout, state)
        rules = time.perf_counter() - start

        server = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                netplan.netns_name(layout, names[0]),
                sys.executable,
                "-c",
                "import socket\ns=socket.create_server(('0.0.0.0',7000))\n"
                "while True: s.accept()[0].close()",
            ],
        )
        time.sleep(0.3)
        reached = 0
        for name in names[1:]:
            probe = subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    netplan.netns_name(layout, name),
                    sys.executable,
                    "-c",
                    "import socket; socket.create_connection(('10.214.0.10', 7000), timeout=2)",
                ],
                check=False,
            )
            reached += probe.returncode == 0
        server.kill()
        server.wait()

        teardown = []
        for name in list(made):
            start = time.perf_counter()
            network.detach(layout, name)
            teardown.append(time.perf_counter() - start)
            made.remove(name)

        setup_median = statistics.median(setup)
        base_median = statistics.median(baseline)
        results.update(
            {
                "machines": len(names),
                "setup_median_ms": ms(setup_median),
                "setup_max_ms": ms(max(setup)),
                "setup_total_ms": ms(sum(setup)),
                "ip_baseline_median_ms": ms(base_median),
                "setup_vs_ip_baseline": round(setup_median / base_median, 2),
                "nft_rewrite_ms": ms(rules),
                "nft_rules": script.count("dnat"),
                "reached": f"{reached}/{len(names) - 1}",
                "teardown_median_ms": ms(statistics.median(teardown)),
                "target_setup_ms": TARGET_SETUP_MS,
                "target_met": setup_median * 1000 < TARGET_SETUP_MS and reached == len(names) - 1,
            }
        )
    finally:
        for name in made:
            network.detach(layout, name)
        record = state.network(spec.name)
        if record is not None:
            network.remove_bridge(layout, record)
            state.delete_network(spec.name)
        for name in names:
            state.delete(name)
        network.sync_rules(layout, state)  # no networks left: the table goes
        subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=False)
    for key, value in results.items():
        print(f"{key:24} {value}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if results.get("target_met") else 1


if __name__ == "__main__":
    sys.exit(main())
