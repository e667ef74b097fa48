"""Benchmark: a machine root from a cached image (overlay) against `cp -a` of the
same image, and a cache hit against a first build, measured in one run. As root.

    .venv/bin/python bench/images.py [--runs N] [--skip-first-build]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path, PurePosixPath

from pymachined import rootfs
from pymachined.core.layout import Layout
from pymachined.core.recipes import layers
from pymachined.core.spec import RootfsMode
from pymachined.core.validate import load_set
from pymachined.images import ImageStore, Progress

REPO = Path(__file__).resolve().parent.parent
IMAGE = "debian-bookworm-slim"


def median_of(samples: list[float]) -> float:
    return statistics.median(samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--root", type=Path, default=Path("/var/tmp/pymachine-bench"))
    parser.add_argument("--skip-first-build", action="store_true")
    args = parser.parse_args()

    catalog = load_set([], REPO / "machines")
    layout = Layout(PurePosixPath(args.root))
    store = ImageStore(layout, REPO / "templates", Progress())
    plan = layers(catalog, IMAGE, store.salts())
    results: dict[str, float] = {}

    if not args.skip_first_build:
        with tempfile.TemporaryDirectory(dir="/var/tmp") as fresh:
            cold = ImageStore(Layout(PurePosixPath(fresh)), REPO / "templates", Progress())
            start = time.perf_counter()
            cold.ensure(plan)
            results["first build"] = time.perf_counter() - start
    chain = store.ensure(plan)

    hits = []
    cli = [sys.executable, "-m", "pymachined", "--root", str(args.root), "image", "build", IMAGE]
    for _ in range(args.runs):
        start = time.perf_counter()
        subprocess.run(cli, check=True, capture_output=True)
        hits.append(time.perf_counter() - start)
    results["cache hit (CLI)"] = median_of(hits)

    overlay, copy = [], []
    for _ in range(args.runs):
        name = f"bench-{uuid.uuid4().hex[:8]}"
        start = time.perf_counter()
        root = rootfs.create(layout, name, RootfsMode.OVERLAY, chain)
        rootfs.mount(layout, store, root)
        overlay.append(time.perf_counter() - start)
        rootfs.remove(layout, name)
        with tempfile.TemporaryDirectory(dir=args.root) as target:
            start = time.perf_counter()
            subprocess.run(["cp", "-a", f"{chain[0].tree}/.", target], check=True)
            copy.append(time.perf_counter() - start)
    results["overlay root"] = median_of(overlay)
    results["cp -a of the image"] = median_of(copy)

    for name, seconds in results.items():
        print(f"{name:<22} {seconds * 1000:>10.1f} ms")
    ratio = results["cp -a of the image"] / results["overlay root"]
    print(f"overlay is {ratio:.0f}x faster than cp -a (target: >= 20x, and < 100 ms)")
    verdict = ratio >= 20 and results["overlay root"] < 0.1
    print("overlay target:", "met" if verdict else "MISSED")
    if "first build" in results:
        print(
            f"cache hit is {results['first build'] / results['cache hit (CLI)']:.0f}x faster "
            "than the first build (target: hit < 1 s)"
        )
        print("cache-hit target:", "met" if results["cache hit (CLI)"] < 1 else "MISSED")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
