"""Volumes on paper: the plan makes each declared volume once, never removes
one; a machine's volumes are ID-mapped binds of their data directories in its
.nspawn file and command line; the record round-trips."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from pymachined.core.desired import desire
from pymachined.core.layout import Layout
from pymachined.core.plan import ObservedVolume, plan
from pymachined.core.records import VolumeRecord, parse_volume_record, stored
from pymachined.core.render import all_binds, nspawn_run_argv
from pymachined.core.validate import SpecSet, load_set
from tests.unit.test_plan import SALTS, converged, kinds

LAYOUT = Layout(PurePosixPath("/srv/host"))
SPECS = """\
kind: volume
name: pgdata
owner: "100:102"
---
kind: volume
name: spare
---
name: db
image: debian-bookworm-slim
command: [sleep, infinity]
volumes: ["pgdata:/var/lib/postgresql", {name: spare, target: /srv/spare, read_only: true}]
binds: ["/srv/in:/srv/in"]
"""


def _set(repo: Path, tmp_path: Path, text: str = SPECS) -> SpecSet:
    spec = tmp_path / "specs.yaml"
    spec.write_text(text)
    return load_set([spec], repo / "machines")


def test_declared_volumes_are_made_once_before_any_machine(repo: Path, tmp_path: Path) -> None:
    spec_set = _set(repo, tmp_path)
    desired = desire(spec_set, LAYOUT, repo / "templates", SALTS)
    first = plan(desired, {}, set(), volumes=spec_set.volumes)
    assert kinds(first)[:2] == [("CreateVolume", "pgdata"), ("CreateVolume", "spare")]
    assert first[0].describe() == "create volume pgdata: new volume"
    assert first[0].as_json() == {
        "action": "CreateVolume",
        "volume": "pgdata",
        "reason": "new volume",
    }
    observed, built = converged(desired)
    recorded = {n: ObservedVolume(VolumeRecord(n, v)) for n, v in spec_set.volumes.items()}
    again = plan(desired, observed, built, volumes=spec_set.volumes, recorded_volumes=recorded)
    assert again == []
    # Undeclared, recorded volumes stay, with or without prune.
    assert plan({}, {}, set(), prune=True, volumes={}, recorded_volumes=recorded) == []


def test_volumes_are_id_mapped_binds_of_their_data(repo: Path, tmp_path: Path) -> None:
    machine = _set(repo, tmp_path).machines["db"]
    binds = all_binds(machine, LAYOUT)
    assert [(b.source, b.target, b.read_only, b.idmap) for b in binds] == [
        ("/srv/in", "/srv/in", False, False),
        ("/srv/host/var/lib/pymachine/volumes/pgdata/data", "/var/lib/postgresql", False, True),
        ("/srv/host/var/lib/pymachine/volumes/spare/data", "/srv/spare", True, True),
    ]
    staged = LAYOUT.bind_dir("db")
    argv = nspawn_run_argv(machine, LAYOUT)
    assert f"--bind={staged}/0:/srv/in" in argv
    assert f"--bind={staged}/1:/var/lib/postgresql:idmap" in argv
    assert f"--bind-ro={staged}/2:/srv/spare:idmap" in argv
    # Without a user namespace there is nothing to map: the IDs are the same.
    plain = machine.model_copy(
        update={"security": machine.security.model_copy(update={"private_users": False})}
    )
    assert f"--bind={staged}/1:/var/lib/postgresql" in nspawn_run_argv(plain, LAYOUT)


def test_a_volume_change_restarts_its_machine_and_idmap_off_is_no_change(
    repo: Path, tmp_path: Path
) -> None:
    def config_hash(text: str) -> str:
        return desire(_set(repo, tmp_path, text), LAYOUT, repo / "templates", SALTS)[
            "db"
        ].config_hash

    base = config_hash(SPECS)
    assert config_hash(SPECS.replace("/srv/spare, read_only: true", "/srv/elsewhere")) != base
    # A bind keeps the hash it had before idmap existed: off is not written.
    spelled = SPECS.replace(
        'binds: ["/srv/in:/srv/in"]', "binds: [{source: /srv/in, target: /srv/in, idmap: false}]"
    )
    assert config_hash(spelled) == base
    mapped = SPECS.replace(
        'binds: ["/srv/in:/srv/in"]', "binds: [{source: /srv/in, target: /srv/in, idmap: true}]"
    )
    assert config_hash(mapped) != base


def test_a_volume_record_round_trips(repo: Path, tmp_path: Path) -> None:
    spec = _set(repo, tmp_path).volumes["pgdata"]
    record = VolumeRecord(
        "pgdata", spec, created="2026-12-02T10:00:00+00:00", seeded="db:/var/lib/postgresql"
    )
    data = stored(record)
    assert (data["version"], data["owner"], data["kind"]) == (1, "pymachine", "volume")
    assert parse_volume_record(json.dumps(data), Path("volume.json")) == record
