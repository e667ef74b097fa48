"""A port forwarder: ``python -m pymachined.forward tcp|udp FD ADDRESS PORT MACHINE``.

For tcp, it accepts on the listening socket it inherits as FD and relays each
connection to ADDRESS:PORT; for udp, it relays each datagram from a client
through a socket of that client's own to ADDRESS:PORT, and the replies back
(a client's socket closes after UDP_IDLE seconds without a reply).

pymachine runs one per IPv6 port forward, since the kernel cannot DNAT
``::1`` to another host, and IPv6 reaches a machine's IPv4 address this way.
MACHINE only names the process for ``ps`` and for the check before it is
stopped.

Bounded: at most ``clients_cap()`` clients at once (a TCP client past it is
closed at once, a UDP client's datagram dropped), and running out of file
descriptors or memory for one client is that client's failure: the forwarder
backs off a moment and goes on listening.
"""

from __future__ import annotations

import contextlib
import errno
import resource
import socket
import sys
import threading
import time

UDP_IDLE = 60.0
MAX_CLIENTS = 512
"""Clients relayed at once, at most: each takes two descriptors and a thread
or two, so a flood costs a bounded amount and the forwarder stays up."""
RESERVED_FDS = 16  # for the listener, stdio and what Python opens itself
BACKOFF_FIRST = 0.05
BACKOFF_MAX = 1.0
_EXHAUSTED = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
# What accept(2) reports of a connection that went away while it waited.
_GONE = frozenset((errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR))

threading.stack_size(256 * 1024)  # many small relays, not a few deep ones


def clients_cap() -> int:
    """How many clients this process can take at once under its descriptor limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CLIENTS
    return max(1, min(MAX_CLIENTS, (soft - RESERVED_FDS) // 2))


def _say(text: str) -> None:
    with contextlib.suppress(OSError):
        print(text, file=sys.stderr, flush=True)


class _Backoff:
    """Waits that double while descriptors run out, and start over once one is had."""

    def __init__(self) -> None:
        self.delay = 0.0

    def failed(self, exc: OSError) -> None:
        self.delay = min(BACKOFF_MAX, self.delay * 2 or BACKOFF_FIRST)
        if self.delay == BACKOFF_FIRST:
            _say(f"out of resources ({exc.strerror}); backing off")
        time.sleep(self.delay)

    def ok(self) -> None:
        self.delay = 0.0


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


def _relay(client: socket.socket, target: tuple[str, int], slots: threading.Semaphore) -> None:
    """One connection, both ways; its slot is given back at the end."""
    try:
        with client:
            try:
                upstream = socket.create_connection(target, timeout=10)
            except OSError as exc:
                _say(f"cannot reach {target[0]}:{target[1]}: {exc}")
                return
            with upstream:
                upstream.settimeout(None)
                back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
                try:
                    back.start()
                except RuntimeError:  # no thread to be had: this client is refused
                    return
                _pump(client, upstream)
                back.join()
    finally:
        slots.release()


def _relay_tcp(listener: socket.socket, target: tuple[str, int]) -> None:
    slots = threading.Semaphore(clients_cap())
    backoff = _Backoff()
    while True:
        try:
            client, _ = listener.accept()
        except OSError as exc:
            if exc.errno in _EXHAUSTED:
                backoff.failed(exc)
            elif exc.errno not in _GONE:
                raise
            continue
        backoff.ok()
        if not slots.acquire(blocking=False):
            client.close()  # full: refused at once, rather than kept waiting
            continue
        try:
            threading.Thread(target=_relay, args=(client, target, slots), daemon=True).start()
        except RuntimeError:
            client.close()
            slots.release()
            backoff.failed(OSError(errno.EAGAIN, "no more threads"))


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
    cap = clients_cap()
    backoff = _Backoff()
    while True:
        data, client = listener.recvfrom(65535)
        with lock:
            upstream = clients.get(client)
            if upstream is None:
                if len(clients) >= cap:
                    continue  # full: the datagram is dropped, as a full queue would
                try:
                    upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                except OSError as exc:
                    if exc.errno not in _EXHAUSTED:
                        raise
                    backoff.failed(exc)
                    continue
                backoff.ok()
                try:
                    upstream.connect(target)
                    threading.Thread(
                        target=_udp_replies,
                        args=(listener, upstream, client, clients, lock),
                        daemon=True,
                    ).start()
                except (OSError, RuntimeError):
                    upstream.close()
                    continue
                clients[client] = upstream
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
    listener = socket.socket(fileno=fd)
    if protocol == "udp":
        _relay_udp(listener, target)
    else:
        _relay_tcp(listener, target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
