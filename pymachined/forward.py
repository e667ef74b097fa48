"""A TCP port forwarder: ``python -m pymachined.forward FD ADDRESS PORT MACHINE``.

It accepts on the listening socket it inherits as FD and relays each
connection to ADDRESS:PORT. pymachine runs one per IPv6 port forward, since
the kernel cannot DNAT ``::1`` to another host, and IPv6 reaches a machine's
IPv4 address this way. MACHINE only names the process for ``ps`` and for the
check before it is stopped.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading


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


def main(argv: list[str] | None = None) -> int:
    """Accept and relay forever."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    listener = socket.socket(fileno=int(args[0]))
    target = (args[1], int(args[2]))
    while True:
        client, _ = listener.accept()
        threading.Thread(target=_relay, args=(client, target), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
