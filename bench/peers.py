"""Starting N command machines beside peers, all in the same run (issue 18). As root.

Six ways to have N (default 20) command machines from the same cached
debian-bookworm-slim tree running, each with only loopback and a host
directory bound at /out, its payload writing /out/NAME when it runs:

- a bare loop: an overlay of the image tree mounted per machine and
  ``systemd-nspawn --private-users=no`` started for each;
- pymachine with ``security: {private_users: false}``;
- Podman 4.3 with runc, without a user namespace;
- the same with ``--userns=auto``;
- pymachine's default (a user namespace per machine);
- the bare loop with ``--private-users=pick --private-users-ownership=chown``.

Each figure is the time from the start of the step (the loop, ``pymachine
apply``, the loop of ``podman run -d``) until all N files exist, median of
``--rounds`` rounds; rows run in alternating order and everything is removed
between rounds (the image cache stays; pymachined stays up, as on a host that
has machines). After each start the bench also reads the upper-layer bytes
per machine and the memory (PSS) that the manager keeps beside the payload
per machine: nspawn, the log stamper and a share of pymachined for
pymachine; conmon for Podman; nspawn for the bare loop.

    .venv/bin/python bench/peers.py [--machines N] [--rounds R] [--rows A,B]
        [--install] [--json FILE]

Podman runs an image imported from the tree pymachine built; without
``--install`` a missing podman gives "not installed" rows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.lifecycle import REPO, compiled, podman, podman_run_argv, pymachine
from pymachined.core import commands
from pymachined.core.layout import Layout
from pymachined.core.recipes import layers
from pymachined.core.validate import load_set
from pymachined.files import tree_usage
from pymachined.images import ImageStore, Progress
from pymachined.supervise.builtin import BuiltinSupervisor

IMAGE = "debian-bookworm-slim"
PODMAN_IMAGE = "localhost/bench-peers-slim"
SUBID_RANGE = "containers:2147483647:2147483648"  # above every range nspawn picks
TIMEOUT = 600.0


@dataclass(frozen=True)
class Row:
    """One way of starting the machines: who runs them and with which options."""

    key: str
    label: str
    tool: str  # "bare", "pymachine" or "podman"
    options: tuple[str, ...] = ()


ROWS = (
    Row("bare", "bare loop: overlay + systemd-nspawn --private-users=no", "bare", ("no",)),
    Row("pymachine_no_userns", "pymachine, security: {private_users: false}", "pymachine", ("no",)),
    Row("podman", "Podman 4.3 + runc, no user namespace", "podman"),
    Row("podman_userns", "Podman 4.3 + runc, --userns=auto", "podman", ("--userns=auto",)),
    Row("pymachine", "pymachine, default (user namespace on)", "pymachine"),
    Row(
        "bare_chown",
        "bare nspawn --private-users=pick --private-users-ownership=chown",
        "bare",
        ("pick", "chown"),
    ),
)


def payload(name: str) -> str:
    return f"echo up > /out/{name}; exec sleep infinity"


def names(count: int) -> list[str]:
    return [f"peer{index:03d}" for index in range(count)]


# -- timing -----------------------------------------------------------------


def until_up(out: Path, machines: Sequence[str], step: Callable[[], object]) -> tuple[float, float]:
    """Seconds from the start of step (run in a thread) until every machine's
    file in out says up, and until step returned."""
    failed: list[BaseException] = []
    returned: list[float] = []
    start = time.perf_counter()

    def run() -> None:
        try:
            step()
        except subprocess.CalledProcessError as error:
            failed.append(SystemExit(f"{error.cmd}: exit {error.returncode}: {error.stderr}"))
        except BaseException as error:  # reported by the main thread
            failed.append(error)
        returned.append(time.perf_counter() - start)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    pending = [out / name for name in machines]
    while pending:
        pending = [p for p in pending if not (p.exists() and b"up" in p.read_bytes())]
        if failed:
            raise failed[0]
        if time.perf_counter() - start > TIMEOUT:
            raise SystemExit(f"machines did not start: {[p.name for p in pending[:3]]}")
        time.sleep(0.01)
    up = time.perf_counter() - start
    worker.join()
    if failed:
        raise failed[0]
    return up, returned[0]


# -- memory -----------------------------------------------------------------


def process_table() -> dict[int, tuple[int, str]]:
    """Every process: pid -> (parent pid, command name)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            table[int(entry.name)] = (int(stat[stat.rindex(")") + 2 :].split()[1]), comm)
    return table


def manager_processes(roots: Sequence[int]) -> list[tuple[int, str]]:
    """roots and their descendants in the host's PID namespace: a machine's
    payload (PID 1 of its own namespace) and what it forks are left out."""
    host = os.readlink("/proc/self/ns/pid")
    table = process_table()
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found = []
    stack = [pid for pid in roots if pid in table]
    while stack:
        pid = stack.pop()
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/ns/pid") != host:
                continue
            found.append((pid, table[pid][1]))
            stack += children.get(pid, [])
    return found


def pss_kib(pid: int) -> int:
    """A process's proportional set size, in KiB (0 if it is gone)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def kept_memory(
    roots: Sequence[int], count: int, roles: dict[int, str] | None = None
) -> dict[str, float]:
    """KiB per machine of what the manager keeps beside the payloads, by
    command name (or the role given for a pid), and the total."""
    by_comm: dict[str, float] = {}
    for pid, comm in manager_processes(roots):
        role = (roles or {}).get(pid, comm)
        by_comm[role] = by_comm.get(role, 0.0) + pss_kib(pid) / count
    by_comm["total"] = sum(by_comm.values())
    return by_comm


# -- the rows ---------------------------------------------------------------


@dataclass
class Bench:
    """What every row shares: the state root, the image's layers, the bound
    directory, and what a row started that is still to be removed."""

    root: Path
    lowers: list[PurePosixPath]
    out: Path
    count: int
    bare: list[subprocess.Popen[bytes]] = field(default_factory=list)
    mounts: list[Path] = field(default_factory=list)

    @property
    def machines(self) -> list[str]:
        return names(self.count)


def bare_argv(rootfs: Path, name: str, out: Path, options: Sequence[str]) -> list[str]:
    """systemd-nspawn of one bare machine: no network, out bound at /out."""
    users = [f"--private-users={options[0]}"]
    if len(options) > 1:
        users.append(f"--private-users-ownership={options[1]}")
    return [
        "systemd-nspawn",
        "--quiet",
        "--register=no",
        "--keep-unit",
        "--private-network",
        "--console=pipe",
        *users,
        f"--directory={rootfs}",
        f"--machine={name}",
        f"--bind={out}:/out",
        "--",
        "sh",
        "-c",
        payload(name),
    ]


def bare_start(bench: Bench, row: Row) -> None:
    """The loop: mount each machine's overlay, as pymachine mounts one, and
    start its nspawn."""
    for name in bench.machines:
        base = bench.root / "bare" / name
        for part in ("upper", "work", "rootfs"):
            (base / part).mkdir(parents=True)
        subprocess.run(
            commands.overlay_mount_argv(
                bench.lowers,
                PurePosixPath(base / "rootfs"),
                PurePosixPath(base / "upper"),
                PurePosixPath(base / "work"),
                metacopy=True,
            ),
            check=True,
        )
        bench.mounts.append(base / "rootfs")
        with (base / "console.log").open("ab") as log:
            bench.bare.append(
                subprocess.Popen(
                    bare_argv(base / "rootfs", name, bench.out, row.options),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )


def bare_measure(bench: Bench) -> tuple[float, dict[str, float]]:
    uppers = [tree_usage(bench.root / "bare" / name / "upper") for name in bench.machines]
    return statistics.mean(uppers), kept_memory([p.pid for p in bench.bare], bench.count)


def bare_remove(bench: Bench) -> None:
    """Stop the bare machines (nspawn kills a payload it is not booting), then
    unmount and remove their roots."""
    for process in bench.bare:
        process.send_signal(signal.SIGTERM)
    for process in bench.bare:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    bench.bare.clear()
    for mount in reversed(bench.mounts):
        subprocess.run(["umount", str(mount)], check=False)
    bench.mounts.clear()
    shutil.rmtree(bench.root / "bare", ignore_errors=True)


def spec_text(bench: Bench, row: Row) -> str:
    """The row's machines; the payload (PID 1) ignores SIGTERM, so a short
    stop_timeout keeps their removal quick, as podman rm -t 0 does."""
    security = "security: {private_users: false}\n" if row.options == ("no",) else ""
    return "---\n".join(
        f'name: {name}\nimage: {IMAGE}\nnetwork: none\nrestart: "no"\nstop_timeout: 1s\n'
        f'binds: ["{bench.out}:/out"]\n{security}'
        f'command: [sh, -c, "{payload(name)}"]\n'
        for name in bench.machines
    )


def pymachine_start(bench: Bench, row: Row) -> None:
    specs = bench.root / "peer-specs"
    specs.mkdir(exist_ok=True)
    (specs / "machines.yaml").write_text(spec_text(bench, row))
    pymachine(bench.root, "apply", str(specs), "--yes")


def daemon_pid(root: Path) -> int | None:
    """The pid of the state root's pymachined, if it runs."""
    try:
        pid = int((root / "run/pymachine/pymachined.lock").read_text().split()[1])
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError, IndexError):
        return None
    return pid if b"pymachined.supervise.daemon" in argv and str(root).encode() in argv else None


def pymachine_measure(bench: Bench) -> tuple[float, dict[str, float]]:
    rows = json.loads(pymachine(bench.root, "df", "-o", "json").stdout)
    uppers = [r["size"] for r in rows if r["type"] == "machine" and r["name"] in bench.machines]
    daemon = daemon_pid(bench.root)
    if daemon is None:
        raise SystemExit(f"pymachined of {bench.root} is not running")
    return statistics.mean(uppers), kept_memory([daemon], bench.count, {daemon: "pymachined"})


def pymachine_remove(bench: Bench) -> None:
    """Destroy every machine of the bench's state root."""
    listed = json.loads(pymachine(bench.root, "ls", "-o", "json").stdout)
    for machine in listed:
        done = pymachine(bench.root, "destroy", "--yes", machine["name"], check=False)
        if done.returncode != 0:
            print(f"destroy {machine['name']}: {done.stderr.strip()}", file=sys.stderr)


def podman_start(bench: Bench, row: Row) -> None:
    for name in bench.machines:
        volume = f"{bench.out}:/out"
        podman(
            *podman_run_argv(
                name, *row.options, "--volume", volume, PODMAN_IMAGE, "sh", "-c", payload(name)
            )
        )


def podman_measure(bench: Bench) -> tuple[float, dict[str, float]]:
    form = "{{.State.ConmonPid}} {{.GraphDriver.Data.UpperDir}}"
    lines = podman("inspect", "--format", form, *bench.machines).stdout.splitlines()
    conmons = [int(line.split()[0]) for line in lines]
    uppers = [tree_usage(Path(line.split(maxsplit=1)[1])) for line in lines]
    return statistics.mean(uppers), kept_memory(conmons, bench.count)


def podman_remove(bench: Bench) -> None:
    listed = podman("ps", "-a", "--format", "{{.Names}}", "--filter", "name=^peer", check=False)
    ours = [name for name in listed.stdout.split() if name.startswith("peer")]
    if ours:
        podman("rm", "-f", "-t", "0", *ours, check=False)


def podman_import(tree: Path) -> None:
    """The image tree as a Podman image, so both run the same root."""
    tar = subprocess.Popen(["tar", "-C", str(tree), "-c", "."], stdout=subprocess.PIPE)
    subprocess.run(
        ["podman", "import", "-", PODMAN_IMAGE], stdin=tar.stdout, check=True, capture_output=True
    )
    if tar.wait() != 0:
        raise SystemExit(f"tar of {tree} failed")


STEPS: dict[str, tuple[Callable[[Bench, Row], None], Callable[[Bench], Any]]] = {
    "bare": (bare_start, bare_measure),
    "pymachine": (pymachine_start, pymachine_measure),
    "podman": (podman_start, podman_measure),
}


def remove(bench: Bench, row: Row) -> None:
    if row.tool == "bare":
        bare_remove(bench)
    elif row.tool == "pymachine":
        pymachine_remove(bench)
    else:
        podman_remove(bench)
    for made in bench.out.iterdir():
        made.unlink()


def one_round(bench: Bench, row: Row) -> dict[str, Any]:
    """Start the row's machines, time them until all run, read their upper
    layers and kept memory, remove them."""
    start, measure = STEPS[row.tool]
    try:
        up, returned = until_up(bench.out, bench.machines, lambda: start(bench, row))
        time.sleep(1)  # let the managers settle before their memory is read
        upper, memory = measure(bench)
    finally:
        remove(bench, row)
    return {"up_s": up, "returned_s": returned, "upper_bytes": upper, "kept_kib": memory}


# -- setup and report ------------------------------------------------------


def podman_ready(install: bool) -> str | None:
    """Why the Podman rows cannot run (None if they can): apt-get installs
    podman and runc with --install, and gives --userns=auto its range."""
    if install and not (shutil.which("podman") and shutil.which("runc")):
        subprocess.run(
            ["apt-get", "install", "-y", "podman", "runc"],
            check=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
    if not (shutil.which("podman") and shutil.which("runc")):
        return "not installed"
    for table in (Path("/etc/subuid"), Path("/etc/subgid")):
        text = table.read_text() if table.exists() else ""
        if not any(line.startswith("containers:") for line in text.splitlines()):
            if not install:
                return f"no containers: range in {table} (--install adds one)"
            with table.open("a") as added:
                added.write(f"{SUBID_RANGE}\n")
    return None


def ratio(figures: dict[str, Any], top: str, bottom: str) -> float | None:
    if "median_s" not in figures[top] or "median_s" not in figures[bottom]:
        return None
    return float(figures[top]["median_s"] / figures[bottom]["median_s"])


def targets(figures: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with its ratio and whether it is met."""
    wanted = [
        ("pymachine", "pymachine_no_userns", 1.3, "default <= 1.3x pymachine without a userns"),
        ("pymachine_no_userns", "bare", 1.5, "pymachine without a userns <= 1.5x the bare loop"),
        ("pymachine", "podman_userns", 1.0, "default faster than Podman --userns=auto"),
    ]
    found = []
    for top, bottom, limit, what in wanted:
        value = ratio(figures, top, bottom)
        met = None if value is None else (value < limit if limit == 1.0 else value <= limit)
        found.append({"target": what, "ratio": value, "limit": limit, "met": met})
    return found


def report(figures: dict[str, Any], count: int, rounds: int) -> None:
    print(f"\n{count} machines, medians of {rounds} rounds")
    print(f"{'':<66}{'all up':>9}{'returned':>10}{'upper/machine':>15}{'kept/machine':>14}")
    for row in ROWS:
        got = figures[row.key]
        if "median_s" not in got:
            print(f"{row.label:<66}  {got['skipped']}")
            continue
        kept = got["kept_kib"]["total"]
        print(
            f"{row.label:<66}{got['median_s']:>7.2f} s{got['returned_s']:>8.2f} s"
            f"{got['upper_bytes'] / 1024:>11.0f} KiB{kept / 1024:>10.1f} MiB"
        )
    for row in ROWS:
        got = figures[row.key]
        if row.tool == "pymachine" and "kept_kib" in got:
            parts = ", ".join(
                f"{comm} {kib / 1024:.1f}"
                for comm, kib in got["kept_kib"].items()
                if comm != "total"
            )
            print(f"  kept by {row.key} per machine (MiB): {parts}")
    print()
    for target in targets(figures):
        if target["ratio"] is None:
            print(f"{target['target']}: not measured")
        else:
            word = "pass" if target["met"] else "FAIL"
            print(f"{target['target']}: {target['ratio']:.2f}x  {word}")


def median_of(samples: list[dict[str, Any]]) -> dict[str, Any]:
    kept = {
        k: statistics.median(s["kept_kib"].get(k, 0.0) for s in samples)
        for k in samples[0]["kept_kib"]
    }
    return {
        "median_s": statistics.median(s["up_s"] for s in samples),
        "returned_s": statistics.median(s["returned_s"] for s in samples),
        "upper_bytes": statistics.median(s["upper_bytes"] for s in samples),
        "kept_kib": kept,
        "rounds": samples,
    }


@contextlib.contextmanager
def terminated_as_exit() -> Iterator[None]:
    """SIGTERM ends the bench through its cleanup, as Ctrl-C does."""

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, default=Path("/var/tmp/bench-peers"))
    parser.add_argument("--machines", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--install", action="store_true", help="apt-get install podman, runc")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument(
        "--rows",
        help=f"comma-separated rows to run (default all: {','.join(row.key for row in ROWS)})",
    )
    args = parser.parse_args()
    compiled()
    chosen = set(args.rows.split(",")) if args.rows else {row.key for row in ROWS}
    if unknown := chosen - {row.key for row in ROWS}:
        parser.error(f"--rows: no such row: {', '.join(sorted(unknown))}")
    root: Path = args.root.resolve()
    store = ImageStore(Layout(PurePosixPath(root)), REPO / "templates", Progress())
    chain = store.ensure(layers(load_set([], REPO / "machines"), IMAGE, store.salts()))
    if len(chain) != 1:
        raise SystemExit(f"{IMAGE} has {len(chain)} layers; podman needs one tree")
    out = root / "out"
    out.mkdir(parents=True, exist_ok=True)
    out.chmod(0o1777)  # every machine's root may write, whatever its UID range
    bench = Bench(root, [PurePosixPath(r.tree) for r in chain], out, args.machines)
    wanted = any(row.tool == "podman" and row.key in chosen for row in ROWS)
    skipped = {"podman": podman_ready(args.install) if wanted else "not asked for"}
    samples: dict[str, list[dict[str, Any]]] = {row.key: [] for row in ROWS}
    with terminated_as_exit():
        try:
            if skipped["podman"] is None:
                podman_remove(bench)
                podman_import(Path(chain[0].tree))
            pymachine_remove(bench)  # what an earlier run left
            BuiltinSupervisor(Layout(PurePosixPath(root))).start_daemon()
            for round_ in range(args.rounds):
                order = ROWS if round_ % 2 == 0 else tuple(reversed(ROWS))
                for row in order:
                    if skipped.get(row.tool) or row.key not in chosen:
                        continue
                    samples[row.key].append(one_round(bench, row))
                    print(
                        f"round {round_ + 1}: {row.key:<20} {samples[row.key][-1]['up_s']:6.2f} s",
                        flush=True,
                    )
        finally:
            bare_remove(bench)
            if skipped["podman"] is None:
                podman_remove(bench)
                podman("rmi", "-f", PODMAN_IMAGE, check=False)
            with contextlib.suppress(OSError, ValueError):
                pymachine_remove(bench)
            daemon = daemon_pid(root)
            if daemon is not None:
                os.kill(daemon, signal.SIGTERM)
            shutil.rmtree(out, ignore_errors=True)
    figures: dict[str, Any] = {}
    for row in ROWS:
        reason = skipped.get(row.tool) if row.key in chosen else "not asked for"
        figures[row.key] = {"label": row.label}
        figures[row.key] |= {"skipped": reason} if reason else median_of(samples[row.key])
    report(figures, args.machines, args.rounds)
    if args.json:
        document = {"machines": args.machines, "rounds": args.rounds, "rows": figures}
        args.json.write_text(json.dumps(document | {"targets": targets(figures)}, indent=2) + "\n")
    return 0 if all(t["met"] is not False for t in targets(figures)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
