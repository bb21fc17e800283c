"""TOML tables -> frozen dataclasses, strictly: the dataclass fields ARE the schema.

`from_table(cls, table, where)` builds `cls` from a parsed TOML table. Every key must name a field (a field may
carry a different TOML key in `metadata={"key": ...}`, e.g. `from`, a Python keyword); values are checked against
the field's annotation (str, int, float, bool, Literal[...], X | None, tuple[X, ...], nested dataclasses and arrays
of tables). A failure raises SchemaError(where, message) with the dotted key path (`frontend.window`,
`graphs[2].feeds[1].from`), so the caller can name the file once. A dataclass's own `__post_init__` checks values
and raises SchemaError with a key relative to itself; from_table prefixes the path.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar, get_args, get_origin

T = TypeVar("T")


class SchemaError(ValueError):
    """A TOML value does not fit the schema; `where` is the dotted key path ("" for the document itself)."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}" if where else message)
        self.where = where
        self.message = message


def toml_key(field: dataclasses.Field[Any]) -> str:
    return str(field.metadata.get("key", field.name))


def allowed_keys(cls: type) -> list[str]:
    """The TOML keys of dataclass `cls` (fields marked metadata={"internal": True} are not keys)."""
    return [toml_key(f) for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


def join(where: str, key: str) -> str:
    return f"{where}.{key}" if where and key else where or key


def from_table(cls: type[T], table: Any, where: str = "") -> T:
    """Build dataclass `cls` from `table` (a dict from tomllib), rejecting unknown keys and wrong types."""
    if not isinstance(table, Mapping):
        raise SchemaError(where, f"expected a table, got {_describe(table)}")
    keys = allowed_keys(cls)
    fields = {key: f for f in dataclasses.fields(cls) if (key := toml_key(f)) in keys}  # type: ignore[arg-type]
    for key in table:
        if key not in fields:
            raise SchemaError(join(where, key), f"unknown key{_suggest(key, fields)}; allowed in "
                              f"{'[' + where + ']' if where else 'the top level'}: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for key, field in fields.items():
        if key in table:
            values[field.name] = convert(hints[field.name], table[key], join(where, key))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise SchemaError(join(where, key), "required key is missing")
    try:
        return cls(**values)
    except SchemaError as error:
        raise SchemaError(join(where, error.where), error.message) from None


def convert(hint: Any, value: Any, where: str) -> Any:
    """`value` checked against the annotation `hint` (lists become tuples)."""
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return convert(option, value, where)
            except SchemaError as error:
                if error.where != where:  # the value had the option's shape; a key inside it is wrong
                    raise
                errors.append(error.message)
        raise SchemaError(where, " or ".join(errors))
    if origin is typing.Literal:
        choices = get_args(hint)
        if value not in choices:
            raise SchemaError(where, f"{value!r} is not one of {', '.join(repr(c) for c in choices)}")
        return value
    if origin is tuple:
        item = get_args(hint)[0]
        if not isinstance(value, list):
            raise SchemaError(where, f"expected an array, got {_describe(value)}")
        return tuple(convert(item, v, f"{where}[{i + 1}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(hint):
        return from_table(hint, value, where)  # type: ignore[arg-type]
    return _scalar(hint, value, where)


def _scalar(hint: Any, value: Any, where: str) -> Any:
    if hint is Any:
        return value
    if hint is Path:  # relative to nothing yet: the caller resolves it against its file
        if isinstance(value, str) and value:
            return Path(value)
        raise SchemaError(where, f"expected a path string, got {_describe(value)}")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    # bool is an int in Python but never in a spec: `frame = true` is a mistake
    if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise SchemaError(where, f"expected {_type_name(hint)}, got {_describe(value)}")


def _type_name(hint: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(hint, str(hint))


def _describe(value: Any) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "a table"}.get(type(value), type(value).__name__)
    return f"{kind} ({value!r})" if not isinstance(value, (dict, list)) else kind


def _suggest(key: str, known: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def to_table(obj: Any) -> Any:
    """The inverse of from_table: a dataclass as plain TOML/JSON values (None left out, tuples as lists, paths as
    strings), so from_table(type(obj), to_table(obj)) == obj."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        table = {}
        for field in dataclasses.fields(obj):
            value = getattr(obj, field.name)
            if value is not None and not field.metadata.get("internal"):
                table[toml_key(field)] = to_table(value)
        return table
    if isinstance(obj, (tuple, list)):
        return [to_table(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
