"""Errors for people: every failure pymachine reports is a PymachineError.

Library code raises these with a message and, where one helps, a hint. Only the
CLI prints them. Pure module.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


class PymachineError(Exception):
    """A failure to report to the operator, with an optional hint."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def lines(self) -> list[str]:
        """The lines the CLI prints after ``error:``."""
        return [self.message]


class UsageError(PymachineError):
    """The command line itself is wrong (exit code 2)."""

    exit_code = 2


@dataclass(frozen=True)
class Diagnostic:
    """One problem in a spec file, located as precisely as the format allows."""

    file: Path | None
    line: int | None
    column: int | None
    field: str
    message: str
    hint: str | None = None

    def location(self) -> str:
        """``file:line:column``, leaving out what is unknown."""
        parts = [str(self.file) if self.file is not None else "<input>"]
        if self.line is not None:
            parts.append(str(self.line))
            if self.column is not None:
                parts.append(str(self.column))
        return ":".join(parts)

    def __str__(self) -> str:
        field = f" {self.field}:" if self.field else ""
        text = f"{self.location()}:{field} {self.message}"
        if self.hint:
            text += f" (hint: {self.hint})"
        return text


class SpecError(PymachineError):
    """One or more problems in the specs; all of a run's problems are collected."""

    def __init__(self, diagnostics: Sequence[Diagnostic]) -> None:
        self.diagnostics = sorted(
            diagnostics,
            key=lambda d: (str(d.file or ""), d.line or 0, d.column or 0, d.field),
        )
        count = len(self.diagnostics)
        summary = f"{count} problem{'s' if count != 1 else ''} in the specs"
        super().__init__(summary, hint="fix the lines above, then run `pymachine validate` again")

    def lines(self) -> list[str]:
        return [str(d) for d in self.diagnostics]


class CommandError(PymachineError):
    """A command pymachine started failed."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        tail = stderr.strip().splitlines()[-5:]
        detail = ("\n" + "\n".join(f"  {line}" for line in tail)) if tail else ""
        super().__init__(
            f"command failed with exit code {returncode}: {' '.join(self.argv)}{detail}",
            hint="run with --debug to see every command pymachine runs",
        )


class StateError(PymachineError):
    """pymachine's own state on this host is unreadable or inconsistent."""


# Failures of the host, not of pymachine: said plainly, without "report it".
HOST_ERRNOS = {
    errno.ENOSPC: "free space on that file system (df -h), then run the command again",
    errno.EDQUOT: "raise the quota or free space, then run the command again",
    errno.EROFS: "remount the file system read-write, then run the command again",
    errno.EIO: "check the disk (dmesg), then run the command again",
}


def host_error(error: OSError) -> PymachineError:
    """A failure of the host (a full disk, a read-only file system…) as a
    PymachineError naming the file it hit."""
    hint = HOST_ERRNOS.get(error.errno or 0, "run the command again")
    where = f": {error.filename}" if error.filename else ""
    message = f"{error.strerror or os.strerror(error.errno or 0)}{where}"
    return PymachineError(message, hint=hint)


@dataclass(frozen=True)
class Failure:
    """One machine (or network) an apply could not converge: the step that
    failed and why."""

    name: str
    step: str
    error: PymachineError

    def lines(self) -> list[str]:
        """The failure as the CLI prints it: the machine and what went wrong,
        the error's further lines indented, and its hint."""
        first, *rest = self.error.message.splitlines() or [""]
        out = [f"{self.name}: {first}", *(f"  {line.strip()}" for line in rest)]
        if self.error.hint:
            out.append(f"  hint: {self.error.hint}")
        return out


class ApplyError(PymachineError):
    """An apply converged what it could; these machines (and what needs them)
    are left for the next apply."""

    def __init__(self, failures: Sequence[Failure]) -> None:
        self.failures = list(failures)
        names = ", ".join(f.name for f in self.failures)
        count = len(self.failures)
        super().__init__(
            f"{count} of the plan's machines or networks did not converge: {names}",
            hint="fix what the lines above say, then apply again: it retries only what is left",
        )

    def lines(self) -> list[str]:
        return [line for failure in self.failures for line in failure.lines()]
