"""Networks under systemd: machines on a declared network run as units that
enter their namespace, reach each other and publish ports on the inner host's
loopback. The inner host has a private network, so its bridges and nft table
never meet the outer host's."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.conftest import MakeHost
from tests.e2e.harness import VENV, BootedHost

pytestmark = pytest.mark.e2e

SPECS = "/root/specs"
SPEC_DIR = Path(__file__).resolve().parent / "network_specs"
FETCH = "import sys, urllib.request\nprint(urllib.request.urlopen(sys.argv[1], timeout=5).status)\n"


def _active(host: BootedHost, unit: str) -> bool:
    return host.show(unit, "ActiveState")["ActiveState"] == "active"


# A DNS server on the inner host's loopback (where systemd-resolved's stub
# would be), answering one outward name; the machines reach it only through
# their network's resolver.
UPSTREAM = """\
import socket, struct
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("127.0.0.53", 53))
while True:
    data, peer = sock.recvfrom(512)
    end = data.index(b"\\0", 12) + 5
    qtype = struct.unpack(">H", data[end - 4 : end - 2])[0]
    hit = b"\\x07outward\\x07example\\0" in data[12:end] and qtype == 1
    answer = struct.pack(">HHHIH", 0xC00C, 1, 1, 60, 4) + bytes([10, 217, 99, 99]) if hit else b""
    head = data[:2] + struct.pack(">HHHHH", 0x8180, 1, 1 if hit else 0, 0, 0)
    sock.sendto(head + data[12:end] + answer, peer)
"""

UPSTREAM_UNIT = """\
[Unit]
Description=An upstream resolver on loopback, as systemd-resolved's stub is

[Service]
ExecStart=/usr/bin/python3 /root/upstream.py

[Install]
WantedBy=multi-user.target
"""

RESOLVER = "pymachine-names.lab.service"


def _getent(host: BootedHost, machine: str, name: str) -> str:
    argv = ["pymachine", "exec", machine, "--", "getent", "ahostsv4", name]
    result = host.run(argv, check=False)
    return result.stdout.split()[0] if result.returncode == 0 else f"exit {result.returncode}"


def _names(host: BootedHost, when: str) -> None:
    """The machines resolve each other by name through lab's resolver, a unit."""
    host.wait_for(f"{RESOLVER} active {when}", lambda: _active(host, RESOLVER), timeout=30)
    assert _getent(host, "cli", "srv") == "10.217.0.10", when
    assert _getent(host, "srv", "cli") == "10.217.0.2", when


# A client of [::1]:18217 in a unit of the inner host (inside its cgroup tree,
# as an operator's programs are): where its socket is connected.
PEER = """\
import socket
with socket.create_connection(("::1", 18217), timeout=5) as sock:
    print(sock.getpeername()[0])
"""
# The inner host's [::1] connect redirect: the ports in its map.
REDIRECTS = (
    "from pymachined import sockredirect\n"
    "group = sockredirect.unified_root()\n"
    "print(sorted(sockredirect.held(group)) if group else 'no unified tree')\n"
)


def _redirected(host: BootedHost, when: str) -> None:
    """srv's [::1] port is in the inner host's redirect, and a client in a
    unit is connected to srv's IPv6 address itself, not to its relay."""
    held = host.run([f"{VENV}/bin/python", "-c", REDIRECTS]).stdout.strip()
    assert held == "[18217]", f"{when}: {held}"
    argv = ["systemd-run", "--wait", "--pipe", "--quiet", "python3", "-c", PEER]
    assert host.run(argv).stdout.strip() == "fd42:217::a", when


def _serving(host: BootedHost, when: str) -> None:
    """Both machines' units active, srv's ports answering on 127.0.0.1 and ::1
    (DNAT and the connect redirect), and cli reaching srv over the network."""
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
    _redirected(host, when)


def test_networked_machines_under_systemd(make_host: MakeHost) -> None:
    host = make_host(SPEC_DIR)
    # The inner host resolves only through a server on its loopback, as with
    # systemd-resolved's stub: machines still resolve outward names, through
    # their network's resolver on the host.
    host.run(["sh", "-c", "rm -f /etc/resolv.conf && echo nameserver 127.0.0.53 >/etc/resolv.conf"])
    host.write("/root/upstream.py", UPSTREAM)
    host.write("/etc/systemd/system/upstream.service", UPSTREAM_UNIT)
    host.run(["systemctl", "daemon-reload"])
    host.run(["systemctl", "enable", "--now", "upstream.service"])

    host.run(["pymachine", "apply", "--yes", SPECS])
    _serving(host, "after apply")
    resolvers = host.run(["pymachine", "exec", "cli", "--", "cat", "/etc/resolv.conf"]).stdout
    assert resolvers.splitlines()[1:] == ["nameserver 10.217.0.1", "nameserver fd42:217::1"]
    _names(host, "after apply")
    assert _getent(host, "cli", "outward.example") == "10.217.99.99"
    # A resolver killed: systemd starts it again, and the names come back.
    killed = host.show(RESOLVER, "MainPID")["MainPID"]
    host.run(["python3", "-c", "import os, sys; os.kill(int(sys.argv[1]), 9)", killed])
    host.wait_for(
        "the resolver restarted by systemd",
        lambda: host.show(RESOLVER, "MainPID")["MainPID"] not in ("0", killed),
        timeout=30,
    )
    _names(host, "after the resolver was killed")
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
    _names(host, "after srv's root was made again")
    assert host.run(["pymachine", "plan", SPECS], check=False).returncode == 0

    # Power off and boot, with no apply at boot: each machine's unit makes its
    # bridge, namespace, rules and IPv6 forwarders again as it starts.
    host.poweroff()
    host.boot()
    _serving(host, "after a boot")
    _names(host, "after a boot")
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
            host.show("pymachine-apply.service", "ActiveState", "Result", "ExecMainStatus")
            == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
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
    assert host.run([f"{VENV}/bin/python", "-c", REDIRECTS]).stdout.strip() == "[]"
    assert host.show(RESOLVER, "LoadState")["LoadState"] == "not-found"
