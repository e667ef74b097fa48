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


UPLINK_UNIT = """\
[Unit]
Description=Upstream resolvers, where systemd-resolved would list them
DefaultDependencies=no
Before=sysinit.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/mkdir -p /run/systemd/resolve
ExecStart=/bin/sh -c 'echo nameserver 10.217.0.53 >/run/systemd/resolve/resolv.conf'

[Install]
WantedBy=sysinit.target
"""


def _serving(host: BootedHost, when: str) -> None:
    """Both machines' units active, srv's ports answering on 127.0.0.1 and ::1
    (DNAT and forwarder), and cli reaching srv over the network."""
    for unit in ("pymachine-srv.service", "pymachine-cli.service"):
        host.wait_for(f"{unit} active {when}", lambda unit=unit: _active(host, unit), timeout=60)
    for url in ("http://127.0.0.1:18217/", "http://[::1]:18217/"):
        host.wait_for(
            f"{url} answering {when}",
            lambda url=url: (
                host.run(["python3", "-c", FETCH, url], check=False).stdout.strip() == "200"
            ),
            timeout=60,
        )
    probe = "import socket; socket.create_connection(('10.217.0.10', 8080), timeout=3)"
    host.run(["ip", "netns", "exec", "pm-cli", "python3", "-c", probe])


def test_networked_machines_under_systemd(make_host: MakeHost) -> None:
    host = make_host(SPEC_DIR)
    # The inner host resolves through a stub on its loopback, as with
    # systemd-resolved, which lists the upstream servers in /run at each boot:
    # machines get that list.
    host.run(["sh", "-c", "rm -f /etc/resolv.conf && echo nameserver 127.0.0.53 >/etc/resolv.conf"])
    host.write("/etc/systemd/system/uplink-resolvers.service", UPLINK_UNIT)
    host.run(["systemctl", "daemon-reload"])
    host.run(["systemctl", "enable", "--now", "uplink-resolvers.service"])

    host.run(["pymachine", "apply", "--yes", SPECS])
    _serving(host, "after apply")
    resolvers = host.run(["pymachine", "exec", "cli", "--", "cat", "/etc/resolv.conf"]).stdout
    assert resolvers == "nameserver 10.217.0.53\n", resolvers
    ls = host.run(["pymachine", "network", "ls"]).stdout
    assert "cli=10.217.0.2" in ls and "srv=10.217.0.10" in ls, ls
    assert host.run(["pymachine", "plan", SPECS], check=False).returncode == 0

    # srv's root is made again (another rootfs mode): stopping its unit stops
    # cli's too (Requires=), and apply starts both again.
    spec = host.run(["cat", f"{SPECS}/net.yaml"]).stdout
    host.write(f"{SPECS}/net.yaml", spec.replace("name: srv\n", "name: srv\nrootfs: copy\n"))
    out = host.run(["pymachine", "apply", "--yes", SPECS]).stdout
    assert "replace the root of srv: rootfs: overlay -> copy" in out, out
    assert "restart cli: srv, which it needs, is stopped on the way" in out, out
    _serving(host, "after srv's root was made again")
    assert host.run(["pymachine", "plan", SPECS], check=False).returncode == 0

    # Power off and boot, with no apply at boot: each machine's unit makes its
    # bridge, namespace, rules and IPv6 forwarders again as it starts.
    host.poweroff()
    host.boot()
    _serving(host, "after a boot")
    assert host.run(["pymachine", "plan", SPECS], check=False).returncode == 0
    # A restart by systemd alone (no pymachine) brings the forwarders back too.
    host.run(["systemctl", "restart", "pymachine-srv.service"])
    _serving(host, "after systemctl restart")

    # And with the boot-time apply, which the machines' units wait for until it
    # has written their files, then run beside it.
    host.run(["pymachine", "install", SPECS])
    host.poweroff()
    host.boot()
    _serving(host, "after a boot with pymachine-apply")
    host.wait_for(
        "pymachine-apply.service done",
        lambda: (
            host.show("pymachine-apply.service", "Result", "ExecMainStatus")
            == {"Result": "success", "ExecMainStatus": "0"}
        ),
        timeout=60,
    )
    assert host.run(["pymachine", "plan", SPECS], check=False).returncode == 0

    host.run(["pymachine", "uninstall"])
    host.run(["pymachine", "destroy", "--yes", "srv"])
    host.run(["pymachine", "destroy", "--yes", "cli"])
    host.run(["pymachine", "network", "rm", "lab"])
    assert "pm-" not in host.run(["ip", "netns"]).stdout
    assert "pymachine" not in host.run(["nft", "list", "tables"]).stdout
