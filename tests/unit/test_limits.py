"""Resource limits as cgroup writes: every file is set, to a limit or to unlimited."""

from __future__ import annotations

import pytest

from pymachined.core import wire
from pymachined.core.limits import Limits, Write, blkio_weight, cpu_shares, v1_writes, v2_writes


def files(writes: list[Write]) -> dict[str, str]:
    """The last value written to each file."""
    return {w.file: w.value for w in writes}


def test_no_limits_write_unlimited_everywhere_on_v1() -> None:
    assert files(v1_writes(Limits())) == {
        "memory.memsw.limit_in_bytes": "-1",
        "memory.limit_in_bytes": "-1",
        "memory.soft_limit_in_bytes": "-1",
        "cpu.cfs_period_us": "100000",
        "cpu.cfs_quota_us": "-1",
        "cpu.shares": "1024",
        "pids.max": "max",
        "blkio.bfq.weight": "500",
    }


def test_declared_limits_on_v1() -> None:
    limits = Limits(
        memory=64 << 20, memory_soft=32 << 20, cpus=1.5, pids=64, cpu_weight=200, io_weight=50
    )
    written = files(v1_writes(limits))
    assert written["memory.limit_in_bytes"] == str(64 << 20)
    assert written["memory.memsw.limit_in_bytes"] == str(64 << 20)  # no swapping past it
    assert written["memory.soft_limit_in_bytes"] == str(32 << 20)
    assert written["cpu.cfs_quota_us"] == "150000"
    assert written["cpu.shares"] == "2048"
    assert written["pids.max"] == "64"
    assert written["blkio.weight"] == "250"


def test_v1_lifts_the_swap_limit_before_changing_the_memory_limit() -> None:
    order = [(w.file, w.value) for w in v1_writes(Limits(memory=1 << 30))]
    assert order.index(("memory.memsw.limit_in_bytes", "-1")) < order.index(
        ("memory.limit_in_bytes", str(1 << 30))
    )
    assert order.index(("memory.limit_in_bytes", str(1 << 30))) < order.index(
        ("memory.memsw.limit_in_bytes", str(1 << 30))
    )


def test_a_declared_io_weight_is_not_optional() -> None:
    (io,) = [w for w in v1_writes(Limits(io_weight=100)) if w.controller == "blkio"]
    assert not io.optional
    (default,) = [w for w in v1_writes(Limits()) if w.controller == "blkio"]
    assert default.optional


def test_v2() -> None:
    assert files(v2_writes(Limits())) == {
        "memory.max": "max",
        "memory.swap.max": "max",
        "memory.high": "max",
        "cpu.max": "max 100000",
        "cpu.weight": "100",
        "pids.max": "max",
        "io.weight": "default 100",
    }
    written = files(v2_writes(Limits(memory=1 << 20, cpus=0.25, pids=10, io_weight=300)))
    assert written["memory.max"] == str(1 << 20)
    assert written["memory.swap.max"] == "0"
    assert written["cpu.max"] == "25000 100000"
    assert written["io.weight"] == "default 300"


@pytest.mark.parametrize(
    ("weight", "shares", "blkio"), [(1, 10, 10), (100, 1024, 500), (10000, 102400, 1000)]
)
def test_weights_convert_as_systemd_does(weight: int, shares: int, blkio: int) -> None:
    assert cpu_shares(weight) == shares
    assert blkio_weight(weight) == blkio


def test_json_round_trip_and_truth() -> None:
    limits = Limits(memory=5, cpus=0.5)
    assert wire.load(Limits, wire.dump(limits)) == limits
    assert wire.load(Limits, {}) == Limits()
    with pytest.raises(ValueError, match=r"^pids: Input should be a valid integer"):
        wire.load(Limits, {"pids": "many"})
    assert not Limits()
    assert limits


def test_a_machine_may_make_any_node_and_open_only_its_list() -> None:
    from pymachined.core.limits import device_writes

    rules = [w.value for w in device_writes()]
    assert rules[0] == "a"  # devices.deny: everything, first
    assert rules[1:3] == ["c *:* m", "b *:* m"]
    opened = [r for r in rules[1:] if "r" in r.split()[-1]]
    assert opened == [
        "c 1:3 rwm",
        "c 1:5 rwm",
        "c 1:7 rwm",
        "c 1:8 rwm",
        "c 1:9 rwm",
        "c 5:0 rwm",
        "c 5:2 rwm",
        "c 136:* rw",
    ]
