"""The one wait helper of the integration and e2e tests: poll until a check
gives an answer, or fail naming what was awaited."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    check: Callable[[], T | None],
    what: str,
    timeout: float,
    *,
    interval: float = 0.2,
    detail: Callable[[], object] | None = None,
) -> T:
    """The first answer of check that is neither None nor False, polled every
    interval seconds; past timeout seconds an AssertionError (which a test
    may catch to print more) names what was awaited and, when given, detail()
    of the state seen last."""
    deadline = time.monotonic() + timeout
    while True:
        answer = check()
        if answer is not None and answer is not False:
            return answer
        if time.monotonic() > deadline:
            seen = f": {detail()}" if detail is not None else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{seen}")
        time.sleep(interval)
