"""Benchmarks of the reconciler, each with a baseline measured in the same run. As root.

- plan of 100 and of 1,000 declared machines (pure planning, in-process): the
  cost must grow no worse than linearly;
- creating and starting 20 command machines from a cached image with
  `pymachine apply`, beside a bare loop that mounts the same overlays and
  starts the same systemd-nspawn commands;
- a no-op `pymachine apply` with 100 running machines, beside `python -c pass`;
- pymachined's resident memory while it supervises 50 machines.

    .venv/bin/python bench/apply.py [--root DIR] [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path, PurePosixPath

from pymachined.core.desired import desire
from pymachined.core.layout import Layout
from pymachined.core.plan import plan
from pymachined.core.recipes import layers
from pymachined.core.validate import load_set
from pymachined.images import ImageStore, Progress

REPO = Path(__file__).resolve().parent.parent
SPEC = """\
name: m{index:04d}
image: debian-bookworm-slim
command: [sh, -c, "echo up; exec sleep infinity"]
network: none
restart: always
environment: {{INDEX: "{index}"}}
"""


def write_specs(directory: Path, count: int) -> None:
    """count command machines in one file."""
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.yaml"):
        old.unlink()
    (directory / "machines.yaml").write_text(
        "---\n".join(SPEC.format(index=i) for i in range(count))
    )


def cli(root: Path, *args: str) -> float:
    """Seconds one pymachine command takes (it must succeed)."""
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "pymachined", "--root", str(root), *args],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def bench_plan(store: ImageStore, layout: Layout) -> None:
    salts = store.salts()
    per_machine = {}
    with tempfile.TemporaryDirectory() as tmp:
        for count in (100, 1000):
            write_specs(Path(tmp), count)
            samples = []
            for _ in range(5):
                start = time.perf_counter()
                spec_set = load_set([Path(tmp)], REPO / "machines")
                desired = desire(spec_set, layout, REPO / "templates", salts)
                plan(desired, {}, built=[])
                samples.append(time.perf_counter() - start)
            seconds = statistics.median(samples)
            per_machine[count] = seconds / count
            print(f"plan of {count:>5} machines      {seconds * 1000:>9.1f} ms")
    growth = per_machine[1000] / per_machine[100]
    print(f"cost per machine, 1000 vs 100: {growth:.2f}x (target: <= ~1, linear)")


def wait_for_output(logs: list[Path], text: bytes) -> None:
    """Until every log holds text (each machine's command has begun)."""
    pending = list(logs)
    deadline = time.monotonic() + 600
    while pending:
        pending = [log for log in pending if not (log.exists() and text in log.read_bytes())]
        if time.monotonic() > deadline:
            raise SystemExit(f"machines did not start: {pending[:3]}")
        time.sleep(0.02)


def timed_apply(root: Path, count: int) -> float:
    """Seconds from a fresh apply of count machines until each runs its command;
    they are pruned again after."""
    specs = root / "bench-specs"
    write_specs(specs, count)
    start = time.perf_counter()
    cli(root, "apply", str(specs), "--yes")
    wait_for_output(
        [root / f"var/lib/pymachine/machines/m{i:04d}/console.log" for i in range(count)], b"up"
    )
    seconds = time.perf_counter() - start
    prune_all(root)
    return seconds


def timed_bare_loop(root: Path, store: ImageStore, layout: Layout, count: int) -> float:
    """The same machines without pymachine: mount the same overlays and run
    the machines' own systemd-nspawn command lines, until each runs its command."""
    specs = root / "bench-specs"
    write_specs(specs, count)
    spec_set = load_set([specs], REPO / "machines")
    desired = desire(spec_set, layout, REPO / "templates", store.salts())
    chain = store.ensure(layers(spec_set, "debian-bookworm-slim", store.salts()))
    lowers = ":".join(str(r.tree) for r in chain)
    bare_dir = Path(tempfile.mkdtemp(dir=root))
    processes = []
    logs = []
    start = time.perf_counter()
    for index, want in enumerate(desired.values()):
        base = bare_dir / f"b{index}"
        for part in ("upper", "work", "rootfs"):
            (base / part).mkdir(parents=True)
        options = f"lowerdir={lowers},upperdir={base}/upper,workdir={base}/work"
        subprocess.run(
            [
                "mount",
                "-t",
                "overlay",
                "-o",
                options + ",redirect_dir=on,metacopy=on",
                "bare",
                str(base / "rootfs"),
            ],
            check=True,
        )
        argv = [
            f"--directory={base / 'rootfs'}"
            if a.startswith("--directory=")
            else f"--machine=bare{index}"
            if a.startswith("--machine=")
            else a
            for a in want.run.argv
        ]
        logs.append(base / "console.log")
        with logs[-1].open("ab") as log:
            processes.append(
                subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            )
    wait_for_output(logs, b"up")
    seconds = time.perf_counter() - start
    for process in processes:
        process.send_signal(signal.SIGTERM)
    for process in processes:
        process.wait()
    for index in range(count):
        subprocess.run(["umount", str(bare_dir / f"b{index}" / "rootfs")], check=True)
    shutil.rmtree(bare_dir)
    return seconds


def bench_start(root: Path, store: ImageStore, layout: Layout, count: int, rounds: int) -> None:
    """apply beside the bare loop, in rounds of alternating order (this disk is
    noisy, and whichever runs first meets colder caches); medians compared."""
    ours: list[float] = []
    bare: list[float] = []
    for round_ in range(rounds):
        if round_ % 2 == 0:
            ours.append(timed_apply(root, count))
            bare.append(timed_bare_loop(root, store, layout, count))
        else:
            bare.append(timed_bare_loop(root, store, layout, count))
            ours.append(timed_apply(root, count))
        print(f"  round {round_ + 1}: apply {ours[-1]:.2f} s, bare loop {bare[-1]:.2f} s")
    ours_median, bare_median = statistics.median(ours), statistics.median(bare)
    print(
        f"create+start {count} machines until each runs its command (median of {rounds}): "
        f"apply {ours_median:.2f} s, bare nspawn loop {bare_median:.2f} s, "
        f"ratio {ours_median / bare_median:.2f}x (target: <= 1.5x)"
    )


def bench_noop(root: Path, count: int) -> None:
    specs = root / "bench-specs"
    write_specs(specs, count)
    cli(root, "apply", str(specs), "--yes")
    baseline = statistics.median([cli_time([sys.executable, "-c", "pass"]) for _ in range(5)])
    noop = statistics.median([cli(root, "apply", str(specs), "--yes") for _ in range(5)])
    print(
        f"no-op apply with {count} running machines: {noop:.2f} s "
        f"({noop / baseline:.0f}x python -c pass at {baseline * 1000:.0f} ms; target: < 1 s)"
    )


def cli_time(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True)
    return time.perf_counter() - start


def bench_memory(root: Path, count: int) -> None:
    specs = root / "bench-specs"
    write_specs(specs, count)
    cli(root, "apply", str(specs), "--yes", "--prune")
    pid = int((root / "run/pymachine/pymachined.lock").read_text().split()[1])
    status = Path(f"/proc/{pid}/status").read_text()
    rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
    print(f"pymachined with {count} machines: {rss / 1024:.1f} MiB resident (target: < 60 MB)")


def prune_all(root: Path) -> None:
    """Remove every machine (a spec directory must declare something to prune)."""
    specs = root / "bench-specs"
    write_specs(specs, 0)
    (specs / "machines.yaml").write_text(
        "name: keep\nimage: debian-bookworm-slim\ncommand: [sleep, infinity]\n"
        "network: none\nstate: stopped\n"
    )
    cli(root, "apply", str(specs), "--yes", "--prune")
    subprocess.run(
        [sys.executable, "-m", "pymachined", "--root", str(root), "destroy", "--yes", "keep"],
        check=False,
        stdout=subprocess.DEVNULL,
    )


def cleanup(root: Path) -> None:
    prune_all(root)
    lock = root / "run/pymachine/pymachined.lock"
    if lock.exists():
        os.kill(int(lock.read_text().split()[1]), signal.SIGTERM)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, default=Path("/var/tmp/pymachine-bench"))
    parser.add_argument("--rounds", type=int, default=4, help="rounds of the start benchmark")
    args = parser.parse_args()
    layout = Layout(PurePosixPath(args.root))
    store = ImageStore(layout, REPO / "templates", Progress())
    store.ensure(layers(load_set([], REPO / "machines"), "debian-bookworm-slim", store.salts()))
    bench_plan(store, layout)
    try:
        bench_start(args.root, store, layout, 20, args.rounds)
        bench_memory(args.root, 50)
        bench_noop(args.root, 100)
    finally:
        cleanup(args.root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
