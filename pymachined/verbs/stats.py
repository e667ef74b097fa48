"""``stats``: CPU %, memory, processes, network and block I/O of running
machines, sampled from their control groups (named by their supervisor) and
the host side of their veth pairs. Edge; ``usage`` is pure."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

from pymachined.cgroups import MachineCgroup, Stats
from pymachined.core.layout import Layout
from pymachined.network import machine_traffic
from pymachined.supervise.base import Supervisor
from pymachined.verbs.lifecycle import known


@dataclass(frozen=True)
class Usage:
    """One machine's usage over one interval; None where the host cannot say."""

    name: str
    cpu_percent: float | None
    memory: int | None
    memory_limit: int | None
    pids: int | None
    net_rx: int | None
    net_tx: int | None
    block_io: int | None
    oom_kills: int | None


def cpu_percent(before: int | None, after: int | None, elapsed: float) -> float | None:
    """CPU time used between two samples (ns) as a percentage of one CPU over
    elapsed seconds, to one decimal; None without both samples. Pure."""
    if before is None or after is None:
        return None
    return round(100 * (after - before) / (elapsed * 1e9), 1)


def usage(
    name: str, before: Stats, after: Stats, elapsed: float, traffic: tuple[int, int] | None
) -> Usage:
    """A machine's usage from two samples elapsed seconds apart (the later one
    gives the levels) and its veth's byte counts. Pure."""
    return Usage(
        name=name,
        cpu_percent=cpu_percent(before.cpu_ns, after.cpu_ns, elapsed),
        memory=after.memory,
        memory_limit=after.memory_limit,
        pids=after.pids,
        net_rx=traffic[0] if traffic else None,
        net_tx=traffic[1] if traffic else None,
        block_io=after.io_bytes,
        oom_kills=after.oom_kills,
    )


def samples(
    layout: Layout, supervisor: Supervisor, names: list[str], interval: float
) -> Iterator[list[Usage]]:
    """Every interval seconds, the usage of the named machines (every running
    one if none are named) since the last sample, without end."""
    for name in names:
        known(layout, name)
    statuses = supervisor.status()
    wanted = names or sorted(n for n, s in statuses.items() if s.pid is not None)
    groups = {n: MachineCgroup(n, supervisor.cgroup(n)) for n in wanted}
    before = {n: g.stats() for n, g in groups.items()}
    started = time.monotonic()
    while True:
        time.sleep(interval)
        elapsed = time.monotonic() - started
        now = {n: g.stats() for n, g in groups.items()}
        yield [usage(n, before[n], now[n], elapsed, machine_traffic(layout, n)) for n in wanted]
        before, started = now, time.monotonic()
