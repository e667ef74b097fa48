"""The build progress display: one refreshing line on a terminal, plain lines otherwise."""

from __future__ import annotations

import io
import re

from pymachined.images import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


LINES = [
    "I: Retrieving InRelease",
    "I: Retrieving Packages",
    "I: Retrieving libc6 2.36-9",
    "I: Validating libc6 2.36-9",
    "I: Extracting base-files...",
    "I: Configuring libc6:amd64...",
    "I: Retrieving Release",  # a late mention of an earlier phase does not go back
    "I: Base system installed successfully.",
]


def test_plain_lines_name_each_phase_once() -> None:
    out = io.StringIO()
    progress = Progress(out)
    progress.start("slim", "resolving")
    for line in LINES:
        progress.line(line)
    progress.finish("built abc")
    lines = out.getvalue().splitlines()
    phases = [line.split(": ")[1].split(" (")[0] for line in lines[:-1]]
    assert phases == ["resolving", "downloading", "unpacking", "configuring"]
    assert re.fullmatch(r"image slim: built abc in \d+\.\d s", lines[-1])
    assert "\r" not in out.getvalue()


def test_a_terminal_gets_one_refreshing_line() -> None:
    out = Terminal()
    progress = Progress(out)
    progress.start("slim", "resolving")
    for line in LINES:
        progress.line(line)
    progress.finish("built abc")
    text = out.getvalue()
    assert text.count("\n") == 1  # only the final line ends
    assert text.count("\r\x1b[K") == len(LINES) + 2
    assert re.search(r"image slim: built abc in \d+\.\d s\n$", text)
