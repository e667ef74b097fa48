"""pymachined tells a service manager when it is ready (sd_notify)."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from pymachined.supervise.daemon.server import notify


def test_ready_reaches_the_notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        server.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        notify("READY=1")
        assert server.recv(1024) == b"READY=1"


def test_without_a_notify_socket_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    # A None entry makes any import of systemd raise: without a socket,
    # notify must return before it needs the library.
    monkeypatch.setitem(sys.modules, "systemd", None)
    monkeypatch.setitem(sys.modules, "systemd.daemon", None)
    notify("READY=1")
    with pytest.raises(ImportError):  # the trap is armed
        from systemd import daemon  # noqa: F401
