"""200 machines on one host (issue 18). As root.

N (default 200) command machines from the cached debian-bookworm-slim image,
each with ``network: none``, the default user namespace and a bound host
directory its payload writes a file to when it runs, under pymachined:

- ``apply`` from nothing until every payload has written its file;
- a no-op ``apply`` (nothing changed), beside ``python -c pass``;
- ``ls`` and ``stats --no-stream`` of all N, beside ``python -c pass``;
- the memory (PSS) pymachine keeps beside the payloads, per machine, by
  process (nspawn, the log stamper, pymachined's share), and pymachined's own
  PSS at N/10 and at N machines (flat or not);
- with podman installed, conmon's PSS per container for a tenth of N Podman
  containers (runc, ``--userns=auto``) started in the same run.

    .venv/bin/python bench/scale.py [--machines N] [--runs R] [--no-podman] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path, PurePosixPath
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.lifecycle import compiled, podman, podman_run_argv, pymachine
from bench.peers import (
    IMAGE,
    PODMAN_IMAGE,
    daemon_pid,
    kept_memory,
    podman_import,
    podman_ready,
    pss_kib,
    until_up,
)
from pymachined.core.layout import Layout
from pymachined.core.recipes import layers
from pymachined.core.validate import load_set
from pymachined.files import remove_tree
from pymachined.images import ImageStore, Progress

REPO = Path(__file__).resolve().parent.parent


def spec_text(names: list[str], out: Path) -> str:
    return "---\n".join(
        f'name: {name}\nimage: {IMAGE}\nnetwork: none\nrestart: "no"\nstop_timeout: 1s\n'
        f'binds: ["{out}:/out"]\n'
        f'command: [sh, -c, "{payload(name)}"]\n'
        for name in names
    )


def payload(name: str) -> str:
    """Writes its file, then waits, ending at once on SIGTERM (so that the
    removal of 200 machines does not wait out their stop timeouts)."""
    return f"trap 'exit 0' TERM; echo up > /out/{name}; while :; do sleep 1 & wait; done"


def remove_all(root: Path, specs: Path, names: list[str]) -> None:
    """Every machine of the bench gone: all but the first pruned by one apply,
    then the first destroyed."""
    (specs / "machines.yaml").write_text(spec_text(names[:1], specs.parent / "out"))
    pymachine(root, "apply", str(specs), "--yes", "--prune", check=False)
    pymachine(root, "destroy", "--yes", names[0], check=False)


def timed(argv: list[str], runs: int) -> float:
    """Median seconds of argv over runs."""
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def cli(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "pymachined", "--root", str(root), *args]


def podman_memory(count: int, out: Path) -> dict[str, float] | None:
    """conmon's PSS (KiB) per container for count Podman containers."""
    names = [f"scale-podman{index:03d}" for index in range(count)]
    try:
        for name in names:
            command = f"echo up > /out/{name}; exec sleep infinity"
            podman(
                *podman_run_argv(
                    name,
                    "--userns=auto",
                    "--volume",
                    f"{out}:/out",
                    PODMAN_IMAGE,
                    "sh",
                    "-c",
                    command,
                )
            )
        deadline = time.monotonic() + 120
        while not all((out / n).exists() for n in names) and time.monotonic() < deadline:
            time.sleep(0.05)
        conmons = [
            int(p.name)
            for p in Path("/proc").iterdir()
            if p.name.isdigit() and _comm(p) == "conmon"
        ]
        return {"conmon": sum(pss_kib(pid) for pid in conmons) / count}
    finally:
        podman("rm", "-f", "-t", "0", *names, check=False)


def _comm(proc: Path) -> str:
    try:
        return (proc / "comm").read_text().strip()
    except OSError:
        return ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machines", type=int, default=200)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--root", type=Path, default=Path("/var/tmp/pymachine-bench-scale"))
    parser.add_argument("--no-podman", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    compiled()
    if os.geteuid() != 0:
        raise SystemExit("bench/scale.py needs root")
    root: Path = args.root
    remove_tree(root)  # unmounts what a run cut short left, never crosses into a mount
    layout = Layout(PurePosixPath(root))
    store = ImageStore(layout, REPO / "templates", Progress())
    image = store.ensure(layers(load_set([], REPO / "machines"), IMAGE, store.salts()))[0]
    out = root / "out"
    out.mkdir(parents=True)
    out.chmod(0o1777)  # every machine's root may write, whatever its UID range
    specs = root / "specs"
    specs.mkdir()
    count: int = args.machines
    names = [f"m{index:03d}" for index in range(count)]
    figures: dict[str, Any] = {"machines": count}
    try:
        # pymachined at a tenth of the machines, for its growth.
        tenth = max(1, count // 10)
        (specs / "machines.yaml").write_text(spec_text(names[:tenth], out))
        until_up(out, names[:tenth], lambda: pymachine(root, "apply", str(specs), "--yes"))
        daemon = daemon_pid(root)
        figures["pymachined_kib_at_tenth"] = pss_kib(daemon) if daemon else None
        remove_all(root, specs, names[:tenth])
        for name in names[:tenth]:
            (out / name).unlink()

        (specs / "machines.yaml").write_text(spec_text(names, out))
        up, returned = until_up(out, names, lambda: pymachine(root, "apply", str(specs), "--yes"))
        figures["apply_from_nothing_s"] = round(up, 2)
        figures["apply_returned_s"] = round(returned, 2)
        baseline = timed([sys.executable, "-c", "pass"], args.runs)
        figures["python_pass_s"] = round(baseline, 3)
        figures["noop_apply_s"] = round(
            timed(cli(root, "apply", str(specs), "--yes"), args.runs), 3
        )
        figures["ls_s"] = round(timed(cli(root, "ls"), args.runs), 3)
        figures["stats_s"] = round(timed(cli(root, "stats", "--no-stream"), args.runs), 3)
        daemon = daemon_pid(root)
        if daemon is None:
            raise SystemExit("pymachined is not running")
        memory = kept_memory([daemon], count, {daemon: "pymachined"})
        figures["kept_kib_per_machine"] = {k: round(v, 1) for k, v in memory.items()}
        figures["pymachined_kib"] = pss_kib(daemon)
        if not args.no_podman and podman_ready(False) is None:
            podman_import(image.tree)
            figures["podman_kib_per_container"] = podman_memory(tenth, out)
    finally:
        report(figures)  # what was measured, even if a step failed
        remove_all(root, specs, names)
        daemon = daemon_pid(root)
        if daemon is not None:
            os.kill(daemon, 15)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


def report(figures: dict[str, Any]) -> None:
    count = figures["machines"]
    print(f"{count} machines, user namespace on, network none, one bind each")
    for key in (
        "apply_from_nothing_s",
        "apply_returned_s",
        "python_pass_s",
        "noop_apply_s",
        "ls_s",
        "stats_s",
        "pymachined_kib_at_tenth",
        "pymachined_kib",
    ):
        print(f"  {key}: {figures.get(key)}")
    print(f"  kept KiB per machine: {figures.get('kept_kib_per_machine')}")
    print(f"  podman: {figures.get('podman_kib_per_container')}")
    kept = figures.get("kept_kib_per_machine", {}).get("total")
    noop = figures.get("noop_apply_s")
    print("targets:")
    print(f"  no-op apply < 1 s: {noop is not None and noop < 1} ({noop} s)")
    print(f"  kept <= 1.5 MB per machine: {kept is not None and kept <= 1536} ({kept} KiB)")


if __name__ == "__main__":
    raise SystemExit(main())
