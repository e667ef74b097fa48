"""A port forwarder: ``python -m pymachined.forward tcp|udp FD ADDRESS PORT MACHINE``.

For tcp, it accepts on the listening socket it inherits as FD and relays each
connection to ADDRESS:PORT; for udp, it relays each datagram from a client
through a socket of that client's own to ADDRESS:PORT, and the replies back
(a client's socket closes after UDP_IDLE seconds without a reply).

pymachine runs one per IPv6 port forward, since the kernel cannot DNAT
``::1`` to another host, and IPv6 reaches a machine without an IPv6 address
this way. MACHINE only names the process for ``ps`` and for the check before
it is stopped.

TCP bytes never enter Python: each direction is spliced from one socket into
a pipe and from the pipe into the other socket, in the kernel (as
systemd-socket-proxyd does), by a thread that blocks in splice(2) without the
interpreter's lock.

Bounded: at most ``clients_cap()`` clients at once (a TCP client past it is
closed at once, a UDP client's datagram dropped), and running out of file
descriptors or memory for one client is that client's failure: the forwarder
backs off a moment and goes on listening.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import socket
import sys
import threading
import time

UDP_IDLE = 60.0
MAX_CLIENTS = 512
"""Clients relayed at once, at most: each takes two sockets, two pipes and two
threads, so a flood costs a bounded amount and the forwarder stays up."""
FDS_PER_CLIENT = 6  # its socket, the upstream one, and a pipe each way
PIPE_CHUNK = 1 << 16  # a pipe's default capacity: one splice fills it
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
    return max(1, min(MAX_CLIENTS, (soft - RESERVED_FDS) // FDS_PER_CLIENT))


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


def _pump(source: socket.socket, sink: socket.socket, pipe: tuple[int, int]) -> None:
    """Splice source to sink through pipe until source ends, then end sink's
    writing side. The pipe is closed at the end."""
    out, into = pipe
    src, dst = source.fileno(), sink.fileno()
    try:
        with contextlib.suppress(OSError):
            while True:
                pending = os.splice(src, into, PIPE_CHUNK)
                if not pending:
                    break
                while pending:
                    pending -= os.splice(out, dst, pending)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)
    finally:
        os.close(out)
        os.close(into)


def _pipes() -> tuple[tuple[int, int], tuple[int, int]] | None:
    """A pipe each way for one client, or None (and nothing left open) if
    descriptors or memory ran out."""
    try:
        first = os.pipe()
    except OSError as exc:
        _say(f"no pipe for a client ({exc.strerror}); it is refused")
        return None
    try:
        return first, os.pipe()
    except OSError as exc:
        os.close(first[0])
        os.close(first[1])
        _say(f"no pipe for a client ({exc.strerror}); it is refused")
        return None


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
                for sock in (client, upstream):  # requests and replies are small
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                pipes = _pipes()
                if pipes is None:
                    return
                back = threading.Thread(
                    target=_pump, args=(upstream, client, pipes[1]), daemon=True
                )
                try:
                    back.start()
                except RuntimeError:  # no thread to be had: this client is refused
                    for fd in (*pipes[0], *pipes[1]):
                        os.close(fd)
                    return
                _pump(client, upstream, pipes[0])
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


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


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
                    upstream = socket.socket(_family(target[0]), socket.SOCK_DGRAM)
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
