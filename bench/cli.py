"""Benchmark: `pymachine validate` of 1,000 specs and `pymachine --help`, each
beside `python -c pass` measured in the same run."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PYTHON = sys.executable
PYMACHINE = str(Path(sys.executable).parent / "pymachine")

SPEC = """\
name: m{index:04d}
image: debian-bookworm-slim
command: [python3, -m, http.server, "{port}"]
environment:
  INDEX: "{index}"
  GREETING: hello
labels:
  app: bench
  shard: "{shard}"
resources:
  memory: 256M
  pids: 64
binds:
  - /srv/shared:/srv/shared:ro
restart: always
depends_on: [{dependency}]
"""


def write_specs(directory: Path, count: int) -> None:
    """count machine specs, ten files of count/10 documents each."""
    per_file = max(1, count // 10)
    for start in range(0, count, per_file):
        documents = []
        for index in range(start, min(count, start + per_file)):
            dependency = f"m{index - 1:04d}" if index % per_file else ""
            documents.append(
                SPEC.format(index=index, port=10000 + index, shard=index % 7, dependency=dependency)
            )
        (directory / f"shard-{start:04d}.yaml").write_text("---\n".join(documents))


def timed(argv: list[str], runs: int) -> list[float]:
    """Wall-clock seconds of each of runs runs of argv (which must succeed)."""
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        samples.append(time.perf_counter() - start)
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        specs = Path(tmp)
        write_specs(specs, args.count)
        cases = {
            "python -c pass": [PYTHON, "-c", "pass"],
            "pymachine --help": [PYMACHINE, "--help"],
            f"pymachine validate ({args.count} specs)": [PYMACHINE, "validate", str(specs)],
        }
        # Interleave runs so drift in machine load hits every case alike.
        samples: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.runs):
            for name, argv in cases.items():
                samples[name] += timed(argv, 1)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    baseline = medians["python -c pass"]
    targets = {"pymachine --help": 0.25, f"pymachine validate ({args.count} specs)": 1.0}
    print(f"{'case':<36} {'median':>9} {'min':>9} {'x baseline':>11}  target")
    report = []
    for name, median in medians.items():
        target = targets.get(name)
        verdict = "" if target is None else ("met" if median < target else "MISSED")
        target_text = f"< {target:.2f} s {verdict}" if target else "(baseline)"
        print(
            f"{name:<36} {median:>8.3f}s {min(samples[name]):>8.3f}s "
            f"{median / baseline:>10.1f}x  {target_text}"
        )
        report.append(
            {"case": name, "median_s": median, "ratio": median / baseline, "target_s": target}
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
