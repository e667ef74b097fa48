"""A `packages:` layer built inside the booted systemd host, from a unit, with
apt fetching from the Debian mirror through the proxy the host is told of.

The inner host has no network. Its proxy (127.0.0.1:3142, a relay run as a
unit in it) reaches a unix socket in the host's shared directory, served from
outside by a tunnel that lets through only requests for the mirror's own host
(the one the images were bootstrapped from), on port 80, as a proxy would.
So the build runs for real (apt-get update and install in a derived layer,
under systemd as PID 1), and nothing else leaves the host.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.e2e.harness import SHARED, VENV, BootedHost

pytestmark = pytest.mark.e2e

MIRROR_HOSTS = frozenset({"deb.debian.org"})
SOCKET = "mirror.sock"
PROXY = "http://127.0.0.1:3142"
# Inside the host: each TCP connection to the proxy's port, relayed to the
# tunnel's unix socket.
RELAY = f"""
import socket, threading
def pump(a, b):
    try:
        while data := a.recv(65536):
            b.sendall(data)
    except OSError:
        pass
    finally:
        for s in (a, b):
            try: s.shutdown(socket.SHUT_RDWR)
            except OSError: pass
server = socket.create_server(("127.0.0.1", 3142))
while True:
    client, _ = server.accept()
    upstream = socket.socket(socket.AF_UNIX)
    upstream.connect("{SHARED}/{SOCKET}")
    threading.Thread(target=pump, args=(client, upstream), daemon=True).start()
    threading.Thread(target=pump, args=(upstream, client), daemon=True).start()
"""


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)


class MirrorTunnel:
    """The outside end: requests in absolute form (``GET http://HOST/...``, as
    apt sends them to a proxy) for a mirror host, passed to it unchanged
    (origin servers accept the absolute form); anything else refused."""

    def __init__(self, path: Path) -> None:
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(path))
        self.server.listen(16)
        self.hosts: list[str] = []
        self.refused: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(client,), daemon=True).start()

    def _one(self, client: socket.socket) -> None:
        head = b""
        while b"\r\n" not in head and len(head) < 8192:
            chunk = client.recv(8192)
            if not chunk:
                client.close()
                return
            head += chunk
        line = head.split(b"\r\n", 1)[0].decode(errors="replace")
        parts = line.split()
        target = urlsplit(parts[1]) if len(parts) == 3 else None
        if target is None or target.scheme != "http" or target.hostname not in MIRROR_HOSTS:
            self.refused.append(line)
            with contextlib.suppress(OSError):
                client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            client.close()
            return
        assert target.hostname is not None
        self.hosts.append(target.hostname)
        upstream = socket.create_connection((target.hostname, target.port or 80), timeout=60)
        upstream.sendall(head)
        threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()
        _pump(client, upstream)

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def tunnel(booted_host: BootedHost) -> Iterator[MirrorTunnel]:
    path = booted_host.shared / SOCKET
    path.unlink(missing_ok=True)
    served = MirrorTunnel(path)
    booted_host.run(
        ["systemd-run", "--unit=mirror-relay", "--quiet", f"{VENV}/bin/python3", "-c", RELAY]
    )
    try:
        yield served
    finally:
        booted_host.run(["systemctl", "stop", "mirror-relay.service"], check=False)
        served.close()
        path.unlink(missing_ok=True)


PACKAGED = """\
name: greeter
image: debian-bookworm-slim
packages: [hello]
command: [hello]
network: none
restart: "no"
"""
SPEC_DIR = "/root/packages-specs"


def test_a_packages_layer_builds_under_systemd_through_the_hosts_proxy(
    booted_host: BootedHost, tunnel: MirrorTunnel
) -> None:
    host = booted_host
    host.write(f"{SPEC_DIR}/greeter.yaml", PACKAGED)
    # Without the proxy the host reaches no mirror: the build fails, apply
    # says so and exits 1.
    unit = ["systemd-run", "--wait", "--pipe", "--quiet"]
    offline = host.run([*unit, "--", "pymachine", "apply", "--yes", SPEC_DIR], check=False)
    assert offline.returncode == 1, offline.stdout + offline.stderr
    assert "greeter" in offline.stderr and "failed" in offline.stderr, offline.stderr
    assert tunnel.hosts == []
    # With it, from a unit as the boot apply runs: apt-get update and install
    # run in the derived layer, under systemd as PID 1.
    proxied = host.run(
        [*unit, f"--setenv=http_proxy={PROXY}", "--", "pymachine", "apply", "--yes", SPEC_DIR],
        check=False,
        timeout=900,
    )
    assert proxied.returncode == 0, proxied.stdout + proxied.stderr
    assert "built" in proxied.stderr, proxied.stderr
    assert set(tunnel.hosts) == {"deb.debian.org"} and not tunnel.refused, tunnel.refused
    host.wait_for(
        "greeter's output",
        lambda: (
            "Hello, world!"
            in host.run(["journalctl", "-u", "pymachine-greeter.service", "--no-pager"]).stdout
        ),
    )
    # The layer is the spec's image plus its package, and the proxy is in no
    # part of it: a second apply builds nothing.
    images = json.loads(host.run(["pymachine", "image", "ls", "-o", "json"]).stdout)
    assert any(i["name"].startswith("debian-bookworm-slim-pkg-") for i in images), images
    again = host.run([*unit, "--", "pymachine", "apply", "--yes", SPEC_DIR])
    assert "build image" not in again.stdout + again.stderr, again.stdout + again.stderr
    host.run(["pymachine", "destroy", "--yes", "greeter"])
