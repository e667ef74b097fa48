"""Benchmarks of a machine's life after apply, each beside peers measured in the
same run. As root.

- a graceful stop of a command machine whose payload traps SIGTERM and exits 0
  (seconds until it is stopped, and whether the payload saw the signal):
  `pymachine stop`, beside a bare `systemd-nspawn --kill-signal=SIGTERM`
  sent SIGTERM, and `podman stop` of the same payload (if podman is installed);
- `exec` of `true` in a running machine: `pymachine exec` (confined like the
  payload), beside a bare `nsenter --all` into the machine's PID 1 (which keeps
  the host's capabilities and cgroup) and `podman exec`;
- `restart` of the same machine beside `podman restart`.

    .venv/bin/python bench/lifecycle.py [--root DIR] [--runs N]

Podman (Debian's podman 4.3 with runc) runs an image imported from the same
debian-bookworm-slim tree pymachine builds, with the ulimits this host needs.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

from pymachined.core.layout import Layout
from pymachined.core.recipes import layers
from pymachined.core.validate import load_set
from pymachined.images import ImageStore, Progress

REPO = Path(__file__).resolve().parent.parent
PAYLOAD = "trap 'echo got-TERM; exit 0' TERM; echo up; while :; do sleep 0.1; done"
SPEC = f"""\
name: life
image: debian-bookworm-slim
command: [sh, -c, "{PAYLOAD}"]
network: none
restart: "no"
stop_timeout: 10s
"""
PODMAN_IMAGE = "localhost/pymachine-bench-slim"
PODMAN_LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]


def podman_run_argv(name: str, *options: str) -> list[str]:
    """``podman run -d`` of a container as every bench runs one here: runc
    (crun refuses hybrid cgroups), no network, this host's limits; the image
    and command follow the options."""
    return ["run", "-d", "--name", name, "--runtime", "runc", "--network", "none",
            *PODMAN_LIMITS, *options]  # fmt: skip


def compiled() -> None:
    """Compile pymachine's sources to bytecode, as pip does for what it
    installs: an editable install's sources are compiled at their first
    import, and not at all where PYTHONDONTWRITEBYTECODE is set, so that each
    command would compile them again (70 ms) and the bench time that."""
    compileall.compile_dir(REPO / "pymachined", quiet=1)


def pymachine(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """One pymachine command against the bench root."""
    return subprocess.run(
        [sys.executable, "-m", "pymachined", "--root", str(root), *args],
        check=check,
        capture_output=True,
        text=True,
    )


def timed(action: Callable[[], object]) -> float:
    """Seconds action takes."""
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def wait_for(path: Path, text: str, after: int = 0) -> None:
    """Until path holds text past byte offset after."""
    deadline = time.monotonic() + 120
    while not (path.exists() and text.encode() in path.read_bytes()[after:]):
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {text!r} in {path}")
        time.sleep(0.02)


def size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def median_ms(samples: list[float]) -> str:
    return f"{statistics.median(samples) * 1000:7.0f} ms"


# -- pymachine -------------------------------------------------------------


def bench_pymachine(root: Path, runs: int) -> dict[str, list[float]]:
    specs = root / "life-specs"
    specs.mkdir(parents=True, exist_ok=True)
    (specs / "life.yaml").write_text(SPEC)
    log = root / "var/lib/pymachine/machines/life/console.log"
    out: dict[str, list[float]] = {"stop": [], "restart": [], "exec": [], "graceful": []}
    pymachine(root, "apply", str(specs), "--yes")
    wait_for(log, "up")
    for _ in range(runs):
        out["exec"].append(timed(lambda: pymachine(root, "exec", "life", "--", "true")))
    for _ in range(runs):
        before = size(log)
        out["restart"].append(timed(lambda: pymachine(root, "restart", "life")))
        wait_for(log, "up", before)
    for _ in range(runs):
        before = size(log)
        out["stop"].append(timed(lambda: pymachine(root, "stop", "life")))
        out["graceful"].append(float(b"got-TERM" in log.read_bytes()[before:]))
        pymachine(root, "start", "life")
        wait_for(log, "up", before)
    pymachine(root, "destroy", "--yes", "life")
    return out


# -- bare nspawn -----------------------------------------------------------


@contextlib.contextmanager
def bare_root(store: ImageStore) -> Iterator[Path]:
    """An overlay over the cached image, as pymachine mounts one."""
    chain = store.ensure(
        layers(load_set([], REPO / "machines"), "debian-bookworm-slim", store.salts())
    )
    base = Path(tempfile.mkdtemp(prefix="bare-", dir=store.root.parent))
    for part in ("upper", "work", "rootfs"):
        (base / part).mkdir()
    lowers = ":".join(str(r.tree) for r in chain)
    options = f"lowerdir={lowers},upperdir={base}/upper,workdir={base}/work,nodev"
    subprocess.run(
        ["mount", "-t", "overlay", "-o", options, "bare", str(base / "rootfs")], check=True
    )
    try:
        yield base
    finally:
        subprocess.run(["umount", str(base / "rootfs")], check=False)
        shutil.rmtree(base, ignore_errors=True)


def bare_start(base: Path) -> tuple[subprocess.Popen[bytes], Path]:
    log = base / "console.log"
    before = size(log)
    with log.open("ab") as output:
        process = subprocess.Popen(
            [
                "systemd-nspawn",
                "--quiet",
                "--register=no",
                "--keep-unit",
                "--private-network",
                "--kill-signal=SIGTERM",
                "--console=pipe",
                f"--directory={base / 'rootfs'}",
                "--machine=bare-life",
                "--",
                "sh",
                "-c",
                PAYLOAD,
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    wait_for(log, "up", before)
    return process, log


def leader(nspawn: int) -> int:
    children = Path(f"/proc/{nspawn}/task/{nspawn}/children").read_text().split()
    return int(children[0])


def bench_bare(store: ImageStore, runs: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"stop": [], "exec": [], "graceful": []}
    with bare_root(store) as base:
        process, log = bare_start(base)
        pid = leader(process.pid)
        argv = ["nsenter", f"--target={pid}", "--all", "--root", "--wd", "true"]
        for _ in range(runs):
            out["exec"].append(timed(lambda: subprocess.run(argv, check=True)))
        for _ in range(runs):
            before = size(log)

            def stop(process: subprocess.Popen[bytes] = process) -> None:
                process.send_signal(signal.SIGTERM)
                process.wait()

            out["stop"].append(timed(stop))
            out["graceful"].append(float(b"got-TERM" in log.read_bytes()[before:]))
            process, log = bare_start(base)
        process.send_signal(signal.SIGTERM)
        process.wait()
    return out


# -- podman ----------------------------------------------------------------


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], check=check, capture_output=True, text=True)


def bench_podman(store: ImageStore, runs: int) -> dict[str, list[float]] | None:
    if shutil.which("podman") is None:
        print("podman is not installed (apt-get install podman runc): no peer figures")
        return None
    chain = store.ensure(
        layers(load_set([], REPO / "machines"), "debian-bookworm-slim", store.salts())
    )
    tar = subprocess.Popen(["tar", "-C", str(chain[0].tree), "-c", "."], stdout=subprocess.PIPE)
    subprocess.run(
        ["podman", "import", "-", PODMAN_IMAGE], stdin=tar.stdout, check=True, capture_output=True
    )
    tar.wait()
    name = "pymachine-bench-life"
    podman("rm", "-f", name, check=False)
    podman(*podman_run_argv(name, PODMAN_IMAGE, "sh", "-c", PAYLOAD))
    out: dict[str, list[float]] = {"stop": [], "restart": [], "exec": [], "graceful": []}
    try:
        for _ in range(runs):
            out["exec"].append(timed(lambda: podman("exec", name, "true")))
        for _ in range(runs):
            out["restart"].append(timed(lambda: podman("restart", name)))
        for _ in range(runs):
            out["stop"].append(timed(lambda: podman("stop", "-t", "10", name)))
            out["graceful"].append(float("got-TERM" in podman("logs", name).stdout.split("up")[-1]))
            podman("start", name)
            time.sleep(0.3)
    finally:
        podman("rm", "-f", name, check=False)
        podman("rmi", PODMAN_IMAGE, check=False)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, default=Path("/var/tmp/pymachine-bench"))
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    compiled()
    store = ImageStore(Layout(PurePosixPath(args.root)), REPO / "templates", Progress())
    ours = bench_pymachine(args.root, args.runs)
    bare = bench_bare(store, args.runs)
    peer = bench_podman(store, args.runs)
    print(f"medians of {args.runs} runs      pymachine     bare nspawn      podman")
    for what in ("stop", "restart", "exec"):
        row = f"{what:<24}{median_ms(ours[what])}"
        row += f"   {median_ms(bare[what])}" if what in bare else "            -"
        row += f"   {median_ms(peer[what])}" if peer and what in peer else "            -"
        print(row)
    graceful = [f"{sum(s['graceful']):.0f}/{len(s['graceful'])}" for s in (ours, bare) if s]
    graceful.append(f"{sum(peer['graceful']):.0f}/{len(peer['graceful'])}" if peer else "-")
    print(f"payload saw SIGTERM       {graceful[0]:>9}   {graceful[1]:>11}   {graceful[2]:>9}")
    exec_ratio = statistics.median(ours["exec"]) / statistics.median(peer["exec"]) if peer else None
    stop_ratio = statistics.median(ours["stop"]) / statistics.median(bare["stop"])
    print(f"stop vs bare nspawn: {stop_ratio:.2f}x (target: every stop graceful, <= 3x bare)")
    if exec_ratio is not None:
        print(f"exec vs podman exec: {exec_ratio:.2f}x (target: <= 1.5x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
