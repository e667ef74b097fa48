"""Observed state: what is on the host, read from the state store, the roots,
the rendered files, the supervisor and the network interfaces."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from pymachined import names, network, quota, rootfs
from pymachined.core.desired import Desired, DesiredNetwork, file_hash
from pymachined.core.layout import Layout
from pymachined.core.plan import Observed, ObservedNetwork, ObservedVolume
from pymachined.core.quotas import limit_bytes
from pymachined.core.records import MachineRecord, NetworkRecord, VolumeRecord
from pymachined.core.sizes import format_size
from pymachined.errors import PymachineError
from pymachined.state import StateStore
from pymachined.supervise.base import RunState, Status


def _hash_of(path: Path) -> str | None:
    try:
        return file_hash(path.read_bytes())
    except FileNotFoundError:
        return None


def observe(
    layout: Layout,
    store: StateStore,
    desired: Mapping[str, Desired],
    statuses: Mapping[str, Status],
) -> dict[str, Observed]:
    """Observed state of every declared or recorded machine, by name. A record
    that cannot be read is that machine's problem, said in its Observed; a
    root record that cannot be read is taken as missing, its writes kept."""
    records, unreadable = store.scan()
    names: Iterable[str] = sorted(set(desired) | set(records) | set(unreadable))
    networks = store.networks()
    out = {}
    for name in names:
        root_problem = None
        try:
            root = rootfs.read(layout, name)
        except PymachineError as exc:
            root, root_problem = None, str(exc)
        has_root = root is not None and Path(layout.rootfs(name)).is_dir()
        want = desired.get(name)
        paths = [Path(f.path) for f in want.files] if want else []
        status = statuses.get(name)
        problem = str(unreadable[name]) if name in unreadable else None
        if problem is None and status is not None and status.state is RunState.UNKNOWN:
            problem = f"its supervisor's record cannot be read ({status.detail})"
        out[name] = Observed(
            name=name,
            record=records.get(name),
            root=root.layers if root is not None and has_root else None,
            root_mode=root.mode if root is not None and has_root else None,
            files={str(p): _hash_of(p) for p in paths},
            status=status,
            kept=rootfs.kept(layout, name) if root is None else None,
            root_problem=root_problem,
            problem=problem,
            forwarders_gone=len(network.forwarders_gone(layout, name)),
            link=_link_problem(layout, records.get(name), status, networks),
        )
    return out


def _link_problem(
    layout: Layout,
    record: MachineRecord | None,
    status: Status | None,
    networks: Mapping[str, NetworkRecord],
) -> str | None:
    """What is wrong with the network of a running machine on a declared
    network (its namespace, veth or bridge), as recorded; None if nothing."""
    if record is None or record.network is None or status is None or status.pid is None:
        return None
    made = networks.get(record.network)
    if made is None:
        return None
    return network.link_problem(layout, record.name, made.spec)


def observe_networks(
    store: StateStore, networks: Mapping[str, DesiredNetwork]
) -> dict[str, ObservedNetwork]:
    """Observed state of every declared or recorded network, by name."""
    records, unreadable = store.scan_networks()
    return {
        name: ObservedNetwork(
            name=name,
            record=records.get(name),
            bridge_up=name in records and network.link_exists(records[name].bridge),
            problem=str(unreadable[name]) if name in unreadable else None,
            resolver=(
                names.resolver_problem(store.layout, records[name]) if name in records else None
            ),
        )
        for name in sorted(set(networks) | set(records) | set(unreadable))
    }


def observe_volumes(
    layout: Layout, records: Mapping[str, VolumeRecord]
) -> dict[str, ObservedVolume]:
    """Recorded volumes as found, by name: for one with a size or a project,
    whether its data carries the recorded project and the project has the
    recorded limit (read with two calls, not a walk)."""
    return {
        name: ObservedVolume(record, _quota(layout, record)) for name, record in records.items()
    }


def _quota(layout: Layout, record: VolumeRecord) -> str | None:
    size = record.spec.size
    if size is None and not record.project:
        return None
    if not record.project:
        return "its data is in no project quota"
    data = Path(layout.volume_data(record.name))
    try:
        carried = quota.project_of(data)
        limit = quota.usage(data, record.project).limit
    except OSError as exc:
        return None if size is None else f"its quota cannot be read: {exc.strerror}"
    if carried != record.project:
        return f"its data is in project {carried}, not its own {record.project}"
    wanted = 0 if size is None else limit_bytes(size)
    if limit != wanted:
        shown = [format_size(v) if v else "none" for v in (limit, wanted)]
        return f"its quota's limit on disk is {shown[0]}, not {shown[1]}"
    return None
