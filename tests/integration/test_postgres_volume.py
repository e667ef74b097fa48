"""PostgreSQL from Debian's package in a machine with the default user
namespace, its data directory a volume: the volume is seeded once with the
cluster the package made in the image, owned by postgres as seen inside, and
a table made through the host's psql on a published port survives an image
change (the root made again from a rebuilt image) and a destroy and apply.

Subnet 10.236.0.0/24, host port 18280 only; the test's traffic goes to
loopback and to its own namespace (the image builds fetch Debian's packages,
as every build does). It builds the image with postgresql twice, once for
each recipe; later runs take both from the test cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.integration.conftest import made_host, require_root_tools
from tests.integration.test_network import net_host
from tests.waiting import wait_until

if TYPE_CHECKING:
    from pymachined.core.layout import Layout
    from pymachined.images import ImageRecord
    from tests.integration.conftest import Host

pytestmark = pytest.mark.integration
__all__ = ["net_host"]  # the fixture of test_network, over this module's host

PORT = 18280
PSQL = ["psql", "-X", "-w", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"]
SERVER = ["-h", "127.0.0.1", "-p", str(PORT), "-U", "postgres", "-d", "postgres"]
DATA = "/var/lib/postgresql"
CLUSTER = f"{DATA}/15/main"  # bookworm's PostgreSQL 15, made by the package's postinst

# The package's cluster, configured through its conf.d: TCP on every address
# of the machine, and a hba file of the test's own: the cluster owner by peer
# on the socket, anyone from the test's subnet (the host's connections arrive
# masqueraded to its gateway) without a password.
SPECS = f"""\
kind: network
name: "@net"
subnet: 10.236.0.0/24
---
kind: volume
name: "@data"
---
kind: image
name: "@img"
from: debian-bookworm-slim
packages: [postgresql]
files:
  - path: /etc/postgresql/15/main/conf.d/pymachine.conf
    content: |
      listen_addresses = '*'
      hba_file = '/etc/postgresql/15/main/pymachine_hba.conf'
  - path: /etc/postgresql/15/main/pymachine_hba.conf
    content: |
      local all postgres peer
      host all all 10.236.0.0/24 trust
---
name: "@db"
image: "@img"
network: "@net"
ports: ["127.0.0.1:{PORT}:5432"]
volumes: ["@data:{DATA}"]
stop_signal: SIGINT  # a fast shutdown, as pg_ctl stop -m fast
# As root: it makes /run/postgresql, then runs postgres in the foreground as
# the owner of the cluster's directory.
command: [pg_ctlcluster, --foreground, "15", main, start]
"""


@pytest.fixture
def host(tmp_path: Path, cache_layout: Layout, slim_image: ImageRecord) -> Iterator[Host]:
    """conftest's host, whose names (machine, volume, network) begin with pg."""
    require_root_tools("psql")
    with made_host(tmp_path, cache_layout, f"pg{uuid.uuid4().hex[:6]}-") as test_host:
        yield test_host


def psql(sql: str) -> subprocess.CompletedProcess[str]:
    """The host's psql on the published port: sql's rows, unaligned, one a line."""
    return subprocess.run(
        [*PSQL, *SERVER, "-c", sql],
        capture_output=True,
        text=True,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("PG")},
            "PGCONNECT_TIMEOUT": "5",
        },
        timeout=60,
        check=False,
    )


def query(sql: str) -> list[str]:
    done = psql(sql)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def console(host: Host, name: str) -> str:
    log = host.root / f"var/lib/pymachine/machines/{host.prefix}{name}/console.log"
    return log.read_text()[-2000:] if log.exists() else ""


def serving(host: Host) -> float:
    """When the postgres now serving the port started (seconds since the epoch),
    once it accepts connections."""
    errors: list[str] = []

    def started() -> float | None:
        done = psql("select extract(epoch from pg_postmaster_start_time())")
        if done.returncode == 0:
            return float(done.stdout)
        errors[:] = [done.stderr.strip()]
        return None

    return wait_until(
        started,
        f"postgres to accept connections on 127.0.0.1:{PORT}",
        120,
        interval=0.25,
        detail=lambda: (errors, console(host, "db")),
    )


def applied(host: Host) -> float:
    """apply, then when the postgres it started began to serve; its machine
    running without a restart, and a plan that is then empty."""
    host.apply()
    started = serving(host)
    row = host.machines()["db"]
    assert (row["state"], row["restarts"]) == ("running", 0), (row, console(host, "db"))
    again = host.pymachine("plan", str(host.specs), check=False)
    assert again.returncode == 0 and again.stdout.startswith("nothing to do"), again
    return started


def test_a_table_in_a_postgres_volume_survives_an_image_change(net_host: Host) -> None:
    host = net_host
    p = host.prefix
    name = f"{p}db"
    host.declare(SPECS)
    planned = host.pymachine("plan", str(host.specs), check=False).stdout
    assert f"create volume {p}data: new volume" in planned, planned
    first = applied(host)
    # The package's own cluster, taken into the volume at its first use.
    volume = json.loads(host.pymachine("volume", "inspect", f"{p}data").stdout)
    assert volume["seeded"] == f"{name}:{DATA}", volume
    identity = query("select system_identifier from pg_control_system()")

    # In a user namespace of its own, postgres owns its data as seen inside;
    # on disk the files keep those same IDs, not the host UIDs it runs as.
    shown = host.pymachine("exec", name, "--", "stat", "-c", "%U:%G %a %n", DATA, CLUSTER)
    assert shown.stdout.splitlines() == [
        f"postgres:postgres 755 {DATA}",
        f"postgres:postgres 700 {CLUSTER}",
    ], shown.stdout
    assert query("select current_setting('data_directory'), current_user") == [
        f"{CLUSTER}|postgres"
    ]
    postgres = int(host.pymachine("exec", name, "--", "id", "-u", "postgres").stdout)
    server = host.payload("db")  # postgres itself: pg_ctlcluster execs it
    _, outside, _ = Path(f"/proc/{server}/uid_map").read_text().split()
    assert int(outside) != 0
    status = Path(f"/proc/{server}/status").read_text().splitlines()
    uids = next(line for line in status if line.startswith("Uid:"))
    assert int(uids.split()[1]) == int(outside) + postgres, uids
    data = host.root / f"var/lib/pymachine/volumes/{p}data/data"
    assert (data / "15/main/PG_VERSION").stat().st_uid == postgres

    query(
        "create table notes (id int primary key, body text);"
        "insert into notes select i, 'note ' || i from generate_series(1, 1000) i;"
    )
    bodies = ",".join(f"note {i}" for i in range(1, 1001))
    rows = [f"1000|500500|{hashlib.md5(bodies.encode()).hexdigest()}"]
    summary = "select count(*), sum(id), md5(string_agg(body, ',' order by id)) from notes"
    assert query(summary) == rows

    # Another image (one more package): a new build, the root made again.
    host.declare(SPECS.replace("packages: [postgresql]", "packages: [postgresql, less]"))
    planned = host.pymachine("plan", str(host.specs), check=False).stdout
    assert f"replace the root of {name}: its image changed" in planned, planned
    second = applied(host)
    assert second > first, (first, second)  # another postgres
    host.pymachine("exec", name, "--", "test", "-x", "/usr/bin/less")
    assert query(summary) == rows
    # The same cluster: the rebuilt image's own was not copied in.
    assert query("select system_identifier from pg_control_system()") == identity
    shown = host.pymachine("exec", name, "--", "stat", "-c", "%U:%G", CLUSTER)
    assert shown.stdout.strip() == "postgres:postgres"

    # destroy and apply: a new root again, the same data.
    host.pymachine("destroy", "--yes", name)
    assert applied(host) > second
    assert query(summary) == rows

    host.pymachine("destroy", "--yes", name)
    host.pymachine("volume", "rm", "--yes", f"{p}data")
