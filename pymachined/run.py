"""The one place a subprocess starts.

Command lines are argv lists built by pure ``*_argv`` functions elsewhere; this
module runs them, logs them with ``--debug`` (``+ argv``), and turns a failure
into a CommandError carrying argv, exit code and stderr. Never ``shell=True``.
"""

from __future__ import annotations

import logging
import shlex
import signal
import subprocess
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TextIO

from pymachined.errors import CommandError, PymachineError

logger = logging.getLogger("pymachine.run")


@dataclass(frozen=True)
class Completed:
    """What a finished command left: its argv, exit code and output."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


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
    argv = [str(a) for a in argv]
    logger.debug("+ %s", shlex.join(argv))
    try:
        proc = subprocess.run(  # noqa: S603 - argv list, never a shell
            argv,
            input=input,
            capture_output=True,
            text=True,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        raise PymachineError(
            f"{argv[0]}: command not found",
            hint="install it (see the README's quick start for the packages pymachine needs)",
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandError(argv, -1, f"timed out after {timeout} s") from exc
    done = Completed(tuple(argv), proc.returncode, proc.stdout, proc.stderr)
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stderr)
    return done


def stream(
    argv: Sequence[str],
    *,
    log: TextIO,
    on_line: Callable[[str], None] | None = None,
    env: Mapping[str, str] | None = None,
) -> None:
    """Run argv with stdout and stderr merged, each line appended to log and passed
    to on_line as it arrives; raise CommandError (with the last lines) on failure."""
    argv = [str(a) for a in argv]
    logger.debug("+ %s", shlex.join(argv))
    log.write(f"+ {shlex.join(argv)}\n")
    log.flush()
    tail: deque[str] = deque(maxlen=20)
    try:
        proc = subprocess.Popen(  # noqa: S603 - argv list, never a shell
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env=dict(env) if env is not None else None,
        )
    except FileNotFoundError as exc:
        raise PymachineError(
            f"{argv[0]}: command not found",
            hint="install it (see the README's quick start for the packages pymachine needs)",
        ) from exc
    assert proc.stdout is not None
    with proc:
        for line in proc.stdout:
            log.write(line)
            log.flush()
            tail.append(line.rstrip("\n"))
            if on_line is not None:
                on_line(line.rstrip("\n"))
    if proc.returncode != 0:
        raise CommandError(argv, proc.returncode, "\n".join(tail))


def spawn(
    argv: Sequence[str],
    output: BinaryIO | int,
    stdin: int | None = None,
    pass_fds: Sequence[int] = (),
) -> subprocess.Popen[bytes]:
    """Start argv in its own session, detached from pymachine's terminal, its
    stdout and stderr appended to output (a file or a pipe's fd), its stdin
    from the fd stdin (else /dev/null), and pass_fds open in it; the caller
    watches it."""
    argv = [str(a) for a in argv]
    logger.debug("+ %s &", shlex.join(argv))
    try:
        return subprocess.Popen(  # noqa: S603 - argv list, never a shell
            argv,
            stdin=subprocess.DEVNULL if stdin is None else stdin,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            pass_fds=tuple(pass_fds),
        )
    except FileNotFoundError as exc:
        raise PymachineError(f"{argv[0]}: command not found") from exc


def interactive(argv: Sequence[str]) -> int:
    """Run argv with pymachine's own stdin, stdout and stderr; its exit code, or
    128+N when signal N killed it. As system(3) does, pymachine ignores SIGINT
    and SIGQUIT meanwhile: the terminal sends them to the command too, and it
    is the command's exit that ends pymachine."""
    argv = [str(a) for a in argv]
    logger.debug("+ %s", shlex.join(argv))
    try:
        proc = subprocess.Popen(argv)  # noqa: S603 - argv list
    except FileNotFoundError as exc:
        raise PymachineError(f"{argv[0]}: command not found") from exc
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGQUIT)}
    try:
        code = proc.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 128 - code if code < 0 else code
