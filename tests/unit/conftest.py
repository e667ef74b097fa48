"""Unit tests need neither root nor a subprocess: the one call in run.py that
makes a process raises if any unit test reaches it, through any entry point."""

from __future__ import annotations

from typing import NoReturn

import pytest

from pymachined import run


@pytest.fixture(autouse=True)
def no_subprocess(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make run.py's process-spawning core fail loudly in unit tests."""

    def refuse(*args: object, **kwargs: object) -> NoReturn:
        raise AssertionError(f"unit test tried to run a command: {args!r}")

    monkeypatch.setattr(run, "_popen", refuse)
