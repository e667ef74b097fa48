"""pymachined's restart policy as tables: exits in, decisions out."""

from __future__ import annotations

import pytest

from pymachined.supervise.daemon.policy import Decision, Outcome, backoff, decide, exit_code

DIE, STOP = "die", "stop"


@pytest.mark.parametrize(
    ("restart", "wanted", "code", "ran", "failures", "expected"),
    [
        # on-failure: a non-zero or unknown exit restarts, a clean one does not
        ("on-failure", "running", 1, 0.5, 0, Decision(Outcome.RESTART, DIE, 1, 0.2)),
        ("on-failure", "running", None, 0.5, 0, Decision(Outcome.RESTART, DIE, 1, 0.2)),
        ("on-failure", "running", 137, 0.5, 0, Decision(Outcome.RESTART, DIE, 1, 0.2)),
        ("on-failure", "running", 0, 0.5, 0, Decision(Outcome.EXITED, DIE, 1)),
        # always: any exit restarts
        ("always", "running", 0, 0.5, 0, Decision(Outcome.RESTART, DIE, 1, 0.2)),
        ("always", "running", 3, 0.5, 2, Decision(Outcome.RESTART, DIE, 3, 0.8)),
        # no: never
        ("no", "running", 1, 0.5, 0, Decision(Outcome.EXITED, DIE, 1)),
        ("no", "running", 0, 60.0, 4, Decision(Outcome.EXITED, DIE, 0)),
        # a stop asked for never restarts, and is recorded as a stop
        ("always", "stopped", 0, 60.0, 0, Decision(Outcome.EXITED, STOP, 0)),
        ("always", "stopped", 143, 0.5, 5, Decision(Outcome.EXITED, STOP, 6)),
        ("on-failure", "stopped", 1, 0.5, 0, Decision(Outcome.EXITED, STOP, 1)),
        # more than ten seconds of running resets the count of quick exits
        ("always", "running", 1, 10.5, 5, Decision(Outcome.RESTART, DIE, 0, 0.2)),
        # exactly ten is still quick
        ("always", "running", 1, 10.0, 1, Decision(Outcome.RESTART, DIE, 2, 0.4)),
        # the sixth quick exit in a row is the start limit
        ("always", "running", 1, 0.5, 4, Decision(Outcome.RESTART, DIE, 5, 3.2)),
        ("always", "running", 1, 0.5, 5, Decision(Outcome.DEAD, DIE, 6)),
        ("on-failure", "running", 1, 0.5, 5, Decision(Outcome.DEAD, DIE, 6)),
        # a clean exit under on-failure is not restarted, so never dead
        ("on-failure", "running", 0, 0.5, 5, Decision(Outcome.EXITED, DIE, 6)),
    ],
)
def test_decide(
    restart: str, wanted: str, code: int | None, ran: float, failures: int, expected: Decision
) -> None:
    assert decide(restart, wanted, code, ran, failures) == expected


def test_a_crash_loop_backs_off_then_is_dead() -> None:
    """A payload that fails at once, on a fake clock: each restart follows the
    delay it was given, and the sixth exit in a row gives up."""
    now, failures, delays = 0.0, 0, []
    while True:
        started, now = now, now + 0.1  # it runs 0.1 s
        decision = decide("on-failure", "running", 1, now - started, failures)
        failures = decision.failures
        if decision.outcome is not Outcome.RESTART or decision.delay is None:
            break
        delays.append(decision.delay)
        now += decision.delay
    assert decision.outcome is Outcome.DEAD
    assert delays == [0.2, 0.4, 0.8, 1.6, 3.2]
    assert now == pytest.approx(0.6 + 6.2)  # six runs, five delays


def test_the_backoff_is_capped_and_reset_by_a_healthy_run() -> None:
    """The delay doubles with each quick exit up to 10 s (reached only if the
    start limit were higher), and a run of more than 10 s starts it over."""
    assert [backoff(n) for n in range(1, 10)] == [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0, 10.0]
    failures = 0
    for ran in (1.0, 1.0, 1.0, 11.0, 1.0):
        decision = decide("always", "running", 1, ran, failures)
        failures = decision.failures
    assert (failures, decision.delay) == (1, 0.2)


@pytest.mark.parametrize(
    ("returncode", "killed_by", "expected"),
    [
        (0, None, 0),
        (3, None, 3),
        (1, None, 1),  # nspawn's 1 without its line about a signal: the payload's own 1
        (1, 9, 137),  # the payload killed by SIGKILL, as nspawn's log says
        (1, 15, 143),
        (-9, None, 137),  # nspawn itself killed by SIGKILL
        (-15, None, 143),
        (2, 9, 2),  # a signal line counts only for nspawn's 1
    ],
)
def test_exit_code(returncode: int, killed_by: int | None, expected: int) -> None:
    assert exit_code(returncode, killed_by) == expected
