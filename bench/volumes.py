"""What a volume adds to a machine's start, beside the same machine without
one, in the same run. As root.

Two command machines from the same image, one mounting a volume (seeded at
its first start, then staged, ID-mapped and bound at every start), one not.
Each round stops both, then times ``pymachine start`` until the payload has
printed ``up``, in alternating order; the figure is the median of the pairs'
differences.

    .venv/bin/python bench/volumes.py [--root DIR] [--rounds N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.lifecycle import compiled, pymachine, size, timed, wait_for

TARGET_MS = 10.0
SPECS = """\
kind: volume
name: benchvol
---
name: bench-plain
image: debian-bookworm-slim
network: none
restart: "no"
command: [sh, -c, "echo up; exec sleep infinity"]
---
name: bench-vol
image: debian-bookworm-slim
network: none
restart: "no"
volumes: ["benchvol:/srv/data"]
command: [sh, -c, "echo up; exec sleep infinity"]
"""


def start_ms(root: Path, name: str) -> float:
    """Milliseconds from ``pymachine start`` until the payload says up."""
    log = root / f"var/lib/pymachine/machines/{name}/console.log"
    pymachine(root, "stop", name)
    before = size(log)

    def start() -> None:
        pymachine(root, "start", name)
        wait_for(log, "up", before)

    return 1000 * timed(start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, default=Path("/var/tmp/pymachine-bench"))
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    compiled()
    specs = args.root / "volume-specs"
    specs.mkdir(parents=True, exist_ok=True)
    (specs / "volumes.yaml").write_text(SPECS)
    pymachine(args.root, "apply", str(specs), "--yes")
    plain: list[float] = []
    vol: list[float] = []
    try:
        for round_ in range(args.rounds):
            order = [("bench-plain", plain), ("bench-vol", vol)]
            for name, samples in order if round_ % 2 == 0 else reversed(order):
                samples.append(start_ms(args.root, name))
    finally:
        for name in ("bench-plain", "bench-vol"):
            pymachine(args.root, "destroy", "--yes", name, check=False)
        pymachine(args.root, "volume", "rm", "--yes", "benchvol", check=False)
    added = statistics.median(v - p for v, p in zip(vol, plain, strict=True))
    print(f"start until the payload runs, medians of {args.rounds} rounds:")
    print(f"  without a volume {statistics.median(plain):7.0f} ms")
    print(f"  with a volume    {statistics.median(vol):7.0f} ms")
    print(f"  added by the volume: {added:.1f} ms (target: <= {TARGET_MS:.0f} ms)")
    return 0 if added <= TARGET_MS else 1


if __name__ == "__main__":
    raise SystemExit(main())
