"""Crash points for tests: ``PYMACHINE_CRASH_AT=STEP`` makes pymachine kill
itself with SIGKILL when it reaches STEP, so tests can prove that every step
survives a crash. Steps: build, create, files, start, replace (a root removed
to be made again from another image), remove."""

from __future__ import annotations

import os
import signal

STEPS = ("build", "create", "files", "start", "replace", "remove")


def crash_point(step: str) -> None:
    """Die here, as if by kill -9, when the environment asks for it."""
    if os.environ.get("PYMACHINE_CRASH_AT") == step:
        os.kill(os.getpid(), signal.SIGKILL)
