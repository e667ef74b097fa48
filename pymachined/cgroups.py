"""Per-machine cgroups under pymachined: limits, pause (the freezer), statistics
and OOM kills.

Without systemd as PID 1, systemd-nspawn puts a machine only in the
``name=systemd`` hierarchy, so pymachined makes a ``pymachine/<name>`` group
(``pymachine/<scope>-<name>`` under another --root) in
each controller it needs (cgroup v1, as on hybrid hosts, or the unified v2
tree) and starts the machine inside them. Its devices are closed by the v1
``devices`` controller and, in the unified tree, by a BPF device program
(devprog) loaded and attached with bpf(2).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from pymachined import bpf
from pymachined.core.devprog import device_program
from pymachined.core.limits import Limits, device_writes, v1_writes, v2_writes
from pymachined.errors import PymachineError

ROOT = Path("/sys/fs/cgroup")
# The v1 controllers, plus the hybrid host's name=systemd and unified trees:
# nspawn makes the machine's "payload" group below the group it starts in, and
# hands it to the machine's user namespace, so each machine needs its own.
V1_CONTROLLERS = (
    "freezer",
    "memory",
    "pids",
    "cpu",
    "cpuacct",
    "blkio",
    "devices",
    "systemd",
    "unified",
)
V2_CONTROLLERS = ("memory", "pids", "cpu", "io")
GROUP = "pymachine"


def unified(root: Path = ROOT) -> bool:
    """Whether the host runs the unified (v2) hierarchy only."""
    return (root / "cgroup.controllers").exists()


@functools.cache
def _hierarchies(root: Path) -> tuple[bool, tuple[str, ...]]:
    """Whether root is a v2-only tree, and the V1_CONTROLLERS mounted below it
    if not. Looked at once per process: the hierarchies are mounted at boot,
    and pymachined would otherwise stat each of them at every start, stop and
    OOM check of every machine."""
    if unified(root):
        return True, ()
    return False, tuple(c for c in V1_CONTROLLERS if (root / c / "cgroup.procs").exists())


@dataclass(frozen=True)
class Stats:
    """One sample of a machine's usage."""

    cpu_ns: int | None
    memory: int | None
    memory_limit: int | None
    pids: int | None
    io_bytes: int | None
    oom_kills: int | None = None


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class MachineCgroup:
    """The cgroups of one machine."""

    def __init__(self, name: str, group: str, root: Path = ROOT) -> None:
        self.name = name
        self.root = root
        self.v2, self._controllers = _hierarchies(root)
        # pymachined's own group (Layout.cgroup_name: pymachine/[SCOPE-]NAME),
        # or the one systemd made (machine.slice/UNIT).
        self.group = group

    def dirs(self) -> dict[str, Path]:
        """The machine's group in each hierarchy, by controller ("unified" on v2)."""
        if self.v2:
            return {"unified": self.root / self.group}
        return {c: self.root / c / self.group for c in self._controllers}

    def create(self) -> list[Path]:
        """Make the groups, the v1 devices group closed to all but the machine's
        allow-list; the cgroup.procs files a process writes itself into."""
        if self.v2:
            self._delegate_controllers()
        procs = []
        dirs = self.dirs()
        for directory in dirs.values():
            directory.mkdir(parents=True, exist_ok=True)
            procs.append(directory / "cgroup.procs")
        if not self.v2:
            self._close_devices()
        if "unified" in dirs:
            # On v2 the program is the only device filter. On a hybrid host
            # the kernel runs it as well as the v1 controller (both must
            # allow), so there it is a second wall, and a failure is fatal
            # too: a kernel that cannot attach it is one whose v2 machines
            # would run unfiltered, and the same program on both kinds of host
            # means every machine here exercises it.
            attach_device_program(dirs["unified"], self.name)
        return procs

    def _close_devices(self) -> None:
        """Deny every device but DEVICE_ALLOW, before anything enters the group:
        nspawn makes the machine's groups below this one, and a v1 child can
        never allow more than its parent. A v1 host without the controller is
        refused rather than run a machine that may open any device node."""
        directory = self.dirs().get("devices")
        if directory is None:
            raise PymachineError(
                "this host has no devices cgroup controller: a machine could open "
                "any device node its root holds",
                hint="mount the v1 devices controller at /sys/fs/cgroup/devices",
            )
        for write in device_writes():
            try:
                (directory / write.file).write_text(write.value)
            except OSError as exc:
                raise PymachineError(
                    f"cannot write {write.value!r} to {write.file} of machine {self.name}: "
                    f"{exc.strerror}"
                ) from exc

    def device_programs(self) -> list[int]:
        """The ids of the BPF device programs attached to the machine's group in
        the unified tree (none without one)."""
        directory = self.dirs().get("unified")
        return attached_device_programs(directory) if directory is not None else []

    def _delegate_controllers(self) -> None:
        """On v2, enable the controllers limits need for the groups below ours."""
        (self.root / GROUP).mkdir(exist_ok=True)
        for parent in (self.root, self.root / GROUP):
            try:
                available = set((parent / "cgroup.controllers").read_text().split())
                wanted = " ".join(f"+{c}" for c in V2_CONTROLLERS if c in available)
                if wanted:
                    (parent / "cgroup.subtree_control").write_text(wanted)
            except OSError as exc:
                raise PymachineError(
                    f"cannot enable cgroup controllers in {parent}: {exc.strerror}",
                    hint="pymachined needs a delegated, writable cgroup v2 tree",
                ) from exc

    def set_limits(self, limits: Limits) -> list[str]:
        """Write limits into the groups; what could not be set on this host (an
        io_weight without a weight-aware I/O scheduler, say), as messages."""
        dirs = self.dirs()
        skipped = []
        for write in v2_writes(limits) if self.v2 else v1_writes(limits):
            directory = dirs.get(write.controller)
            path = directory / write.file if directory is not None else None
            if path is None or not path.exists():
                if not write.optional:
                    skipped.append(f"{write.file} does not exist on this host")
                continue
            try:
                path.write_text(write.value)
            except OSError as exc:
                hint = (
                    "a memory limit below what the machine uses now cannot be set live; "
                    "restart the machine to apply it"
                    if write.file.startswith("memory")
                    else None
                )
                raise PymachineError(
                    f"cannot set {write.file} of machine {self.name} to {write.value}: "
                    f"{exc.strerror}",
                    hint=hint,
                ) from exc
        return skipped

    def oom_kills(self) -> int | None:
        """How many processes of the machine the kernel's OOM killer has killed."""
        if self.v2:
            path = self.dirs()["unified"] / "memory.events"
        else:
            directory = self.dirs().get("memory")
            if directory is None:
                return None
            path = directory / "memory.oom_control"
        try:
            for line in path.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            return None
        return None

    def kill_all(self) -> int:
        """SIGKILL every process still in the machine's groups: what a machine
        leaves when its systemd-nspawn dies without stopping it (as systemd
        kills what is left in a unit's group). How many were killed."""
        pids: set[int] = set()
        for directory in self.dirs().values():
            for group, _, names in os.walk(directory):
                if "cgroup.procs" in names:
                    with contextlib.suppress(OSError, ValueError):
                        text = (Path(group) / "cgroup.procs").read_text()
                        pids.update(int(p) for p in text.split())
        if pids and self.frozen():
            self.freeze(False)  # a frozen process would not die until thawed
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return len(pids)

    def remove(self) -> None:
        """Remove the groups and those nspawn made below them (all are empty once
        the machine has exited, a moment after)."""
        for directory in self.dirs().values():
            if not directory.is_dir():
                continue
            below = sorted((Path(d) for d, _, _ in os.walk(directory)), key=lambda p: -len(p.parts))
            for group in below:
                for _ in range(50):
                    try:
                        group.rmdir()
                        break
                    except FileNotFoundError:
                        break
                    except OSError:
                        time.sleep(0.02)

    def exists(self) -> bool:
        """Whether the machine has its groups."""
        return any(d.is_dir() for d in self.dirs().values())

    def freeze(self, frozen: bool) -> None:
        """Pause (freeze) or resume every process of the machine."""
        if self.v2:
            path = self.dirs()["unified"] / "cgroup.freeze"
            value = "1" if frozen else "0"
        else:
            directory = self.dirs().get("freezer")
            if directory is None:
                raise PymachineError("this host has no freezer cgroup controller")
            path = directory / "freezer.state"
            value = "FROZEN" if frozen else "THAWED"
        try:
            path.write_text(value)
        except FileNotFoundError as exc:
            raise PymachineError(
                f"machine {self.name} has no cgroup (started before pymachine made them?)",
                hint=f"restart it: pymachine restart {self.name}",
            ) from exc

    def frozen(self) -> bool:
        """Whether the machine is paused."""
        if self.v2:
            return _read_int(self.dirs()["unified"] / "cgroup.freeze") == 1
        directory = self.dirs().get("freezer")
        try:
            return directory is not None and (
                (directory / "freezer.state").read_text().strip() == "FROZEN"
            )
        except OSError:
            return False

    def stats(self) -> Stats:
        """Current CPU time, memory use and limit, process count and block I/O."""
        dirs = self.dirs()
        if self.v2:
            group = dirs["unified"]
            cpu = None
            with contextlib.suppress(OSError):
                for line in (group / "cpu.stat").read_text().splitlines():
                    if line.startswith("usage_usec "):
                        cpu = int(line.split()[1]) * 1000
            limit = _read_int(group / "memory.max")
            return Stats(
                cpu,
                _read_int(group / "memory.current"),
                limit,
                _read_int(group / "pids.current"),
                None,
                self.oom_kills(),
            )
        limit = _read_int(dirs["memory"] / "memory.limit_in_bytes") if "memory" in dirs else None
        if limit is not None and limit >= 1 << 62:
            limit = None  # the "unlimited" sentinel
        io = None
        if "blkio" in dirs:
            with contextlib.suppress(OSError):
                lines = (dirs["blkio"] / "blkio.throttle.io_service_bytes").read_text().splitlines()
                io = sum(int(line.split()[-1]) for line in lines if line.startswith("Total"))
        return Stats(
            cpu_ns=_read_int(dirs["cpuacct"] / "cpuacct.usage") if "cpuacct" in dirs else None,
            memory=_read_int(dirs["memory"] / "memory.usage_in_bytes")
            if "memory" in dirs
            else None,
            memory_limit=limit,
            pids=_read_int(dirs["pids"] / "pids.current") if "pids" in dirs else None,
            io_bytes=io,
            oom_kills=self.oom_kills(),
        )


def load_device_program(program: bytes) -> int:
    """Load a BPF_PROG_TYPE_CGROUP_DEVICE program; its fd. A program the
    verifier refuses raises PymachineError with the verifier's log."""
    try:
        return bpf.load_program(bpf.PROG_TYPE_CGROUP_DEVICE, program, b"pymachine_dev")
    except bpf.LoadError as exc:
        hint = (
            "the verifier's log above says why: a bug of pymachine's to report"
            if exc.log
            else "pymachined needs bpf(2) with CAP_BPF and CAP_SYS_ADMIN and a kernel "
            "with CONFIG_CGROUP_BPF, to filter the devices of machines on cgroup v2"
        )
        raise PymachineError(
            f"the kernel refuses the machines' BPF device program: {exc.strerror}"
            + (f"\n{exc.log}" if exc.log else ""),
            hint=hint,
        ) from exc


def attach_device_program(directory: Path, machine: str) -> None:
    """Attach the device allow-list's program to a group of the unified tree,
    before anything is in it. It stays attached for the life of the group.
    Programs attached below (a booted machine's own systemd's, per unit) run
    too, and every one must allow: they can narrow the machine's list, never
    widen it."""
    try:
        bpf.attach(directory, _device_program_fd(), bpf.CGROUP_DEVICE)
    except OSError as exc:
        raise PymachineError(
            f"cannot attach the BPF device program to the cgroup of machine {machine} "
            f"({directory}): {exc.strerror}",
            hint="pymachined does not run a machine whose devices are not filtered; "
            "it needs CAP_SYS_ADMIN and a writable cgroup v2 tree",
        ) from exc


@functools.cache
def _device_program_fd() -> int:
    """The allow-list's program, loaded once per process and attached to every
    machine's group (the same bytes for all): pymachined keeps the fd open, as
    systemd keeps its programs, rather than load and verify it at every start."""
    return load_device_program(device_program())


def attached_device_programs(directory: Path) -> list[int]:
    """The ids of the BPF device programs attached to a group of the unified
    tree itself (not those of its parents)."""
    return bpf.attached(directory, bpf.CGROUP_DEVICE)
