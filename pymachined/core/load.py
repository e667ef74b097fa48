"""The only reader of spec files: YAML (safe) and TOML into spec models.

Everything here is pure but for reading the files named by the caller. Every
problem becomes a Diagnostic naming file, line, column and field; all problems
of a run are collected before SpecError is raised, so a user fixes them in one
pass.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from pymachined.core.spec import KINDS, Declaration
from pymachined.errors import Diagnostic, SpecError

SUFFIXES = (".yaml", ".yml", ".toml")
MAX_FILE_BYTES = 4 * 1024 * 1024
MAX_DEPTH = 32

Path_ = tuple[str | int, ...]

_YAML_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class Mark(NamedTuple):
    """Where a value stands in its file; ``coerced`` is the plain YAML text of a
    scalar that YAML 1.1 read as something other than a string (``no``, ``0755``)."""

    line: int
    column: int | None
    coerced: str | None = None


@dataclass
class Document:
    """One declaration as read from a file, before validation."""

    file: Path
    data: Any
    marks: dict[Path_, Mark] = field(default_factory=dict)

    def mark(self, path: Path_) -> Mark | None:
        """The mark of the longest prefix of path that has one."""
        for end in range(len(path), -1, -1):
            found = self.marks.get(path[:end])
            if found is not None:
                return found
        return None

    def diagnostic(self, path: Path_, message: str, hint: str | None = None) -> Diagnostic:
        """A Diagnostic for the value at path in this document."""
        mark = self.mark(path)
        return Diagnostic(
            file=self.file,
            line=mark.line if mark else None,
            column=mark.column if mark else None,
            field=format_path(path),
            message=message,
            hint=hint,
        )


@dataclass(frozen=True)
class Located:
    """A validated declaration and the document it came from."""

    spec: Declaration
    document: Document

    @property
    def where(self) -> str:
        """``file:line`` of the declaration."""
        mark = self.document.mark(())
        return f"{self.document.file}:{mark.line}" if mark else str(self.document.file)


def format_path(path: Path_) -> str:
    """('ports', 0, 'host') -> 'ports[0].host'."""
    out = ""
    for part in path:
        if part == "[key]":  # pydantic's marker for a problem with a mapping's key
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


# ---------------------------------------------------------------------------
# Finding files


def discover(path: Path) -> list[Path]:
    """Spec files under path: the file itself, or a sorted recursive walk that
    skips hidden files and directories and keeps *.yaml, *.yml and *.toml."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise SpecError([Diagnostic(path, None, None, "", "no such file or directory")])
    found: list[Path] = []
    for candidate in sorted(path.rglob("*")):
        relative = candidate.relative_to(path)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if candidate.suffix in SUFFIXES and candidate.is_file():
            found.append(candidate)
    return found


# ---------------------------------------------------------------------------
# YAML


class _YamlProblem(Exception):
    def __init__(self, at: tuple[int, int], message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.at = at
        self.message = message
        self.hint = hint


_PLAIN_TAGS = {
    "tag:yaml.org,2002:bool": "a boolean",
    "tag:yaml.org,2002:int": "a number",
    "tag:yaml.org,2002:float": "a number",
    "tag:yaml.org,2002:null": "null",
    "tag:yaml.org,2002:timestamp": "a date",
}


_STR = "tag:yaml.org,2002:str"


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _build(
    loader: yaml.SafeLoader,
    node: yaml.Node,
    path: Path_,
    at: tuple[int, int],
    marks: dict[Path_, Mark],
    seen: set[int],
) -> Any:
    """Construct a Python value from a YAML node, recording where each value
    stands (``at``: the line and column to report for it)."""
    if id(node) in seen:
        # The node itself stands where its anchor is; ``at`` is where it is reused.
        raise _YamlProblem(at, "aliases are not supported", "write the value out")
    seen.add(id(node))
    if isinstance(node, yaml.ScalarNode):
        if node.tag == _STR:  # the common case, without the constructor's overhead
            marks[path] = Mark(at[0], at[1])
            return node.value
        coerced = node.value if not node.style and node.tag in _PLAIN_TAGS else None
        marks[path] = Mark(at[0], at[1], coerced)
        try:
            return loader.construct_object(node)
        except (ValueError, KeyError, yaml.constructor.ConstructorError) as exc:
            shown = node.value if len(node.value) <= 40 else node.value[:40] + "..."
            reason = "more digits than any field takes" if "digits" in str(exc) else str(exc)
            raise _YamlProblem(at, f"cannot read {shown!r} as {node.tag}: {reason}") from exc
    marks[path] = Mark(at[0], at[1])
    if len(path) >= MAX_DEPTH:
        raise _YamlProblem(at, f"nested more than {MAX_DEPTH} levels deep")
    if isinstance(node, yaml.SequenceNode):
        return [
            _build(
                loader, item, (*path, index), at if id(item) in seen else _mark(item), marks, seen
            )
            for index, item in enumerate(node.value)
        ]
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = _key(loader, key_node)
            key_path = (*path, key)
            if key in out:
                first = marks[key_path].line
                raise _YamlProblem(
                    _mark(key_node), f"duplicate key {key!r} (first at line {first})"
                )
            # A key's own line is the better place to point at than its value's.
            out[key] = _build(loader, value_node, key_path, _mark(key_node), marks, seen)
        return out
    raise _YamlProblem(at, "unsupported YAML node")  # pragma: no cover


def _key(loader: yaml.SafeLoader, node: yaml.Node) -> str:
    """A mapping key, which must be a string."""
    if node.tag == "tag:yaml.org,2002:merge":
        raise _YamlProblem(_mark(node), "merge keys (<<) are not supported", "write the keys out")
    if not isinstance(node, yaml.ScalarNode):
        raise _YamlProblem(_mark(node), "a key must be a plain string")
    if node.tag == _STR:
        return str(node.value)
    raise _YamlProblem(
        _mark(node),
        f"the key {node.value!r} was read as {_PLAIN_TAGS.get(node.tag, 'a non-string')}",
        f'quote it: "{node.value}"',
    )


def read_yaml(file: Path, text: str) -> tuple[list[Document], list[Diagnostic]]:
    """Documents of a YAML stream; each non-empty document is one declaration."""
    documents: list[Document] = []
    problems: list[Diagnostic] = []
    loader = _YAML_LOADER(text)
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:  # pragma: no cover - check_node said there is one
                break
            if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
                continue  # an empty document, as between two '---'
            marks: dict[Path_, Mark] = {}
            try:
                data = _build(loader, node, (), _mark(node), marks, set())
            except _YamlProblem as problem:
                line, column = problem.at
                problems.append(Diagnostic(file, line, column, "", problem.message, problem.hint))
                continue
            documents.append(Document(file, data, marks))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        message = f"invalid YAML: {exc.problem or exc.context}"
        if mark is None:
            problems.append(Diagnostic(file, None, None, "", message))
        else:
            problems.append(Diagnostic(file, mark.line + 1, mark.column + 1, "", message))
    except yaml.reader.ReaderError as exc:
        before = text[: exc.position]
        line = before.count("\n") + 1
        column = exc.position - (before.rfind("\n") + 1) + 1
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        message = f"invalid YAML: unacceptable character #x{code:04x}: {exc.reason}"
        problems.append(Diagnostic(file, line, column, "", message))
    except yaml.YAMLError as exc:
        problems.append(Diagnostic(file, None, None, "", f"invalid YAML: {exc}"))
    finally:
        loader.dispose()
    return documents, problems


# ---------------------------------------------------------------------------
# TOML

_TOML_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_TOML_KEY = re.compile(
    r"""^\s*((?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*)\s*="""
)


def _toml_key_parts(text: str) -> list[str]:
    parts = re.findall(r"""[A-Za-z0-9_-]+|"[^"]*"|'[^']*'""", text)
    return [p[1:-1] if p[:1] in "\"'" else p for p in parts]


def _toml_marks(text: str) -> dict[Path_, Mark]:
    """Line of every table header and key in a TOML text, by path. tomllib keeps no
    positions, so this follows the headers and keys line by line (skipping the
    inside of multi-line strings); values inside inline tables or arrays take the
    line of their key."""
    marks: dict[Path_, Mark] = {}
    counters: dict[tuple[str, ...], int] = {}
    current: Path_ = ()
    in_string: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        if in_string is not None:
            if line.count(in_string) % 2 == 1:
                in_string = None
            continue
        header = _TOML_HEADER.match(line)
        if header is not None and _TOML_KEY.match(line) is None:
            names = _toml_key_parts(header.group(2))
            resolved: list[str | int] = []
            for depth, name in enumerate(names):
                resolved.append(name)
                key = tuple(names[: depth + 1])
                is_last = depth == len(names) - 1
                if header.group(1) == "[[" and is_last:
                    counters[key] = counters.get(key, -1) + 1
                    resolved.append(counters[key])
                    # A new element starts its own nested arrays of tables afresh.
                    for other in [
                        k for k in counters if len(k) > len(key) and k[: len(key)] == key
                    ]:
                        del counters[other]
                elif key in counters:
                    resolved.append(counters[key])
            current = tuple(resolved)
            marks.setdefault(current, Mark(number, 1))
            continue
        key_match = _TOML_KEY.match(line)
        if key_match is not None:
            path = (*current, *_toml_key_parts(key_match.group(1)))
            column = len(line) - len(line.lstrip()) + 1
            marks.setdefault(path, Mark(number, column))
            rest = line[key_match.end() :]
            for quote in ('"""', "'''"):
                if rest.count(quote) % 2 == 1:
                    in_string = quote
                    break
    return marks


def _table_problem(
    file: Path, marks: dict[Path_, Mark], kind: str, message: str, hint: str | None = None
) -> Diagnostic:
    """A problem with a top-level TOML key or table, at its line."""
    mark = marks.get((kind,)) or marks.get((kind, 0))
    line, column = (mark.line, mark.column) if mark else (None, None)
    return Diagnostic(file, line, column, kind, message, hint)


_TOML_LONG_NUMBER = re.compile(r"(?<![\w.\"'])[+-]?\d[\d_]{400,}")


def _line_column(text: str, offset: int) -> tuple[int, int]:
    """The 1-based line and column of an offset into text."""
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def _toml_too_deep(text: str) -> int | None:
    """The offset where a TOML value opens its (MAX_DEPTH+1)th nested array or
    inline table, or None: tomllib recurses once per level and would run out
    of stack on a deep one. Strings and comments are skipped; a table header
    opens and closes on its own line, so it never counts as deep."""
    depth = 0
    index = 0
    length = len(text)
    while index < length:
        char = text[index]
        if char in "\"'":
            quote = text[index : index + 3] if text.startswith(char * 3, index) else char
            index += len(quote)
            while index < length and not text.startswith(quote, index):
                index += 2 if text[index] == "\\" and quote[0] == '"' else 1
            index += len(quote)
            continue
        if char == "#":
            end = text.find("\n", index)
            index = length if end < 0 else end
            continue
        if char in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return index
        elif char in "]}":
            depth = max(0, depth - 1)
        index += 1
    return None


def read_toml(file: Path, text: str) -> tuple[list[Document], list[Diagnostic]]:
    """Declarations of a TOML file: one object with ``kind``, or arrays of tables
    ``[[machine]]``, ``[[network]]`` and ``[[image]]``."""
    deep = _toml_too_deep(text)
    if deep is not None:
        message = f"nested more than {MAX_DEPTH} levels deep"
        return [], [Diagnostic(file, *_line_column(text, deep), "", message)]
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
        line, column = (int(match[1]), int(match[2])) if match else (None, None)
        message = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
        return [], [Diagnostic(file, line, column, "", f"invalid TOML: {message}")]
    except ValueError:  # Python's limit on converting long digit strings to int
        number = _TOML_LONG_NUMBER.search(text)
        line, column = _line_column(text, number.start()) if number else (None, None)
        message = "invalid TOML: a number with more digits than any field takes"
        return [], [Diagnostic(file, line, column, "", message)]
    marks = _toml_marks(text)
    if "kind" in data or not data:
        marks.setdefault((), Mark(1, 1))
        return ([Document(file, data, marks)] if data else []), []
    documents: list[Document] = []
    problems: list[Diagnostic] = []
    for kind, tables in data.items():
        if kind not in KINDS or not isinstance(tables, list):
            close = difflib.get_close_matches(kind, list(KINDS), n=1)
            hint = f"did you mean [[{close[0]}]]?" if close else None
            problems.append(
                _table_problem(
                    file,
                    marks,
                    kind,
                    "expected `kind = ...` at the top, or arrays of tables "
                    "[[machine]], [[network]] or [[image]]",
                    hint,
                )
            )
            continue
        if not all(isinstance(table, dict) for table in tables):
            problems.append(
                _table_problem(
                    file, marks, kind, f"expected [[{kind}]] tables, not a list of values"
                )
            )
            continue
        for index, table in enumerate(tables):
            prefix = (kind, index)
            own = {p[2:]: m for p, m in marks.items() if p[:2] == prefix}
            body = dict(table)
            if body.get("kind", kind) != kind:
                problems.append(
                    Document(file, body, own).diagnostic(
                        ("kind",), f"kind {body['kind']!r} inside [[{kind}]]"
                    )
                )
                continue
            body["kind"] = kind
            documents.append(Document(file, body, own))
    return documents, problems


# ---------------------------------------------------------------------------
# Validation of one document


def _model_at(model: type[BaseModel], path: Path_) -> type[BaseModel] | None:
    """The model class that describes the value at path, if any."""
    current: Any = model
    for part in path:
        if part == "[key]":  # pydantic's marker for a problem with a mapping's key
            continue
        if isinstance(part, int):
            current = _unwrap(current, element=True)
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field_info = next(
            (f for n, f in current.model_fields.items() if (f.alias or n) == part), None
        )
        if field_info is None:
            return None
        current = _unwrap(field_info.annotation, element=False)
    current = _unwrap(current, element=False)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(annotation: Any, *, element: bool) -> Any:
    """Strip Annotated, Optional and (for element=True) one list level."""
    while True:
        origin = get_origin(annotation)
        args = [a for a in get_args(annotation) if a is not type(None)]
        if origin is list and element:
            annotation, element = args[0], False
        elif origin is not None and origin is not list and origin is not dict and args:
            annotation = args[0]
        else:
            return annotation


def _field_names(model: type[BaseModel]) -> list[str]:
    return [f.alias or n for n, f in model.model_fields.items()]


def _what(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "null" if value is None else "a date"


def _diagnose(document: Document, model: type[BaseModel], error: Any) -> Diagnostic:
    """A pydantic error as a Diagnostic with a message and hint a person can act on."""
    path: Path_ = tuple(error["loc"])
    kind = error["type"]
    message: str = error["msg"]
    hint: str | None = None
    if message.startswith("Value error, "):
        message = message.removeprefix("Value error, ")
    if kind == "extra_forbidden":
        parent = _model_at(model, path[:-1])
        names = _field_names(parent) if parent else []
        close = difflib.get_close_matches(str(path[-1]), names, n=1)
        message = f"unknown field {path[-1]!r}"
        if close:
            hint = f"did you mean {close[0]!r}?"
        elif names:
            hint = "known fields: " + ", ".join(names)
    elif kind == "missing":
        message = "required field is missing"
    mark = document.mark(path)
    if (
        kind not in ("extra_forbidden", "missing")
        and mark is not None
        and mark.coerced is not None
        and document.marks.get(path) is mark
    ):
        value = error.get("input")
        surprising = kind.endswith("_type") or kind in ("enum", "literal_error")
        if surprising or str(value) != mark.coerced:
            if mark.coerced == "":
                message = f"{message} (YAML read an empty value as null)"
            else:
                message = f"{message} (YAML read {mark.coerced!r} as {_what(value)})"
                hint = f'quote it: "{mark.coerced}"'
    return document.diagnostic(path, message, hint)


def validate_document(document: Document) -> tuple[Declaration | None, list[Diagnostic]]:
    """One document as a spec model, or the diagnostics that say why not."""
    data = document.data
    if not isinstance(data, dict):
        return None, [
            document.diagnostic(
                (), "a declaration must be a mapping of fields, such as `name: web`"
            )
        ]
    kind = data.get("kind", "machine")
    model = KINDS.get(kind) if isinstance(kind, str) else None
    if model is None:
        close = difflib.get_close_matches(str(kind), list(KINDS), n=1)
        hint = f"did you mean {close[0]!r}?" if close else "use machine, network or image"
        return None, [document.diagnostic(("kind",), f"unknown kind {kind!r}", hint)]
    try:
        return model.model_validate(data), []
    except ValidationError as exc:
        return None, [_diagnose(document, model, error) for error in exc.errors()]


# ---------------------------------------------------------------------------
# Files and directories


def read_documents(file: Path) -> tuple[list[Document], list[Diagnostic]]:
    """The documents of one spec file, or why it cannot be read."""
    try:
        size = file.stat().st_size
        if size > MAX_FILE_BYTES:
            return [], [
                Diagnostic(
                    file, None, None, "", f"file is {size} bytes; the limit is {MAX_FILE_BYTES}"
                )
            ]
        raw = file.read_bytes()
    except OSError as exc:
        return [], [Diagnostic(file, None, None, "", f"cannot read: {exc.strerror}")]
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        return [], [Diagnostic(file, line, None, "", "file is not valid UTF-8")]
    if file.suffix == ".toml":
        return read_toml(file, text)
    return read_yaml(file, text)


def iter_documents(paths: Iterable[Path]) -> Iterator[tuple[list[Document], list[Diagnostic]]]:
    """Documents file by file for every spec file under paths."""
    for root in paths:
        try:
            files = discover(root)
        except SpecError as exc:
            yield [], list(exc.diagnostics)
            continue
        for file in files:
            yield read_documents(file)


def collect(paths: Sequence[Path]) -> tuple[list[Located], list[Diagnostic]]:
    """Every declaration under paths that is valid on its own, and the problems
    of those that are not."""
    declarations: list[Located] = []
    problems: list[Diagnostic] = []
    for documents, file_problems in iter_documents(paths):
        problems.extend(file_problems)
        for document in documents:
            spec, document_problems = validate_document(document)
            problems.extend(document_problems)
            if spec is not None:
                declarations.append(Located(spec, document))
    return declarations, problems
