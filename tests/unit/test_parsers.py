"""Parsers of host facts and logs: text in, values out."""

from __future__ import annotations

import pytest

from pymachined.parsers import machine_resolv_conf, parse_log_line, parse_nameservers


@pytest.mark.parametrize(
    ("line", "parsed"),
    [
        ("2026-11-28T10:00:00Z hello\n", ("2026-11-28T10:00:00Z", "hello\n")),
        ("2026-11-28T10:00:00Z \n", ("2026-11-28T10:00:00Z", "\n")),
        ("2026-11-28T10:00:00Z  indented\n", ("2026-11-28T10:00:00Z", " indented\n")),
        ("hello\n", (None, "hello\n")),
        ("2026-11-28 10:00:00 not ours\n", (None, "2026-11-28 10:00:00 not ours\n")),
    ],
)
def test_log_lines(line: str, parsed: tuple[str | None, str]) -> None:
    assert parse_log_line(line) == parsed


RESOLVED_STUB = (
    "# This is /run/systemd/resolve/stub-resolv.conf\nnameserver 127.0.0.53\noptions edns0\n"
)


def test_nameservers() -> None:
    text = (
        "search lan\nnameserver 10.0.0.1 # office\n#nameserver 10.0.0.9\nnameserver fe80::1%eth0\n"
    )
    assert parse_nameservers(text) == ["10.0.0.1", "fe80::1%eth0"]


@pytest.mark.parametrize(
    ("host", "uplink", "mode"),
    [
        ("nameserver 10.0.0.1\n", True, "copy-host"),  # reachable through NAT
        (RESOLVED_STUB, True, "copy-uplink"),  # resolved's stub: its upstream list
        ("nameserver ::1\nnameserver 127.0.0.1\n", True, "copy-uplink"),
        (RESOLVED_STUB, False, "copy-host"),  # nothing better to give
        ("nameserver 127.0.0.53\nnameserver 10.0.0.1\n", True, "copy-host"),
        ("", True, "copy-host"),
    ],
)
def test_a_machine_gets_resolvers_it_can_reach(host: str, uplink: bool, mode: str) -> None:
    assert machine_resolv_conf(host, uplink) == mode
