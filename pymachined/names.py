"""Names on declared networks: each network's resolver (dnsmasq on the host,
on the network's gateway addresses) kept running and its hosts file current.

``sync_names`` runs wherever the nft table is rewritten (``network.sync_rules``:
a machine attached or detached, a network made or removed), under the same
lock, so a machine's name is in its network's hosts file before the machine
starts and gone once it stopped. dnsmasq reads the file again by inotify when
it is renamed into place: no signal, no restart of anyone.

Under systemd (PID 1, root /), a resolver is a transient service that systemd
restarts if it dies; elsewhere a process in its own session, started again by
the next sync or apply (``resolver_problem`` is drift that ``plan`` sees).
"""

from __future__ import annotations

import contextlib
import ipaddress
import time
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

from pymachined import files, procs, run
from pymachined.core import names
from pymachined.core.commands import resolver_argv, systemctl_argv, transient_service_argv
from pymachined.core.layout import Layout
from pymachined.core.records import MachineRecord, NetworkRecord
from pymachined.core.spec import Machine, Network
from pymachined.errors import PymachineError
from pymachined.state import StateStore

HOST_RESOLV_CONF = Path("/etc/resolv.conf")
START_TIMEOUT = 5.0


def _systemd(layout: Layout) -> bool:
    return Path("/run/systemd/system").is_dir() and layout.root == PurePosixPath("/")


def upstream_source(layout: Layout) -> Path:
    """The resolv.conf whose servers a resolver forwards outward names to: the
    host's; under --root, ROOT/etc/resolv.conf where there is one (so a trial
    run or a test can give its own)."""
    own = Path(layout.root) / "etc/resolv.conf"
    if layout.root != PurePosixPath("/") and own.is_file():
        return own
    return HOST_RESOLV_CONF


def _upstream(layout: Layout, directory: Path) -> PurePosixPath:
    """What the resolver reads for its servers. The host's file directly (dnsmasq
    sees it change); a root's own is copied beside the hosts file, where
    ``nobody`` can read it."""
    source = upstream_source(layout)
    if source == HOST_RESOLV_CONF:
        return PurePosixPath(source)
    copy = directory / "upstream.conf"
    text = source.read_text()
    if not copy.is_file() or copy.read_text() != text:
        files.atomic_write(copy, text, 0o644, durable=False)
    return PurePosixPath(copy)


def _argv(layout: Layout, network: Network) -> list[str]:
    directory = Path(names.names_dir(layout, network.name))
    upstream = _upstream(layout, directory) if network.nat else None
    return resolver_argv(PurePosixPath(directory), names.listen_addresses(network), upstream)


def _dir(layout: Layout, network: str) -> Path:
    return Path(names.names_dir(layout, network))


def _pid(directory: Path) -> int | None:
    try:
        return int((directory / "pid").read_text().strip())
    except (OSError, ValueError):
        return None


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [word.decode(errors="replace") for word in raw.split(b"\0")[:-1]]


def _runs_as(pid: int | None, argv: list[str]) -> bool:
    """Whether pid is a resolver run with argv (its name may be a full path)."""
    if pid is None:
        return False
    found = _cmdline(pid)
    return bool(found) and Path(found[0]).name == argv[0] and found[1:] == argv[1:]


def _hostsdir_of(pid: int, directory: Path) -> bool:
    """Whether pid is a dnsmasq that reads this resolver directory's hosts."""
    found = _cmdline(pid)
    return bool(found) and f"--hostsdir={directory / 'hosts.d'}" in found


def resolver_log(layout: Layout, network: str) -> str:
    """Where to read why a network's resolver does not run."""
    if _systemd(layout):
        return f"journalctl -u {names.resolver_unit(network)}"
    return str(_dir(layout, network) / "resolver.log")


def resolver_problem(layout: Layout, record: NetworkRecord) -> str | None:
    """What is wrong with a recorded network's resolver, or None: it does not
    run, or runs with other settings (a changed gateway)."""
    spec = Network.model_validate(record.spec)
    directory = Path(names.names_dir(layout, record.name))
    upstream = _upstream_path(layout, directory) if spec.nat else None
    argv = resolver_argv(PurePosixPath(directory), names.listen_addresses(spec), upstream)
    pid = _pid(directory)
    if _runs_as(pid, argv):
        return None
    if pid is not None and _hostsdir_of(pid, directory):
        return "its name resolver runs with other settings"
    return "its name resolver is not running"


def _upstream_path(layout: Layout, directory: Path) -> PurePosixPath:
    """The path ``_upstream`` gives, without writing anything."""
    source = upstream_source(layout)
    return PurePosixPath(source if source == HOST_RESOLV_CONF else directory / "upstream.conf")


def _entries(
    layout: Layout, records: Mapping[str, MachineRecord], network: Network
) -> list[names.Entry]:
    """The machines attached to a network now: recorded on it with an address,
    their namespace there."""
    out = []
    for name, record in records.items():
        if record.network != network.name or record.address is None:
            continue
        if not Path(layout.netns_path(name)).exists():
            continue
        hostname = Machine.model_validate(record.spec).hostname if record.spec else None
        out.append(names.entry(network, name, ipaddress.IPv4Address(record.address), hostname))
    return out


def sync_names(layout: Layout, state: StateStore) -> None:
    """Every recorded network's hosts file written from the records, its resolver
    started if it does not run as it should; the resolvers and files of
    networks no longer recorded removed. A resolver that fails to start is
    left for ``resolver_problem`` to report (its log says why): it must not
    keep a machine from stopping, or a network from being removed."""
    networks = state.networks()
    base = Path(names.names_base(layout))
    # First, so that a network made again on the same gateway can bind it.
    for directory in sorted(base.iterdir()) if base.is_dir() else []:
        if directory.name not in networks:
            stop_resolver(layout, directory.name)
            files.remove_tree(directory)
    machines = state.all() if networks else {}
    specs = {name: Network.model_validate(record.spec) for name, record in networks.items()}
    for name, spec in specs.items():
        directory = Path(names.names_dir(layout, name))
        hosts = directory / "hosts.d" / "machines"
        text = names.hosts_text(name, _entries(layout, machines, spec))
        if not hosts.is_file() or hosts.read_text() != text:
            _world_readable(layout, directory / "hosts.d")
            files.atomic_write(hosts, text, 0o644, durable=False)
    # Two recorded networks share a gateway only within an apply --prune that
    # replaces one by another of the same subnet: one resolver can hold the
    # address, the one running already (else the first by name); the other
    # starts once the old network is removed, at the end of that apply.
    running = {n for n in specs if _runs_as(_pid(_dir(layout, n)), _argv(layout, specs[n]))}
    claimed: set[str] = set()
    for name in sorted(specs, key=lambda n: (n not in running, n)):
        listen = set(names.listen_addresses(specs[name]))
        if listen & claimed:
            continue
        claimed |= listen
        with contextlib.suppress(PymachineError, OSError):
            ensure_resolver(layout, specs[name])
    if not networks and base.is_dir() and not any(base.iterdir()):
        base.rmdir()
        if layout.scope and not any(base.parent.iterdir()):
            base.parent.rmdir()  # /run/pymachine-SCOPE is this root's alone


def _world_readable(layout: Layout, directory: Path) -> None:
    """Make directory, and its parents up to the names base, readable by
    ``nobody``, and the base's own parent searchable."""
    directory.mkdir(parents=True, exist_ok=True)
    base = Path(names.names_base(layout))
    for path in (directory, *directory.parents):
        if path == base.parent:
            path.chmod(path.stat().st_mode & 0o7777 | 0o111)
            break
        path.chmod(0o755)


def ensure_resolver(layout: Layout, network: Network) -> None:
    """A network's resolver running with its settings: started if it does not
    run, started again if it runs with others."""
    directory = Path(names.names_dir(layout, network.name))
    _world_readable(layout, directory / "hosts.d")
    argv = _argv(layout, network)
    if _runs_as(_pid(directory), argv):
        return
    stop_resolver(layout, network.name)
    (directory / "pid").unlink(missing_ok=True)
    log = directory / "resolver.log"
    if _systemd(layout):
        run.run(transient_service_argv(names.resolver_unit(network.name), argv))
        child = None
    else:
        with log.open("ab") as output:
            child = run.spawn(argv, output)
    deadline = time.monotonic() + START_TIMEOUT
    while not _runs_as(_pid(directory), argv):
        ended = child is not None and child.poll() is not None
        if ended or time.monotonic() > deadline:
            tail = log.read_text(errors="replace").splitlines()[-3:] if log.exists() else []
            where = f"journalctl -u {names.resolver_unit(network.name)}" if child is None else log
            raise PymachineError(
                f"the name resolver of network {network.name} did not start"
                + (f": {' '.join(tail)}" if tail else ""),
                hint=f"see {where}",
            )
        time.sleep(0.01)


def stop_resolver(layout: Layout, network: str) -> None:
    """End a network's resolver, if it runs, and wait until it is gone."""
    directory = Path(names.names_dir(layout, network))
    if _systemd(layout):
        run.run(systemctl_argv("stop", [names.resolver_unit(network)]), check=False)
    pid = _pid(directory)
    if pid is None:
        return
    procs.end(pid, lambda candidate: _hostsdir_of(candidate, directory))
