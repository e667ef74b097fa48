"""run.py's entry points all start processes through one core: it logs the
argv once, maps a missing command to an error with a hint, and a non-zero exit
to a CommandError. The process itself is faked at the one seam the unit tests
guard (``run._popen``); no command runs."""

from __future__ import annotations

import io
import logging
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import pytest

from pymachined import run
from pymachined.errors import CommandError, PymachineError

ENTRY_POINTS: dict[str, Callable[[list[str]], object]] = {
    "run": lambda argv: run.run(argv),
    "stream": lambda argv: run.stream(argv, log=io.StringIO()),
    "spawn": lambda argv: run.spawn(argv, subprocess.DEVNULL),
    "interactive": lambda argv: run.interactive(argv),
}


class Exited:
    """A process that has already exited with returncode, having written out
    and err (merged into stdout when asked, as stderr=STDOUT does)."""

    def __init__(self, returncode: int, out: str, err: str, **options: Any) -> None:
        self.returncode = returncode
        merged = options.get("stderr") is subprocess.STDOUT
        self.out, self.err = (out + err, "") if merged else (out, err)
        self.stdout = io.StringIO(self.out)

    def communicate(self, input: str | None = None, timeout: float | None = None) -> Any:
        return self.out, self.err

    def wait(self) -> int:
        return self.returncode

    def __enter__(self) -> Exited:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def exits(returncode: int, out: str = "", err: str = "") -> Callable[..., Exited]:
    def popen(argv: list[str], **options: Any) -> Exited:
        return Exited(returncode, out, err, **options)

    return popen


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_entry_point_reaches_the_guarded_core(entry: str) -> None:
    with pytest.raises(AssertionError, match="unit test tried to run a command"):
        ENTRY_POINTS[entry](["true"])


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_missing_command_is_named_with_a_hint(
    monkeypatch: pytest.MonkeyPatch, entry: str
) -> None:
    def missing(argv: list[str], **options: object) -> NoReturn:
        raise FileNotFoundError(2, "No such file or directory", argv[0])

    monkeypatch.setattr(run, "_popen", missing)
    with pytest.raises(PymachineError) as caught:
        ENTRY_POINTS[entry](["mmdebstrap", "--version"])
    assert not isinstance(caught.value, CommandError)
    assert caught.value.message == "mmdebstrap: command not found"
    assert caught.value.hint is not None and "install it" in caught.value.hint


def test_a_missing_working_directory_is_not_a_missing_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    gone = tmp_path / "gone"

    def no_cwd(argv: list[str], **options: object) -> NoReturn:
        raise FileNotFoundError(2, "No such file or directory", str(options["cwd"]))

    monkeypatch.setattr(run, "_popen", no_cwd)
    with pytest.raises(PymachineError) as caught:
        run.run(["ls"], cwd=gone)
    assert caught.value.message == f"No such file or directory: {gone}"


def test_a_failed_run_carries_argv_exit_code_and_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    err = "".join(f"line {i}\n" for i in range(10))
    monkeypatch.setattr(run, "_popen", exits(3, "ignored\n", err))
    with pytest.raises(CommandError) as caught:
        run.run(["tool", "4", "/x"])
    assert (caught.value.argv, caught.value.returncode) == (["tool", "4", "/x"], 3)
    assert caught.value.stderr == err
    # The message ends with the last five lines only.
    assert caught.value.message.splitlines()[1:] == [f"  line {i}" for i in range(5, 10)]


def test_an_unchecked_run_returns_what_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run, "_popen", exits(1, "out\n", "err\n"))
    done = run.run(["tool"], check=False)
    assert done == run.Completed(("tool",), 1, "out\n", "err\n")


def test_a_failed_stream_carries_the_last_twenty_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    output = "".join(f"line {i}\n" for i in range(30))
    monkeypatch.setattr(run, "_popen", exits(2, output[:100], output[100:]))
    log = io.StringIO()
    seen: list[str] = []
    with pytest.raises(CommandError) as caught:
        run.stream(["build", "it"], log=log, on_line=seen.append)
    assert caught.value.returncode == 2
    assert caught.value.stderr.splitlines() == [f"line {i}" for i in range(10, 30)]
    assert seen == [f"line {i}" for i in range(30)]
    assert log.getvalue() == "+ build it\n" + output


def test_a_run_that_times_out_is_killed_and_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    killed: list[bool] = []

    class Hung(Exited):
        def communicate(self, input: str | None = None, timeout: float | None = None) -> Any:
            raise subprocess.TimeoutExpired(["sleep"], timeout or 0)

        def kill(self) -> None:
            killed.append(True)

    monkeypatch.setattr(run, "_popen", lambda argv, **o: Hung(-9, "", "", **o))
    with pytest.raises(CommandError) as caught:
        run.run(["sleep", "9"], timeout=0.5)
    assert killed == [True]
    assert caught.value.returncode == -1 and "timed out after 0.5 s" in caught.value.message


@pytest.mark.parametrize(("code", "expected"), [(0, 0), (7, 7), (-15, 143)])
def test_interactive_returns_the_exit_code_or_128_plus_the_signal(
    monkeypatch: pytest.MonkeyPatch, code: int, expected: int
) -> None:
    monkeypatch.setattr(run, "_popen", exits(code))
    assert run.interactive(["sh"]) == expected


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_the_argv_is_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, entry: str
) -> None:
    monkeypatch.setattr(run, "_popen", exits(0))
    with caplog.at_level(logging.DEBUG, logger="pymachine.run"):
        ENTRY_POINTS[entry](["echo", "a b"])
    lines = [r.getMessage() for r in caplog.records if r.name == "pymachine.run"]
    assert lines == ["+ echo 'a b'" + (" &" if entry == "spawn" else "")]
