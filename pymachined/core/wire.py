"""The one serialiser of pymachine's records and messages. Pure.

Records (machine, network and image records, pymachined's entries) and the
messages between the builtin client and pymachined are frozen dataclasses
whose fields are typed; the spec's pydantic models may sit inside them.
``dump`` turns one into JSON-ready data and ``load`` reads it back, with
pydantic checking every field against its type on the way in, so no record
is hand-parsed and none holds a spec as an unchecked dict.
"""

from __future__ import annotations

from typing import Any, TypeVar, cast

from pydantic import TypeAdapter, ValidationError

T = TypeVar("T")

_ADAPTERS: dict[Any, TypeAdapter[Any]] = {}


def _adapter(kind: Any) -> TypeAdapter[Any]:
    """The validator and serialiser of one type, built once (building one costs
    milliseconds; using one, microseconds)."""
    adapter = _ADAPTERS.get(kind)
    if adapter is None:
        adapter = _ADAPTERS[kind] = TypeAdapter(kind)
    return adapter


def dump(value: object) -> dict[str, Any]:
    """A record or message as JSON-ready data (the spec's fields by their
    aliases, enums by their values, tuples as lists)."""
    data = _adapter(type(value)).dump_python(value, mode="json", by_alias=True)
    return cast(dict[str, Any], data)


def load(kind: type[T], data: object) -> T:
    """A record or message of kind from JSON-ready data; ValueError naming the
    first field that does not fit."""
    try:
        return cast(T, _adapter(kind).validate_python(data))
    except ValidationError as exc:
        raise ValueError(problem(exc)) from None


def load_union(kind: Any, data: object) -> Any:
    """A value of a union of message types (a discriminated union) from
    JSON-ready data; ValueError as for load."""
    try:
        return _adapter(kind).validate_python(data)
    except ValidationError as exc:
        raise ValueError(problem(exc)) from None


def problem(error: ValidationError) -> str:
    """The first problem of a failed load, as one line: the field's path and
    what is wrong with it."""
    first = error.errors(include_url=False)[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"{where}: {first['msg']}" if where else str(first["msg"])
