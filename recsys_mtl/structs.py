"""Frozen dataclasses from TOML: unknown keys, missing keys and wrong types are refused with their location."""

import dataclasses
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from recsys_mtl.errors import InputError, MissingInputError

T = TypeVar("T")


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file, naming the file in any error.

    Raises:
        MissingInputError: the file does not exist.
        InputError: the file is not valid TOML (or not text).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: no such file")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: invalid TOML: {err}") from err


def from_mapping(cls: type[T], data: Any, source: str, prefix: str = "") -> T:
    """Build dataclass `cls` from a parsed TOML table, recursively.

    Args:
        cls: a dataclass whose fields are annotated with plain types, Literals, tuples, dicts, unions and dataclasses.
        data: the parsed table.
        source: where the table came from, for error messages (usually the file).
        prefix: the dotted key of this table within the source ("" at the top).

    Raises:
        InputError: unknown key, missing key, or a value of the wrong type; the message names the key and the source.
    """
    where = f"[{prefix}] in {source}" if prefix else source
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a table, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise InputError(
            f"unknown key {prefix + '.' if prefix else ''}{unknown[0]} in {source} (expected one of {sorted(fields)})"
        )
    kwargs = {}
    for name, field in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], key, source)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise InputError(f"missing key {key} in {source}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise InputError(f"{where}: {err}") from err


def _convert(hint: Any, value: Any, key: str, source: str) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    where = f"{key} in {source}"
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, value, source, key)  # type: ignore[arg-type]
    if origin is Literal:
        if value not in args:
            raise InputError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, key, source)
            except InputError as err:
                errors.append(str(err))
        raise InputError(errors[0])
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise InputError(f"{where}: expected a list, got {value!r}")
        item_hint = args[0] if args else Any
        return tuple(_convert(item_hint, v, f"{key}[{i}]", source) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise InputError(f"{where}: expected a table, got {value!r}")
        return {k: _convert(args[1], v, f"{key}.{k}", source) for k, v in value.items()}
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"{where}: expected a finite number, got {value!r}")
    if hint in (int, float) and isinstance(value, bool):
        raise InputError(f"{where}: expected {hint.__name__}, got {value!r}")
    if not isinstance(value, hint):
        raise InputError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def to_mapping(obj: Any) -> Any:
    """The inverse of `from_mapping`: a dataclass tree as plain dicts, lists and scalars (defaults and None dropped)."""
    if dataclasses.is_dataclass(obj):
        return {
            f.name: to_mapping(v)
            for f in dataclasses.fields(obj)
            if (v := getattr(obj, f.name)) is not None and v != f.default
        }
    if isinstance(obj, tuple | list):
        return [to_mapping(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_mapping(v) for k, v in obj.items()}
    return obj


def list_differences(saved: Any, current: Any, names: tuple[str, str] = ("checkpoint", "config")) -> list[str]:
    """Every leaf where two JSON-like trees differ, as `key.sub: <names[0]> old, <names[1]> new` (sorted keys)."""
    return _differences(saved, current, names, "")


def _differences(saved: Any, current: Any, names: tuple[str, str], prefix: str) -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        return [
            d
            for key in sorted(set(saved) | set(current))
            for d in _differences(saved.get(key), current.get(key), names, f"{prefix}.{key}" if prefix else key)
        ]
    if isinstance(saved, list | tuple) and isinstance(current, list | tuple) and len(saved) == len(current):
        return [
            d
            for i, pair in enumerate(zip(saved, current, strict=True))
            for d in _differences(*pair, names, f"{prefix}[{i}]")
        ]
    return [] if saved == current else [f"{prefix}: {names[0]} {saved!r}, {names[1]} {current!r}"]
