"""The one place a subprocess starts.

Command lines are argv lists built by pure ``*_argv`` functions elsewhere; this
module runs them. Every entry point (``run``, ``stream``, ``spawn``,
``interactive``) starts its process through one core, ``_start``, which logs
the argv with ``--debug`` (``+ argv``) and turns a missing command into an
error with a hint; a failure becomes a CommandError carrying argv, exit code
and the end of the command's output. Never ``shell=True``.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from pymachined.errors import CommandError, PymachineError, host_error

logger = logging.getLogger("pymachine.run")

MISSING_HINT = "install it (see the README's quick start for the packages pymachine needs)"

# The single call that makes a process. The unit tests replace it
# (tests/unit/conftest.py), so a unit test that reaches any entry point fails.
_popen = subprocess.Popen


@dataclass(frozen=True)
class Completed:
    """What a finished command left: its argv, exit code and output."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def _start(argv: Sequence[str], *, background: bool = False, **options: Any) -> Any:
    """Start argv (a list of str) with the given Popen options, logged once;
    a command that is not installed is a PymachineError with a hint."""
    logger.debug("+ %s%s", shlex.join(argv), " &" if background else "")
    try:
        return _popen(argv, **options)  # an argv list, never a shell
    except FileNotFoundError as exc:
        if exc.filename is not None and str(exc.filename) != argv[0]:
            raise host_error(exc) from exc  # a missing cwd, not a missing command
        raise PymachineError(f"{argv[0]}: command not found", hint=MISSING_HINT) from exc


def _check(argv: Sequence[str], returncode: int, output: str) -> None:
    """Raise the CommandError of a command that exited returncode, if not 0."""
    if returncode != 0:
        raise CommandError(argv, returncode, output)


def _argv(argv: Sequence[object]) -> list[str]:
    return [str(a) for a in argv]


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float | None = None,
) -> Completed:
    """Run argv to completion, capturing output; raise CommandError on failure if check."""
    args = _argv(argv)
    proc: subprocess.Popen[str] = _start(
        args,
        stdin=subprocess.PIPE if input is not None else None,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(env) if env is not None else None,
        cwd=cwd,
    )
    with proc:
        try:
            stdout, stderr = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            # As subprocess.run does: kill it and reap it before reporting.
            proc.kill()
            proc.wait()
            _check(args, -1, f"timed out after {timeout} s")
            raise
        except BaseException:
            proc.kill()
            raise
    if check:
        _check(args, proc.returncode, stderr)
    return Completed(tuple(args), proc.returncode, stdout, stderr)


def stream(
    argv: Sequence[str],
    *,
    log: TextIO,
    on_line: Callable[[str], None] | None = None,
    env: Mapping[str, str] | None = None,
) -> None:
    """Run argv with stdout and stderr merged, each line appended to log and passed
    to on_line as it arrives; raise CommandError (with the last lines) on failure."""
    args = _argv(argv)
    log.write(f"+ {shlex.join(args)}\n")
    log.flush()
    tail: deque[str] = deque(maxlen=20)
    proc: subprocess.Popen[str] = _start(
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        env=dict(env) if env is not None else None,
    )
    assert proc.stdout is not None
    with proc:
        for line in proc.stdout:
            log.write(line)
            log.flush()
            tail.append(line.rstrip("\n"))
            if on_line is not None:
                on_line(line.rstrip("\n"))
    _check(args, proc.returncode, "\n".join(tail))


def spawn(
    argv: Sequence[str],
    output: BinaryIO | int,
    stdin: int | None = None,
    pass_fds: Sequence[int] = (),
    environment: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start argv in its own session, detached from pymachine's terminal, its
    stdout and stderr appended to output (a file or a pipe's fd), its stdin
    from the fd stdin (else /dev/null), pass_fds open in it, and environment
    added to this process's own; the caller watches it."""
    if environment:  # logged beside its command line, as they shape what it does
        logger.debug("  with %s", shlex.join(f"{k}={v}" for k, v in environment.items()))
    proc: subprocess.Popen[bytes] = _start(
        _argv(argv),
        background=True,
        stdin=subprocess.DEVNULL if stdin is None else stdin,
        stdout=output,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        close_fds=True,
        pass_fds=tuple(pass_fds),
        env={**os.environ, **environment} if environment else None,
    )
    return proc


def interactive(argv: Sequence[str]) -> int:
    """Run argv with pymachine's own stdin, stdout and stderr; its exit code, or
    128+N when signal N killed it. As system(3) does, pymachine ignores SIGINT
    and SIGQUIT meanwhile: the terminal sends them to the command too, and it
    is the command's exit that ends pymachine."""
    proc: subprocess.Popen[bytes] = _start(_argv(argv))
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGQUIT)}
    try:
        code = proc.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 128 - code if code < 0 else code
