"""Quoting for systemd unit and .nspawn files, and a parser to read them back. Pure.

Rendering and reading must agree on every character, so both live here:
``unit_words`` and ``nspawn_words`` quote argv for the two file kinds, and
``parse_unit``/``split_words`` undo them the way systemd does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

OWNER_MARKER = "X-Pymachine-Owner"
"""Key written into every rendered file; prune only removes files that carry it."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class UnsafeValue(ValueError):
    """A value that cannot be written into a unit file safely."""


def refuse_control(value: str) -> str:
    """value, unless it holds a control character (which no rendered file may)."""
    if _CONTROL.search(value):
        raise UnsafeValue(f"refusing to write a control character into a rendered file: {value!r}")
    return value


_PLAIN_WORD = re.compile(r"[A-Za-z0-9_@%+=:,./$~-]+")


def _quote(word: str) -> str:
    """One word as systemd reads it back: bare when that is unambiguous, else in
    double quotes with backslash and double quote escaped."""
    refuse_control(word)
    if _PLAIN_WORD.fullmatch(word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _nspawn_quote(word: str) -> str:
    """One word of an .nspawn word list. There a backslash is an ordinary
    character and quotes only group, so a word is put in whichever quote it does
    not contain, or built from pieces that each are."""
    refuse_control(word)
    if _PLAIN_WORD.fullmatch(word):
        return word
    if '"' not in word:
        return f'"{word}"'
    if "'" not in word:
        return f"'{word}'"
    return '"' + word.replace('"', '"\'"\'"') + '"'


def nspawn_words(words: Iterable[str]) -> str:
    """Words for an .nspawn setting (Parameters=, Environment=). nspawn expands no
    specifiers or variables there and treats backslashes literally."""
    return " ".join(_nspawn_quote(str(w)) for w in words)


def nspawn_path(path: str) -> str:
    """A path inside Bind=/BindReadOnly=, where backslash escapes ':' and itself."""
    refuse_control(path)
    return path.replace("\\", "\\\\").replace(":", "\\:")


def unit_value(value: object) -> str:
    """A single unit-file value: % specifiers escaped, control characters refused,
    no trailing backslash (which would continue the line)."""
    text = refuse_control(str(value)).replace("%", "%%")
    if text.endswith("\\"):
        raise UnsafeValue(f"refusing a trailing backslash in a unit file: {value!r}")
    return text


def unit_words(words: Iterable[str], *, exec_line: bool = False) -> str:
    """Quoted words for a unit setting; on Exec lines ``$`` is escaped too."""
    out = []
    for word in words:
        quoted = _quote(str(word)).replace("%", "%%")
        if exec_line:
            quoted = quoted.replace("$", "$$")
        out.append(quoted)
    return " ".join(out)


# ---------------------------------------------------------------------------
# Reading back


@dataclass(frozen=True)
class Entry:
    """One assignment of a unit file."""

    section: str
    key: str
    value: str


def parse_unit(text: str) -> list[Entry]:
    """The assignments of a unit or .nspawn file, in order, with continuation lines
    joined and comments dropped (systemd.syntax(7))."""
    entries: list[Entry] = []
    section = ""
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip() if pending else raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"not an assignment: {line!r}")
        entries.append(Entry(section, key.strip(), value.strip()))
    return entries


def unescape_specifiers(value: str) -> str:
    """``%%`` -> ``%``; any other specifier is an error in pymachine's own files."""
    out = []
    index = 0
    while index < len(value):
        char = value[index]
        if char == "%":
            if value[index + 1 : index + 2] != "%":
                raise ValueError(f"unexpected specifier in {value!r}")
            index += 1
        out.append(char)
        index += 1
    return "".join(out)


def split_words(value: str, *, exec_line: bool = False, escapes: bool = True) -> list[str]:
    """Words of a setting as systemd splits them: quotes removed, backslash
    escapes resolved (unless escapes=False, as in .nspawn word lists), and on
    Exec lines ``$$`` -> ``$``."""
    words: list[str] = []
    index = 0
    length = len(value)
    while index < length:
        while index < length and value[index] in " \t":
            index += 1
        if index >= length:
            break
        word = []
        quote: str | None = None
        while index < length:
            char = value[index]
            if quote is None and char in " \t":
                break
            if escapes and char == "\\" and index + 1 < length:
                word.append(value[index + 1])
                index += 2
                continue
            if quote is None and char in "\"'":
                quote = char
            elif char == quote:
                quote = None
            elif exec_line and char == "$" and value[index + 1 : index + 2] == "$":
                word.append("$")
                index += 1
            else:
                word.append(char)
            index += 1
        if quote is not None:
            raise ValueError(f"unterminated quote in {value!r}")
        words.append("".join(word))
    return words


def entries_set(entries: Sequence[Entry]) -> set[tuple[str, str, str]]:
    """(section, key, value) triples, for comparing files regardless of order."""
    return {(e.section, e.key, e.value) for e in entries}
