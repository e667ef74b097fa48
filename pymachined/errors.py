"""Errors for people: every failure pymachine reports is a PymachineError.

Library code raises these with a message and, where one helps, a hint. Only the
CLI prints them. Pure module.
"""

from __future__ import annotations

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
