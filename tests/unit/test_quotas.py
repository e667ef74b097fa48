"""Volume quotas on paper: the kernel's structures as packed and read, the
project ids a volume tries, /etc/projid; the plan of a size that changes or a
quota on disk that drifted; the refusal of a size where the filesystem
enforces no project quotas; old volume records read as without a project."""

from __future__ import annotations

import json
import struct
from pathlib import Path, PurePosixPath

import pytest

from pymachined import observe, quota, reconcile, volumes
from pymachined.core import quotas
from pymachined.core.layout import Layout
from pymachined.core.plan import ObservedVolume, plan_volumes
from pymachined.core.quotas import Usage
from pymachined.core.records import VolumeRecord, parse_volume_record, stored
from pymachined.core.spec import Volume
from pymachined.core.validate import load_set
from pymachined.errors import SpecError
from pymachined.state import StateStore

MIB = 1024 * 1024


def _ioc(direction: int, kind: str, number: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (ord(kind) << 8) | number


def test_the_kernel_structures_have_their_c_sizes_and_numbers() -> None:
    # sizeof(struct fsxattr), sizeof(struct if_dqblk), sizeof(struct fs_quota_statv)
    assert (quotas.FSXATTR.size, quotas.DQBLK.size, quotas.STATV.size) == (28, 72, 160)
    assert _ioc(2, "X", 31, 28) == quotas.FS_IOC_FSGETXATTR
    assert _ioc(1, "X", 32, 28) == quotas.FS_IOC_FSSETXATTR
    assert quotas.qcmd(quotas.Q_SETQUOTA) == 0x80000802  # QCMD(Q_SETQUOTA, PRJQUOTA)
    assert quotas.qcmd(quotas.Q_GETQUOTA) == 0x80000702
    assert quotas.qcmd(quotas.Q_XGETQSTATV) == 0x580802


def test_a_limit_is_the_block_hard_limit_in_kib_rounded_up() -> None:
    fields = quotas.DQBLK.unpack(quotas.pack_limit(8 * MIB))
    assert fields == (8192, 0, 0, 0, 0, 0, 0, 0, quotas.QIF_BLIMITS)
    assert quotas.DQBLK.unpack(quotas.pack_limit(MIB + 1))[0] == 1025
    assert quotas.DQBLK.unpack(quotas.pack_limit(0))[0] == 0  # no limit
    assert quotas.limit_bytes(MIB + 1) == MIB + 1024


def test_a_quota_is_read_as_limit_and_use() -> None:
    # As Q_GETQUOTA fills it for a project at 8M holding 12 KiB in 3 inodes.
    data = struct.pack("=8QI4x", 8192, 0, 12288, 0, 0, 3, 0, 0, 0x3F)
    assert quotas.parse_dqblk(data) == Usage(8 * MIB, 12288, 3)
    assert Usage(0, 0, 0).taken is False
    assert Usage(0, 0, 1).taken and Usage(4096, 0, 0).taken


def test_project_quotas_are_enforced_only_with_both_flags() -> None:
    request = quotas.pack_statv_request()
    assert len(request) == 160 and request[0] == quotas.FS_QSTATV_VERSION1 and not any(request[1:])

    def statv(flags: int) -> bytes:
        return request[:2] + struct.pack("=H", flags) + request[4:]

    assert quotas.parse_statv(statv(0)) == (False, False)
    assert quotas.parse_statv(statv(0b11)) == (False, False)  # user quotas only
    assert quotas.parse_statv(statv(1 << 4)) == (True, False)  # ext4 quota,project, no prjquota
    assert quotas.parse_statv(statv((1 << 4) | (1 << 5))) == (True, True)


def test_attributes_are_written_back_as_read_with_the_project() -> None:
    read = struct.pack("=5I8x", 0x10, 4096, 7, 0, 65536)  # extsize, nextents, cowextsize
    found = quotas.parse_fsxattr(read)
    assert (found.projid, found.inherits) == (0, False)
    written = quotas.pack_fsxattr(found.xflags | quotas.FS_XFLAG_PROJINHERIT, 1234567, found.rest)
    assert struct.unpack("=5I8x", written) == (0x210, 4096, 7, 1234567, 65536)
    assert quotas.parse_fsxattr(written).inherits


def test_project_ids_are_deterministic_per_root_and_name() -> None:
    first = list(quotas.project_candidates("", "pgdata"))
    assert first == list(quotas.project_candidates("", "pgdata"))
    assert len(first) == quotas.TRIES
    assert all(quotas.FIRST_PROJECT <= p <= quotas.LAST_PROJECT for p in first)
    assert first[1] == first[0] + 1 or first[1] == quotas.FIRST_PROJECT
    # Another root on the same filesystem, or another name, starts elsewhere.
    assert next(quotas.project_candidates("a1b2c3", "pgdata")) != first[0]
    assert next(quotas.project_candidates("", "shared")) != first[0]


def test_etc_projid_names_ids() -> None:
    text = "# projects\nlogs:42\nweb:1048577 # ours\nbroken\n:7\nx:y\nlogs:43\n"
    assert quotas.parse_projid(text) == {42: "logs", 1048577: "web", 43: "logs"}


def test_an_old_volume_record_reads_as_without_a_project() -> None:
    old = {
        "version": 1,
        "owner": "pymachine",
        "kind": "volume",
        "name": "v",
        "spec": {"kind": "volume", "name": "v", "labels": {}, "owner": None},
        "created": "2026-12-01T10:00:00+00:00",
        "seeded": "",
    }
    record = parse_volume_record(json.dumps(old), Path("volume.json"))
    assert (record.project, record.spec.size) == (0, None)
    sized = VolumeRecord("v", Volume(kind="volume", name="v", size="8M"), project=1234567)
    data = stored(sized)
    assert (data["project"], data["spec"]["size"]) == (1234567, 8 * MIB)
    assert parse_volume_record(json.dumps(data), Path("volume.json")) == sized


def _volume(size: str | None) -> Volume:
    return Volume(kind="volume", name="v", size=size)


def test_a_changed_size_resizes_and_an_unchanged_one_plans_nothing() -> None:
    recorded = {"v": ObservedVolume(VolumeRecord("v", _volume("8M"), project=1234567))}
    assert plan_volumes({"v": _volume("8M")}, recorded) == []
    (grow,) = plan_volumes({"v": _volume("16M")}, recorded)
    assert grow.describe() == "resize volume v: size: 8M -> 16M"
    assert grow.as_json() == {"action": "ResizeVolume", "volume": "v", "reason": "size: 8M -> 16M"}
    (drop,) = plan_volumes({"v": _volume(None)}, recorded)
    assert drop.describe() == "resize volume v: size: 8M -> none"
    unsized = {"v": ObservedVolume(VolumeRecord("v", _volume(None)))}
    (add,) = plan_volumes({"v": _volume("1.5G")}, unsized)
    assert add.describe() == "resize volume v: size: none -> 1536M"
    assert plan_volumes({"v": _volume(None)}, unsized) == []


def test_a_quota_that_drifted_on_disk_is_set_again() -> None:
    drifted = ObservedVolume(
        VolumeRecord("v", _volume("8M"), project=1234567), "its quota's limit on disk is 4M, not 8M"
    )
    (again,) = plan_volumes({"v": _volume("8M")}, {"v": drifted})
    assert again.describe() == "resize volume v: its quota's limit on disk is 4M, not 8M"


@pytest.mark.parametrize(
    ("carried", "limit", "size", "project", "said"),
    [
        (1234567, 8 * MIB, "8M", 1234567, None),
        (1234567, 4 * MIB, "8M", 1234567, "its quota's limit on disk is 4M, not 8M"),
        (0, 8 * MIB, "8M", 1234567, "its data is in project 0, not its own 1234567"),
        (0, 0, "8M", 0, "its data is in no project quota"),
        (1234567, 8 * MIB, None, 1234567, "its quota's limit on disk is 8M, not none"),
        (1234567, 0, None, 1234567, None),
        (0, 0, None, 0, None),
    ],
)
def test_the_quota_on_disk_is_compared_with_the_record(
    monkeypatch: pytest.MonkeyPatch,
    carried: int,
    limit: int,
    size: str | None,
    project: int,
    said: str | None,
) -> None:
    monkeypatch.setattr(quota, "project_of", lambda directory: carried)
    monkeypatch.setattr(quota, "usage", lambda directory, project: Usage(limit, 4096, 1))
    record = VolumeRecord("v", _volume(size), project=project)
    found = observe.observe_volumes(Layout(PurePosixPath("/srv/host")), {"v": record})
    assert found == {"v": ObservedVolume(record, said)}


def test_a_size_where_quotas_are_not_enforced_is_refused_at_its_line(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = tmp_path / "volumes.yaml"
    spec.write_text("kind: volume\nname: big\nsize: 8M\n---\nkind: volume\nname: plain\n")
    spec_set = load_set([spec], repo / "machines")
    layout = Layout(PurePosixPath(tmp_path / "host"))
    asked: list[Path] = []

    def problem(path: Path) -> str:
        asked.append(path)
        return f"the filesystem of {tmp_path} has no project quotas"

    monkeypatch.setattr(quota, "problem", problem)
    with pytest.raises(SpecError) as raised:
        reconcile.check_quotas(layout, spec_set)
    (line,) = raised.value.lines()
    assert line.startswith(f"{spec}:3:1: size: volume big cannot be limited: the filesystem of ")
    assert "(hint: keep the volumes on ext4 made with -O quota,project" in line
    assert line.endswith("or drop size)")
    assert asked == [Path(layout.volume_data("big"))]  # a volume without a size asks nothing
    monkeypatch.setattr(quota, "problem", lambda path: None)
    reconcile.check_quotas(layout, spec_set)


class FakeQuotas:
    """The project ids and limits of one filesystem, for the volume edge."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, carried: int = 0) -> None:
        self.carried = carried
        self.limits: dict[int, int] = {}
        self.assigned: list[int] = []
        monkeypatch.setattr(quota, "project_of", lambda directory: self.carried)
        monkeypatch.setattr(quota, "assign_tree", self.assign_tree)
        monkeypatch.setattr(quota, "set_limit", self.set_limit)
        monkeypatch.setattr(quota, "reserved", lambda: set())
        monkeypatch.setattr(
            quota, "usage", lambda directory, project: Usage(self.limits.get(project, 0), 0, 0)
        )

    def assign_tree(self, directory: Path, project: int) -> None:
        self.carried = project
        self.assigned.append(project)

    def set_limit(self, directory: Path, project: int, size: int) -> None:
        self.limits[project] = quotas.limit_bytes(size) if size else 0


def _recorded(tmp_path: Path, *records: VolumeRecord) -> tuple[Layout, StateStore]:
    layout = Layout(PurePosixPath(tmp_path))
    state = StateStore(layout)
    for record in records:
        state.put_volume(record)
        Path(layout.volume_data(record.name)).mkdir(parents=True, exist_ok=True)
    return layout, state


def test_a_size_added_makes_the_volume_a_project_and_a_change_keeps_its_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeQuotas(monkeypatch)
    layout, state = _recorded(tmp_path, VolumeRecord("v", _volume(None), seeded="m:/srv"))
    first = next(quotas.project_candidates(layout.scope, "v"))
    made = volumes.resize(layout, state, _volume("8M"))
    assert (made.project, made.spec.size, made.seeded) == (first, 8 * MIB, "m:/srv")
    assert fake.assigned == [first] and fake.limits == {first: 8 * MIB}
    assert state.volume("v") == made
    # Smaller than it holds or not, the limit is set; the tree is not walked again.
    assert volumes.resize(layout, state, _volume("2M")).project == first
    assert fake.assigned == [first] and fake.limits == {first: 2 * MIB}
    dropped = volumes.resize(layout, state, _volume(None))
    assert (dropped.project, dropped.spec.size, fake.limits) == (first, None, {first: 0})


def test_a_new_project_id_skips_the_ones_in_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = Layout(PurePosixPath(tmp_path))
    candidates = list(quotas.project_candidates(layout.scope, "v"))
    # Another volume's record holds the first; the filesystem has blocks of the second.
    fake = FakeQuotas(monkeypatch)
    fake.limits[candidates[1]] = MIB
    other = VolumeRecord("w", _volume("8M"), project=candidates[0])
    layout, state = _recorded(tmp_path, other, VolumeRecord("v", _volume(None)))
    assert volumes.resize(layout, state, _volume("8M")).project == candidates[2]


def test_a_project_id_the_data_carries_is_taken_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A resize killed after the ioctl, before the record: the id is on data/ only.
    fake = FakeQuotas(monkeypatch, carried=4242424)
    layout, state = _recorded(tmp_path, VolumeRecord("v", _volume(None)))
    assert volumes.resize(layout, state, _volume("8M")).project == 4242424
    assert fake.assigned == [] and fake.limits == {4242424: 8 * MIB}
