"""pymachined: the supervisor for hosts without systemd as PID 1, and the GitOps agent.

The supervisor arrives with the reconciler; until then this entry point only
says what it will be.
"""

from __future__ import annotations

import sys

USAGE = """\
usage: pymachined [--help]

pymachined supervises pymachine's machines on hosts where systemd is not PID 1,
and runs the GitOps reconcile loop. `pymachine apply` starts it when needed.
"""


def main(argv: list[str] | None = None) -> int:
    """Print the usage; exit 0 for --help, 2 otherwise."""
    args = sys.argv[1:] if argv is None else argv
    sys.stdout.write(USAGE)
    return 0 if args in (["--help"], ["-h"]) else 2


if __name__ == "__main__":
    raise SystemExit(main())
