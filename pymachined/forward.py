"""A port forwarder: ``python -m pymachined.forward tcp|udp FD ADDRESS PORT MACHINE``.

For tcp, it accepts on the listening socket it inherits as FD and relays each
connection to ADDRESS:PORT; for udp, it relays each datagram from a client
through a socket of that client's own to ADDRESS:PORT, and the replies back
(a client's socket closes after UDP_IDLE seconds without a reply).

pymachine runs one per IPv6 port forward, since the kernel cannot DNAT
``::1`` to another host, and IPv6 reaches a machine's IPv4 address this way.
MACHINE only names the process for ``ps`` and for the check before it is
stopped.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading

UDP_IDLE = 60.0


def _pump(source: socket.socket, sink: socket.socket) -> None:
    """Copy source to sink until source ends, then end sink's writing side."""
    with contextlib.suppress(OSError):
        while True:
            data = source.recv(65536)
            if not data:
                break
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


def _relay(client: socket.socket, target: tuple[str, int]) -> None:
    """One connection, both ways."""
    with client:
        try:
            upstream = socket.create_connection(target, timeout=10)
        except OSError as exc:
            print(f"cannot reach {target[0]}:{target[1]}: {exc}", file=sys.stderr, flush=True)
            return
        with upstream:
            upstream.settimeout(None)
            back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
            back.start()
            _pump(client, upstream)
            back.join()


def _udp_replies(
    listener: socket.socket,
    upstream: socket.socket,
    client: tuple[str, int, int, int],
    clients: dict[tuple[str, int, int, int], socket.socket],
    lock: threading.Lock,
) -> None:
    """Send a client's replies back until it is idle for UDP_IDLE seconds."""
    upstream.settimeout(UDP_IDLE)
    with contextlib.suppress(OSError):
        while True:
            listener.sendto(upstream.recv(65535), client)
    with lock:
        clients.pop(client, None)
    upstream.close()


def _relay_udp(listener: socket.socket, target: tuple[str, int]) -> None:
    clients: dict[tuple[str, int, int, int], socket.socket] = {}
    lock = threading.Lock()
    while True:
        data, client = listener.recvfrom(65535)
        with lock:
            upstream = clients.get(client)
            if upstream is None:
                upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                upstream.connect(target)
                clients[client] = upstream
                threading.Thread(
                    target=_udp_replies,
                    args=(listener, upstream, client, clients, lock),
                    daemon=True,
                ).start()
        with contextlib.suppress(OSError):
            upstream.send(data)


def main(argv: list[str] | None = None) -> int:
    """Relay forever."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 5 or args[0] not in ("tcp", "udp"):
        print(__doc__, file=sys.stderr)
        return 2
    protocol, fd, address, port = args[0], int(args[1]), args[2], int(args[3])
    target = (address, port)
    if protocol == "udp":
        _relay_udp(socket.socket(fileno=fd), target)
        return 0
    listener = socket.socket(fileno=fd)
    while True:
        client, _ = listener.accept()
        threading.Thread(target=_relay, args=(client, target), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
