"""The spec corpora under tests/cases, run through the CLI in-process.

A bad case is a spec file ``tests/cases/bad/NNN-name.{yaml,yml,toml}``, or a
directory of spec files for problems across files, with a header of comment
lines (in ``expect.txt`` for a directory)::

    # expect: LOCATION FIELD :: MESSAGE
    # absent: TEXT
    # xfail: REASON

- ``expect`` (one or more): a diagnostic that ``pymachine validate CASE`` must
  print. LOCATION is ``LINE:COLUMN``, ``LINE`` (column not checked) or ``-``
  (the diagnostic has no line), prefixed with ``FILE:`` inside a directory
  case. FIELD is the field path as printed, ``-`` for none, ``*`` for any.
  MESSAGE is a substring of the rest of the line, hint included; ``{case}``
  stands for the case's path. The case must print exactly these diagnostics.
- ``absent``: text that must not appear in the output.
- ``xfail``: the case shows a known bug; it is expected to fail (strictly) for
  REASON until the bug is fixed, and then the note is removed.

Good cases under tests/cases/good must validate, each file on its own.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pymachined import cli
from pymachined.core.load import MAX_FILE_BYTES, collect

CASES = Path(__file__).resolve().parent.parent / "cases"
BAD = CASES / "bad"
GOOD = CASES / "good"
SPEC_SUFFIXES = (".yaml", ".yml", ".toml")

_DIRECTIVE = re.compile(r"#\s*(?P<name>expect|absent|xfail):\s*(?P<value>.*\S)\s*$")
_EXPECT = re.compile(r"(?P<location>\S+) (?P<field>\S+) :: (?P<message>.+)")
_LOCATION = re.compile(r"(?:(?P<file>[^:]*[^\d:][^:]*):)?(?:(?P<line>\d+)(?::(?P<column>\d+))?|-)")
_SUMMARY = re.compile(r"error: (\d+) problems? in the specs")


@dataclass(frozen=True)
class Expect:
    """One diagnostic a case must produce."""

    file: str | None
    line: int | None
    column: int | None
    field: str | None  # None: any field
    message: str

    def pattern(self, case: Path) -> re.Pattern[str]:
        """The start of the printed line: ``error: FILE[:LINE[:COLUMN]]: [FIELD: ]``."""
        file = case / self.file if self.file else case
        location = re.escape(str(file))
        if self.line is not None:
            location += f":{self.line}"
            location += f":{self.column}" if self.column is not None else r"(?::\d+)?"
        if self.field is None:
            return re.compile(f"error: {location}: (?:[^ :]+: )?")
        field_part = f"{re.escape(self.field)}: " if self.field else ""
        return re.compile(f"error: {location}: {field_part}")

    def matches(self, case: Path, printed: str) -> bool:
        """Whether a printed diagnostic line is this one."""
        start = self.pattern(case).match(printed)
        message = self.message.replace("{case}", str(case))
        return start is not None and message in printed[start.end() :]


@dataclass
class Case:
    """A bad spec file or directory, and what validating it must print."""

    path: Path
    expects: list[Expect] = field(default_factory=list)
    absent: list[str] = field(default_factory=list)
    xfail: str | None = None


def _header(path: Path) -> list[str]:
    """The leading comment lines of a case (expect.txt for a directory)."""
    source = path / "expect.txt" if path.is_dir() else path
    lines: list[str] = []
    for raw in source.read_bytes().splitlines():
        if not raw.startswith(b"#"):
            break
        lines.append(raw.decode("utf-8"))
    return lines


def parse_expect(text: str, *, in_directory: bool) -> Expect:
    """``LOCATION FIELD :: MESSAGE`` as an Expect."""
    match = _EXPECT.fullmatch(text)
    if match is None:
        raise ValueError(f"not 'LOCATION FIELD :: MESSAGE': {text!r}")
    location = _LOCATION.fullmatch(match["location"])
    if location is None:
        raise ValueError(f"not a location: {match['location']!r}")
    if bool(location["file"]) != in_directory:
        raise ValueError(f"a FILE: prefix is needed in directory cases, and only there: {text!r}")
    field_text = match["field"]
    return Expect(
        file=location["file"],
        line=int(location["line"]) if location["line"] else None,
        column=int(location["column"]) if location["column"] else None,
        field=None if field_text == "*" else "" if field_text == "-" else field_text,
        message=match["message"],
    )


def load_case(path: Path) -> Case:
    """A case with its directives."""
    case = Case(path)
    for line in _header(path):
        directive = _DIRECTIVE.fullmatch(line)
        if directive is None:
            continue
        name, value = directive["name"], directive["value"]
        if name == "expect":
            case.expects.append(parse_expect(value, in_directory=path.is_dir()))
        elif name == "absent":
            case.absent.append(value)
        else:
            case.xfail = value
    return case


def bad_cases() -> list[Case]:
    """Every case under tests/cases/bad, in order."""
    return [
        load_case(path)
        for path in sorted(BAD.iterdir())
        if path.is_dir() or path.suffix in SPEC_SUFFIXES
    ]


def _params() -> Iterator[Any]:
    for case in bad_cases():
        marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
        yield pytest.param(case, id=case.path.name, marks=marks)


def run_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    """``pymachine ARGS`` in this process: exit code, stdout, stderr."""
    monkeypatch.delenv("PYMACHINE_ROOT", raising=False)
    monkeypatch.delenv("PYMACHINE_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["pymachine", *args])
    with pytest.raises(SystemExit) as done:
        cli.main()
    out, err = capsys.readouterr()
    code = done.value.code
    return (code if isinstance(code, int) else 0 if code is None else 1), out, err


def assert_reported(case: Case, code: int, out: str, err: str) -> None:
    """The output of validating a bad case is exactly its expected diagnostics."""
    assert "Traceback" not in err
    assert "internal error" not in err, err
    assert (code, out) == (1, ""), err
    lines = err.splitlines()
    stray = [line for line in lines if not line.startswith(("error: ", "hint: "))]
    assert stray == [], f"output lines that are neither error: nor hint:\n{err}"
    counts = [int(m[1]) for line in lines if (m := _SUMMARY.fullmatch(line))]
    diagnostics = [
        line for line in lines if line.startswith("error: ") and not _SUMMARY.fullmatch(line)
    ]
    assert counts == [len(diagnostics)], err
    unmatched = list(diagnostics)
    for expect in case.expects:
        found = next((line for line in unmatched if expect.matches(case.path, line)), None)
        assert found is not None, f"no diagnostic matches {expect}\n{err}"
        unmatched.remove(found)
    assert unmatched == [], f"diagnostics the case does not expect\n{err}"
    for text in case.absent:
        assert text not in err


@pytest.mark.parametrize("case", list(_params()))
def test_bad_spec(
    case: Case, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(monkeypatch, capsys, "validate", str(case.path))
    assert_reported(case, code, out, err)


def test_the_corpus_is_large_and_well_formed() -> None:
    cases = bad_cases()
    assert len(cases) >= 40
    files = [c.path for c in cases if c.path.is_file()]
    suffixes = {p.suffix for p in files}
    assert {".yaml", ".toml"} <= suffixes
    assert sum(p.suffix == ".toml" for p in files) >= 10
    assert any(c.path.is_dir() for c in cases)
    for case in cases:
        assert re.fullmatch(r"\d{3}-[a-z0-9-]+(\.ya?ml|\.toml)?", case.path.name), case.path
        assert case.expects, f"{case.path.name} has no '# expect:' line"
        if case.path.is_file():
            assert _header(case.path)[0].startswith("# expect: "), case.path.name
        else:
            specs = [p for p in case.path.iterdir() if p.suffix in SPEC_SUFFIXES]
            assert len(specs) >= 2, case.path.name
    numbers = [c.path.name[:3] for c in cases]
    assert len(set(numbers)) == len(numbers)
    stray = [p.name for p in BAD.iterdir() if p.is_file() and p.suffix not in SPEC_SUFFIXES]
    assert stray == []


def test_expect_lines_are_parsed() -> None:
    assert parse_expect("4:12 ports[0].host :: out of range", in_directory=False) == Expect(
        None, 4, 12, "ports[0].host", "out of range"
    )
    assert parse_expect("b.yaml:3 - :: x :: y", in_directory=True) == Expect(
        "b.yaml", 3, None, "", "x :: y"
    )
    assert parse_expect("- * :: too big", in_directory=False) == Expect(
        None, None, None, None, "too big"
    )
    with pytest.raises(ValueError, match="FILE"):
        parse_expect("3:1 name :: x", in_directory=True)
    case = Path("/c.yaml")
    expect = Expect(None, 3, None, "name", "bad")
    assert expect.matches(case, "error: /c.yaml:3:1: name: is bad")
    assert expect.matches(case, "error: /c.yaml:3: name: is bad")
    assert not expect.matches(case, "error: /c.yaml:31:1: name: is bad")
    assert not expect.matches(case, "error: /c.yaml:3:1: names: is bad")
    assert not expect.matches(case, "error: /c.yaml:3:1: name: is good")


def test_alias_bomb_fails_fast(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (bomb,) = BAD.glob("*-yaml-alias-bomb.yaml")
    assert bomb.read_text().count("*a8") == 9  # 9**9 leaves if it were expanded
    code, _, err = run_cli(monkeypatch, capsys, "validate", str(bomb))
    assert code == 1
    assert "aliases are not supported" in err
    assert "Traceback" not in err


def _padded_spec(size: int) -> bytes:
    head = b"name: big\ncommand: [sleep, infinity]\n"
    filler = size - len(head)
    lines, rest = divmod(filler, 64)
    body = (b"#" * 63 + b"\n") * lines
    if rest:
        body += b"#" * (rest - 1) + b"\n"
    data = head + body
    assert len(data) == size
    return data


def test_a_file_over_4_mib_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "big.yaml"
    spec.write_bytes(_padded_spec(MAX_FILE_BYTES + 1))
    code, out, err = run_cli(monkeypatch, capsys, "validate", str(spec))
    assert (code, out) == (1, "")
    assert "Traceback" not in err
    assert err.splitlines()[0] == (
        f"error: {spec}: file is {MAX_FILE_BYTES + 1} bytes; the limit is {MAX_FILE_BYTES}"
    )


def test_a_file_of_exactly_4_mib_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "big.yaml"
    spec.write_bytes(_padded_spec(MAX_FILE_BYTES))
    code, out, err = run_cli(monkeypatch, capsys, "validate", str(spec))
    assert (code, err) == (0, "")
    assert out.startswith("ok: 1 machine,")


def good_specs() -> list[Path]:
    """Every good spec file."""
    return sorted(p for p in GOOD.iterdir() if p.suffix in SPEC_SUFFIXES)


def test_the_good_corpus_has_both_formats() -> None:
    suffixes = {p.suffix for p in good_specs()}
    assert {".yaml", ".toml"} <= suffixes


@pytest.mark.parametrize("spec", good_specs(), ids=lambda p: p.name)
def test_good_spec(
    spec: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(monkeypatch, capsys, "validate", str(spec))
    assert (code, err) == (0, "")
    assert out.startswith("ok: ")


def test_yaml_and_toml_load_to_equal_models() -> None:
    loaded = {}
    for suffix in ("yaml", "toml"):
        found, problems = collect([GOOD / f"equivalent.{suffix}"])
        assert problems == []
        loaded[suffix] = sorted((d.spec for d in found), key=lambda s: (s.kind, s.name))
    assert [(s.kind, s.name) for s in loaded["yaml"]] == [
        ("image", "app"),
        ("machine", "web"),
        ("network", "backend"),
    ]
    assert loaded["yaml"] == loaded["toml"]
