"""A booted systemd host for end-to-end tests: build it, boot it, drive it.

The outer host need not run systemd: the harness builds a Debian root with
systemd (mmdebstrap, cached under /var/tmp/pymachine-e2e-cache keyed by its
recipe), installs pymachine into it from this checkout (wheels built outside,
installed offline), lays an overlay over the cached root for each run, and
boots it with ``systemd-nspawn -b --private-network``: the inner host has no
network at all, so nothing pymachine does in it touches the real host's
interfaces. Everything that needs the network happens before boot. Commands
run inside through ``nsenter`` into the namespaces of the inner PID 1.

Reuse it (networking and security tests too): see tests/e2e/README.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pymachined.core.parsers import cgroup_directory, parse_mountinfo, parse_proc_cgroup
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
CACHE_ENV = "PYMACHINE_E2E_CACHE"
DEFAULT_CACHE = Path("/var/tmp/pymachine-e2e-cache")
PREFIX = "pme2e"
SUITE = "bookworm"
HOST_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "python3",
    "python3-venv",
    "systemd-container",
    "mmdebstrap",
    "debootstrap",
    "iproute2",
    "nftables",
    "dnsmasq-base",
    "util-linux",
    "ca-certificates",
)
INNER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
VENV = "/opt/pymachine"


class HarnessError(RuntimeError):
    """The harness could not build or boot the host (not a pymachine failure)."""


def cache_dir() -> Path:
    """Where built host roots and wheels are kept between runs."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured) if configured else DEFAULT_CACHE


def _run(argv: Sequence[str], *, timeout: float = 900, **kwargs: object) -> str:
    proc = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )  # type: ignore[call-overload]
    if proc.returncode != 0:
        output = proc.stdout[-2000:] + proc.stderr[-3000:]
        raise HarnessError(f"{' '.join(argv)} exited {proc.returncode}:\n{output}")
    out: str = proc.stdout
    return out


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _key(recipe: object) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def host_root(mirror: str) -> Path:
    """The cached root of the systemd host, built once per recipe (mmdebstrap
    version, suite, packages, mirror) in a staging directory, then renamed."""
    tool = _run(["mmdebstrap", "--version"]).strip()
    recipe = {"suite": SUITE, "packages": HOST_PACKAGES, "mirror": mirror, "tool": tool}
    key = _key(recipe)
    target = cache_dir() / "hosts" / key
    with _locked(cache_dir() / "hosts" / f".{key}.lock"):
        if (target / "recipe.json").exists():
            return target / "root"
        staging = cache_dir() / "hosts" / f".staging-{key}"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        _run(
            [
                "mmdebstrap",
                "--variant=minbase",
                f"--include={','.join(HOST_PACKAGES)}",
                SUITE,
                str(staging / "root"),
                mirror,
            ]
        )
        (staging / "recipe.json").write_text(json.dumps(recipe, indent=2))
        staging.rename(target)
    return target / "root"


def dependency_wheels() -> Path:
    """Wheels of pymachine's dependencies (systemd-python compiled here), cached
    by the dependency list and the Python version, installed offline inside."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    recipe = {"deps": project["dependencies"], "python": sys.version_info[:2]}
    target = cache_dir() / "wheels" / _key(recipe)
    with _locked(cache_dir() / "wheels" / ".lock"):
        if not (target / "done").exists():
            target.mkdir(parents=True, exist_ok=True)
            _run([sys.executable, "-m", "pip", "wheel", "-q", "-w", str(target), *recipe["deps"]])
            (target / "done").write_text("")
    return target


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below path (from /proc/self/mountinfo)."""
    prefix = str(path)
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            found.append(point)
    return found


SHARED = "/run/host-shared"  # BootedHost.shared, inside


@dataclass
class BootedHost:
    """One run's host: an overlay over the cached root, with pymachine's state
    directory (/var/lib/pymachine) bound from outside, booted or powered off.
    The overlay and the state persist across power cycles until close()."""

    root: Path
    run_dir: Path
    name: str
    wheels: Sequence[Path] = ()
    console: Path = field(init=False)
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    boots: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.console = self.run_dir / "console.log"

    @property
    def merged(self) -> Path:
        """The host's root as the outer host sees it (write files into it)."""
        return self.run_dir / "merged"

    @property
    def state(self) -> Path:
        """Outside path of the inner /var/lib/pymachine."""
        return self.run_dir / "state"

    @property
    def shared(self) -> Path:
        """Outside path of the inner /run/host-shared: a directory for sockets
        a test serves to the host from outside (it has no network)."""
        return self.run_dir / "shared"

    # -- before boot -----------------------------------------------------------

    def assemble(self) -> None:
        """Mount the overlay and install pymachine (offline, from wheels)."""
        for part in ("upper", "work", "merged", "state", "shared"):
            (self.run_dir / part).mkdir(parents=True, exist_ok=True)
        upper, work = self.run_dir / "upper", self.run_dir / "work"
        _run(
            [
                "mount",
                "-t",
                "overlay",
                "overlay",
                "-o",
                f"lowerdir={self.root},upperdir={upper},workdir={work}",
                str(self.merged),
            ]
        )
        binds = [f"--bind-ro={w}:/run/{PREFIX}-wheels{i}" for i, w in enumerate(self.wheels)]
        links = " ".join(f"--find-links=/run/{PREFIX}-wheels{i}" for i in range(len(self.wheels)))
        script = (
            f"python3 -m venv {VENV} && "
            f"{VENV}/bin/pip install -q --no-index {links} pymachine && "
            f"ln -sf {VENV}/bin/pymachine /usr/local/bin/pymachine"
        )
        self.offline_nspawn(["sh", "-c", script], binds)

    def offline_nspawn(self, argv: Sequence[str], options: Sequence[str] = ()) -> str:
        """Run argv in the powered-off host's root (not booted)."""
        return _run(
            [
                "systemd-nspawn",
                "--quiet",
                "--register=no",
                "--keep-unit",
                "--pipe",
                f"--directory={self.merged}",
                *options,
                "--",
                *argv,
            ]
        )

    def add_images(self, trees: Sequence[Path]) -> None:
        """Put built image layers into the inner image cache (hard links where
        the file system allows: layers are read-only lower directories)."""
        images = self.state / "images"
        images.mkdir(parents=True, exist_ok=True)
        for tree in trees:
            if (images / tree.name).exists():
                continue
            try:
                _run(["cp", "-al", str(tree), str(images / tree.name)])
            except HarnessError:
                _run(["cp", "-a", "--reflink=auto", str(tree), str(images / tree.name)])

    # -- power -------------------------------------------------------------------

    def boot(self, timeout: float = 180) -> None:
        """Boot the host and wait until systemd says it is up."""
        if self.process is not None:
            raise HarnessError("already booted")
        self.boots += 1
        with self.console.open("ab") as log:
            log.write(f"\n===== boot {self.boots}\n".encode())
            self.process = subprocess.Popen(
                [
                    "systemd-nspawn",
                    "--boot",
                    f"--directory={self.merged}",
                    f"--machine={self.name}",
                    "--private-network",
                    "--register=no",
                    "--keep-unit",
                    "--capability=all",
                    "--console=passive",
                    f"--bind={self.state}:/var/lib/pymachine",
                    f"--bind={self.shared}:{SHARED}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # A real host's root processes have no seccomp filter; one of
                # nspawn's own would stop pymachine exec from reading a
                # machine's filters (the kernel refuses that to a filtered
                # tracer), and the machines' filters would stack on it.
                env={**os.environ, "SYSTEMD_SECCOMP": "0"},
            )
        state = ""

        def up() -> bool:
            nonlocal state
            assert self.process is not None
            if self.process.poll() is not None:
                raise HarnessError(f"the host's nspawn ended ({state!r}); see {self.console}")
            if self.leader() is None:
                return False
            # Fails (empty) until systemd listens on its private socket.
            state = self.run(
                ["systemctl", "is-system-running", "--wait"], check=False, timeout=timeout
            ).stdout.strip()
            return state in ("running", "degraded")

        try:
            wait_until(up, "the host to come up", timeout)
        except AssertionError as exc:
            raise HarnessError(f"the host did not come up ({state!r}); see {self.console}") from exc

    def leader(self) -> int | None:
        """The inner host's PID 1 (outer PID): the child of systemd-nspawn."""
        if self.process is None or self.process.poll() is not None:
            return None
        pid = self.process.pid
        children: list[int] = []
        for task in Path(f"/proc/{pid}/task").glob("*"):
            with contextlib.suppress(OSError):
                children += [int(c) for c in (task / "children").read_text().split()]
        for child in sorted(children):
            # nspawn forks an intermediate child first; the host's PID 1 is systemd.
            with contextlib.suppress(OSError):
                if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                    return child
        return None

    def poweroff(self, timeout: float = 90) -> None:
        """Shut the host down cleanly (systemctl poweroff) and wait for it."""
        if self.process is None:
            return
        self.run(["systemctl", "poweroff"], check=False, timeout=30)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise HarnessError(f"the host did not power off; see {self.console}") from exc
        self.process = None

    def power_loss(self, timeout: float = 30) -> None:
        """Cut the host's power: SIGKILL to its PID 1, which ends every process
        of the host at once (nothing is stopped, nothing flushed by a unit)."""
        if self.process is None:
            return
        leader = self.leader()
        if leader is None:
            raise HarnessError("the host has no PID 1 to kill")
        os.kill(leader, signal.SIGKILL)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise HarnessError(f"the host's nspawn outlived its PID 1; see {self.console}") from exc
        self.process = None

    def kill(self) -> None:
        """Stop the host at once: SIGTERM to nspawn, then SIGKILL to its PID 1
        (which ends every process of the host) and to nspawn."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                leader = self.leader()
                if leader is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(leader, signal.SIGKILL)
                self.process.kill()
                self.process.wait(20)
        self.process = None

    def close(self) -> None:
        """Kill the host, unmount its overlay, and delete the run directory
        (only once nothing is mounted under it)."""
        self.kill()
        for point in reversed(mounts_under(self.run_dir)):
            subprocess.run(["umount", "-l", point], check=False)
        left = mounts_under(self.run_dir)
        if left:
            raise HarnessError(f"still mounted, {self.run_dir} kept: {left}")
        shutil.rmtree(self.run_dir, ignore_errors=True)

    # -- inside ------------------------------------------------------------------

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 300,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """argv inside the booted host, as root, in all of its PID 1's namespaces."""
        leader = self.leader()
        if leader is None:
            raise HarnessError("the host is not running")
        full = [
            "nsenter",
            f"--target={leader}",
            "--all",
            "--root",
            "--",
            "env",
            "-i",
            "-C",
            "/",
            f"PATH={INNER_PATH}",
            "HOME=/root",
            "LANG=C.UTF-8",
            "SYSTEMD_PAGER=",
            "SYSTEMD_COLORS=0",
            *argv,
        ]
        groups = _controller_groups(leader)

        def join() -> None:
            for procs in groups:
                procs.write_text(str(os.getpid()))

        proc = subprocess.run(
            full,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            check=False,
            preexec_fn=join,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"inside {self.name}: {' '.join(argv)} exited {proc.returncode}\n"
                f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
            )
        return proc

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        """Properties of one unit inside (systemctl show)."""
        text = self.run(
            ["systemctl", "show", "--timestamp=unix", f"--property={','.join(properties)}", unit]
        ).stdout
        return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)

    def write(self, path: str, text: str) -> None:
        """Write a file inside the host (through the overlay, from outside)."""
        target = self.merged / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)

    def wait_for(
        self, what: str, predicate: object, timeout: float = 60, interval: float = 0.3
    ) -> None:
        """Poll predicate() until it is true; fail naming what was awaited."""
        assert callable(predicate)
        wait_until(lambda: bool(predicate()), what, timeout, interval=interval)


def _controller_groups(pid: int) -> list[Path]:
    """The cgroup.procs files of process pid's groups in the v1 controller
    hierarchies. The booted host sees those read-only and cannot move anything
    there, so every process in it is in its PID 1's group; a command run with
    run() joins them too, as a login shell inside would be (the name=systemd
    and unified trees are the inner systemd's own to manage)."""
    mounts = parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    out = []
    for membership in parse_proc_cgroup(Path(f"/proc/{pid}/cgroup").read_text()):
        if membership.hierarchy == 0 or any(c.startswith("name=") for c in membership.controllers):
            continue
        directory = cgroup_directory(membership, mounts)
        if directory is not None:
            out.append(Path(directory) / "cgroup.procs")
    return out
