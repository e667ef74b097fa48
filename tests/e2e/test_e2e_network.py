"""Networks under systemd: machines on a declared network run as units that
enter their namespace, reach each other and publish ports on the inner host's
loopback. The inner host has a private network, so its bridges and nft table
never meet the outer host's."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.conftest import MakeHost
from tests.e2e.harness import BootedHost

pytestmark = pytest.mark.e2e

SPECS = "/root/specs"
SPEC_DIR = Path(__file__).resolve().parent / "network_specs"
FETCH = "import sys, urllib.request\nprint(urllib.request.urlopen(sys.argv[1], timeout=5).status)\n"


def _active(host: BootedHost, unit: str) -> bool:
    return host.show(unit, "ActiveState")["ActiveState"] == "active"


def test_networked_machines_under_systemd(make_host: MakeHost) -> None:
    host = make_host(SPEC_DIR)
    # The inner host resolves through a stub on its loopback, as with
    # systemd-resolved: machines get resolved's upstream list instead.
    stub = (
        "rm -f /etc/resolv.conf && printf 'nameserver 127.0.0.53\\noptions edns0\\n' "
        ">/etc/resolv.conf && mkdir -p /run/systemd/resolve && "
        "echo nameserver 10.217.0.53 >/run/systemd/resolve/resolv.conf"
    )
    host.run(["sh", "-c", stub])
    host.run(["pymachine", "apply", "--yes", SPECS])
    for unit in ("pymachine-srv.service", "pymachine-cli.service"):
        host.wait_for(f"{unit} active", lambda unit=unit: _active(host, unit), timeout=60)
    for url in ("http://127.0.0.1:18217/", "http://[::1]:18217/"):
        host.wait_for(
            f"{url} answering",
            lambda url=url: (
                host.run(["python3", "-c", FETCH, url], check=False).stdout.strip() == "200"
            ),
            timeout=60,
        )
    probe = "import socket; socket.create_connection(('10.217.0.10', 8080), timeout=3)"
    host.run(["ip", "netns", "exec", "pm-cli", "python3", "-c", probe])
    resolvers = host.run(["pymachine", "exec", "cli", "--", "cat", "/etc/resolv.conf"]).stdout
    assert resolvers == "nameserver 10.217.0.53\n", resolvers
    ls = host.run(["pymachine", "network", "ls"]).stdout
    assert "cli=10.217.0.2" in ls and "srv=10.217.0.10" in ls, ls
    assert host.run(["pymachine", "plan", SPECS], check=False).returncode == 0

    # Power off and boot, with no apply at boot: each machine's unit makes its
    # bridge, namespace, rules and IPv6 forwarders again as it starts.
    host.poweroff()
    host.boot()
    host.run(["sh", "-c", stub])  # what resolved would write again at boot
    for unit in ("pymachine-srv.service", "pymachine-cli.service"):
        host.wait_for(f"{unit} active after boot", lambda unit=unit: _active(host, unit), 60)
    for url in ("http://127.0.0.1:18217/", "http://[::1]:18217/"):
        host.wait_for(
            f"{url} answering after boot",
            lambda url=url: (
                host.run(["python3", "-c", FETCH, url], check=False).stdout.strip() == "200"
            ),
            timeout=60,
        )
    host.run(["ip", "netns", "exec", "pm-cli", "python3", "-c", probe])
    assert host.run(["pymachine", "plan", SPECS], check=False).returncode == 0
    # A restart by systemd alone (no pymachine) keeps the forwarders.
    host.run(["systemctl", "restart", "pymachine-srv.service"])
    host.wait_for(
        "[::1]:18217 answering after a restart",
        lambda: (
            host.run(["python3", "-c", FETCH, "http://[::1]:18217/"], check=False).stdout.strip()
            == "200"
        ),
        timeout=60,
    )

    host.run(["pymachine", "destroy", "--yes", "srv"])
    host.run(["pymachine", "destroy", "--yes", "cli"])
    host.run(["pymachine", "network", "rm", "lab"])
    assert "pm-" not in host.run(["ip", "netns"]).stdout
    assert "pymachine" not in host.run(["nft", "list", "tables"]).stdout
