"""Resource limits: a machine's ``resources`` as cgroup settings. Pure.

Under pymachined the limits are written into the machine's own cgroups, v1
files on hybrid hosts and v2 files on unified ones; under systemd the same
values become unit properties. Every write sets each file, to its limit or to
"unlimited", so that removing a limit from a spec lifts it on a running
machine. The conversions of weights follow systemd's (``CPUWeight=`` to
``cpu.shares``, ``IOWeight=`` to ``blkio.weight``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from pymachined.core.sizes import format_size

CPU_PERIOD_US = 100_000
V1_UNLIMITED = "-1"


DEFAULT_LOG_MAX = 10 * 1024**2
"""Bytes of a machine's console log before pymachined rotates it (spec: log.max_size)."""


@dataclass(frozen=True)
class Limits:
    """A machine's resource limits, as plain values (None: not limited)."""

    memory: int | None = None
    memory_soft: int | None = None
    cpus: float | None = None
    pids: int | None = None
    cpu_weight: int | None = None
    io_weight: int | None = None

    def __bool__(self) -> bool:
        return any(v is not None for v in asdict(self).values())


@dataclass(frozen=True)
class Write:
    """One value written into one file of a machine's cgroup. ``controller`` is the
    v1 hierarchy ("unified" on v2); ``optional`` writes are skipped where the
    kernel lacks the file (a limit of the default value, or swap accounting)."""

    controller: str
    file: str
    value: str
    optional: bool = False


def _cpu_quota_us(cpus: float) -> int:
    return max(1000, round(cpus * CPU_PERIOD_US))


def cpu_shares(weight: int) -> int:
    """``cpu.shares`` for a ``CPUWeight=`` (100 → 1024), as systemd converts it."""
    return min(262144, max(2, weight * 1024 // 100))


def blkio_weight(weight: int) -> int:
    """``blkio.weight`` for an ``IOWeight=`` (100 → 500), as systemd converts it."""
    return min(1000, max(10, weight * 500 // 100))


def v1_writes(limits: Limits) -> list[Write]:
    """The cgroup v1 files that set limits, in a safe order: the swap limit is
    lifted before the memory limit changes and set equal to it after, so that
    the machine cannot swap past its limit where swap is accounted."""
    memory = str(limits.memory) if limits.memory is not None else V1_UNLIMITED
    quota = _cpu_quota_us(limits.cpus) if limits.cpus is not None else -1
    io = limits.io_weight
    return [
        Write("memory", "memory.memsw.limit_in_bytes", V1_UNLIMITED, optional=True),
        Write("memory", "memory.limit_in_bytes", memory),
        Write("memory", "memory.memsw.limit_in_bytes", memory, optional=True),
        Write(
            "memory",
            "memory.soft_limit_in_bytes",
            str(limits.memory_soft) if limits.memory_soft is not None else V1_UNLIMITED,
        ),
        Write("cpu", "cpu.cfs_period_us", str(CPU_PERIOD_US)),
        Write("cpu", "cpu.cfs_quota_us", str(quota)),
        Write(
            "cpu",
            "cpu.shares",
            str(cpu_shares(limits.cpu_weight) if limits.cpu_weight is not None else 1024),
        ),
        Write("pids", "pids.max", str(limits.pids) if limits.pids is not None else "max"),
        Write(
            "blkio",
            "blkio.bfq.weight" if io is None else "blkio.weight",
            str(blkio_weight(io) if io is not None else 500),
            optional=io is None,
        ),
    ]


def v2_writes(limits: Limits) -> list[Write]:
    """The cgroup v2 files that set limits."""

    def value(limit: int | None) -> str:
        return str(limit) if limit is not None else "max"

    quota = str(_cpu_quota_us(limits.cpus)) if limits.cpus is not None else "max"
    return [
        Write("unified", "memory.max", value(limits.memory)),
        Write("unified", "memory.swap.max", "0" if limits.memory is not None else "max", True),
        Write("unified", "memory.high", value(limits.memory_soft)),
        Write("unified", "cpu.max", f"{quota} {CPU_PERIOD_US}"),
        Write("unified", "cpu.weight", str(limits.cpu_weight or 100)),
        Write("unified", "pids.max", value(limits.pids)),
        Write("unified", "io.weight", f"default {limits.io_weight or 100}", True),
    ]


def describe_change(old: Limits, new: Limits) -> str:
    """What changed between two sets of limits, for a plan line."""
    parts = []
    for f in fields(Limits):
        before, after = getattr(old, f.name), getattr(new, f.name)
        if before != after:
            parts.append(f"{f.name} {_show(f.name, before)} → {_show(f.name, after)}")
    return ", ".join(parts)


def _show(name: str, value: int | float | None) -> str:
    if value is None:
        return "unlimited"
    if name.startswith("memory"):
        return format_size(int(value))
    return f"{value:g}"


def unit_properties(limits: Limits) -> list[tuple[str, str]]:
    """The limits as systemd unit properties, every one of them, an unset limit
    as the value that lifts it: what ``systemctl set-property`` applies to a
    running machine's unit."""

    def value(limit: int | None, unset: str) -> str:
        return str(limit) if limit is not None else unset

    quota = f"{max(1, round(limits.cpus * 100))}%" if limits.cpus is not None else ""
    return [
        ("MemoryMax", value(limits.memory, "infinity")),
        ("MemoryHigh", value(limits.memory_soft, "infinity")),
        ("CPUQuota", quota),
        ("TasksMax", value(limits.pids, "infinity")),
        ("CPUWeight", value(limits.cpu_weight, "")),
        ("IOWeight", value(limits.io_weight, "")),
    ]


@dataclass(frozen=True)
class Device:
    """One entry of a machine's device allow-list: character (``c``) or block
    (``b``) devices of a major (every major when None) and a minor (every minor
    when None), by its systemd ``DeviceAllow=`` name."""

    unit_name: str
    kind: str
    major: int | None
    minor: int | None
    access: str

    @property
    def v1_rule(self) -> str:
        """The line for a v1 ``devices.allow`` file."""
        major = "*" if self.major is None else str(self.major)
        minor = "*" if self.minor is None else str(self.minor)
        return f"{self.kind} {major}:{minor} {self.access}"


# The devices a machine may open, as tight as systemd-nspawn@.service's own
# (DevicePolicy=closed: the pseudo-devices, /dev/tty and /dev/ptmx; ptys).
# Nothing else, above all no block device: a node planted in an image opens
# nothing. Any node may be made ("m"), as runc's and Docker's defaults allow:
# making a node gives no access to its device, and shifting a root to a user
# namespace's ids copies every node of the image up into the overlay, a mknod
# as the machine (mmdebstrap's images hold /dev/console, a hostile one
# anything). The pty slaves come from the devpts nspawn mounts.
# /dev/net/tun is left out (no spec field asks for it).
DEVICE_ALLOW = (
    Device("char-*", "c", None, None, "m"),
    Device("block-*", "b", None, None, "m"),
    Device("/dev/null", "c", 1, 3, "rwm"),
    Device("/dev/zero", "c", 1, 5, "rwm"),
    Device("/dev/full", "c", 1, 7, "rwm"),
    Device("/dev/random", "c", 1, 8, "rwm"),
    Device("/dev/urandom", "c", 1, 9, "rwm"),
    Device("/dev/tty", "c", 5, 0, "rwm"),
    Device("/dev/ptmx", "c", 5, 2, "rwm"),
    Device("char-pts", "c", 136, None, "rw"),
)


def device_writes() -> list[Write]:
    """The v1 ``devices`` writes that close a machine's group to all but
    DEVICE_ALLOW: deny everything first, then allow each entry."""
    return [
        Write("devices", "devices.deny", "a"),
        *(Write("devices", "devices.allow", d.v1_rule) for d in DEVICE_ALLOW),
    ]
