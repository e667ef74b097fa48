"""Where pymachine keeps things on a host, under a movable root. Pure.

``--root DIR`` (or ``PYMACHINE_ROOT``) moves every path here, so tests and
trial runs never touch the host's real /etc, /var or /run.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import PurePosixPath

_SLASH = PurePosixPath("/")


@dataclass(frozen=True)
class Layout:
    """The host paths pymachine reads and writes, all below ``root``."""

    root: PurePosixPath = _SLASH

    def _at(self, path: str) -> PurePosixPath:
        return self.root / path.lstrip("/")

    @property
    def state_dir(self) -> PurePosixPath:
        """Images, machines and their records."""
        return self._at("/var/lib/pymachine")

    @property
    def images_dir(self) -> PurePosixPath:
        """Built image trees, one per content key."""
        return self.state_dir / "images"

    @property
    def machines_dir(self) -> PurePosixPath:
        """One directory per machine: upper/, work/, rootfs/, state.json."""
        return self.state_dir / "machines"

    @property
    def volumes_dir(self) -> PurePosixPath:
        """One directory per volume: ``data/`` and ``volume.json``."""
        return self.state_dir / "volumes"

    def volume_dir(self, name: str) -> PurePosixPath:
        """A volume's own directory."""
        return self.volumes_dir / name

    def volume_data(self, name: str) -> PurePosixPath:
        """What a volume holds, bound into the machines that use it."""
        return self.volume_dir(name) / "data"

    @property
    def networks_dir(self) -> PurePosixPath:
        """One record per network: ``<name>.json``."""
        return self.state_dir / "networks"

    @property
    def net_run_dir(self) -> PurePosixPath:
        """Runtime state of machines' networks: port forwarders' pids."""
        return self.run_dir / "net"

    @property
    def nspawn_dir(self) -> PurePosixPath:
        """Trusted .nspawn settings files."""
        return self._at("/etc/systemd/nspawn")

    @property
    def unit_dir(self) -> PurePosixPath:
        """System units pymachine installs."""
        return self._at("/etc/systemd/system")

    @property
    def run_dir(self) -> PurePosixPath:
        """Runtime state: the lock, supervisor socket, pids."""
        return self._at("/run/pymachine")

    @property
    def scope(self) -> str:
        """What host-wide names (cgroups, interfaces, network namespaces, the nft
        table) carry to stay apart from the host's own: '' for the real root,
        else a short hash of the root. The root must be resolved already
        (files.host_layout), so a symlink to a root gives the same scope."""
        if self.root == _SLASH:
            return ""
        return hashlib.sha256(str(self.root).encode()).hexdigest()[:6]

    def cgroup_name(self, name: str) -> str:
        """The cgroup pymachined runs a machine in, below each hierarchy's root:
        cgroups are host-wide, so two roots' machines of one name stay apart."""
        return f"pymachine/{self.scope}-{name}" if self.scope else f"pymachine/{name}"

    def netns_name(self, name: str) -> str:
        """The named network namespace a machine on a declared network runs in."""
        return f"pm-{self.scope}-{name}" if self.scope else f"pm-{name}"

    def netns_path(self, name: str) -> PurePosixPath:
        """Its path: network namespaces are host-wide, so never under the root."""
        return PurePosixPath("/run/netns") / self.netns_name(name)

    def image_dir(self, key: str) -> PurePosixPath:
        """The tree of one built image."""
        return self.images_dir / key

    def machine_dir(self, name: str) -> PurePosixPath:
        """A machine's own directory."""
        return self.machines_dir / name

    def rootfs(self, name: str) -> PurePosixPath:
        """Where a machine's root is assembled (the overlay's merged view)."""
        return self.machine_dir(name) / "rootfs"

    def bind_dir(self, name: str) -> PurePosixPath:
        """Where a machine's bind sources are mounted, one per bind, before
        nspawn binds them into the machine (so nspawn never resolves a path a
        symlink could redirect)."""
        return self.machine_dir(name) / "binds"

    def bind_staging(self, name: str, index: int) -> PurePosixPath:
        """The staging mount of a machine's bind number ``index``."""
        return self.bind_dir(name) / str(index)

    def mount_lock(self, name: str) -> PurePosixPath:
        """The lock that keeps two mounters of a machine's root and binds apart."""
        return self.run_dir / "mounts" / f"{name}.lock"

    def nspawn_file(self, name: str) -> PurePosixPath:
        """A machine's .nspawn settings file."""
        return self.nspawn_dir / f"{name}.nspawn"

    def unit_name(self, name: str) -> str:
        """The systemd unit that runs a machine."""
        return f"pymachine-{name}.service"

    def unit_file(self, name: str) -> PurePosixPath:
        """Path of the machine's unit file."""
        return self.unit_dir / self.unit_name(name)
