"""Stage configs: frozen dataclasses loaded from YAML, overridden by flags, saved as JSON.

Every stage has one frozen dataclass. A YAML file may hold one stage's fields at the top
level, or several stages under their section names (``shard:``, ``autoencoder:``, …), as
``configs/tiny.yaml`` does. Unknown keys and wrong types are errors that name the field:
a typo in a config never silently falls back to a default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

import yaml

from data import storage

C = TypeVar("C")


class ConfigError(ValueError):
    """A config file or override that does not fit its dataclass."""


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(name, value, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError("; ".join(errors))
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_coerce(f"{name}[{i}]", v, item) for i, v in enumerate(value))
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false", "1", "0", "yes", "no"}:
            return value.lower() in {"true", "1", "yes"}
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return int(value)
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return float(value)
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return from_dict(annotation, value, prefix=f"{name}.")
    raise ConfigError(f"{name}: unsupported field type {annotation!r}")


def from_dict(cls: type[C], values: Mapping[str, Any], prefix: str = "") -> C:
    """Build ``cls`` from a mapping, checking every key and type; missing keys take defaults."""
    hints = typing.get_type_hints(cls)
    fields = {field.name for field in dataclasses.fields(cls) if field.init}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(
            f"unknown {cls.__name__} field(s): {', '.join(prefix + u for u in unknown)} "
            f"(known: {', '.join(sorted(fields))})"
        )
    kwargs = {key: _coerce(prefix + key, value, hints[key]) for key, value in values.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{cls.__name__}: {exc}") from exc


def to_dict(config: Any) -> dict[str, Any]:
    """A config as plain JSON-able values (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def load(cls: type[C], path: str | None = None, section: str | None = None, overrides: Mapping[str, Any] | None = None) -> C:
    """Defaults, then the YAML file at ``path`` (its ``section`` if it has one), then overrides.

    ``overrides`` with value ``None`` are ignored, so unset command-line flags keep the
    file's value.
    """
    values: dict[str, Any] = {}
    if path:
        try:
            loaded = yaml.safe_load(storage.read_text(path)) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        if section is not None and section in loaded:
            loaded = loaded[section]
            if not isinstance(loaded, Mapping):
                raise ConfigError(f"{path}: section {section!r} is not a mapping")
        elif section is not None and _looks_sectioned(loaded, cls):
            loaded = {}
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return from_dict(cls, values)
    except ConfigError as exc:
        where = f"{path}: " if path else ""
        raise ConfigError(f"{where}{exc}") from exc


def _looks_sectioned(loaded: Mapping[str, Any], cls: type) -> bool:
    """True when a file holds other stages' sections and none of ``cls``'s own fields."""
    fields = {field.name for field in dataclasses.fields(cls)}
    return not (set(loaded) & fields) and all(isinstance(v, Mapping) for v in loaded.values())


def read_meta(path, kind: str, cls: type[C], error: type[Exception], prepare=None) -> C:
    """A folder's JSON description file (``ldmflow.json``) as ``cls``, after checking that its
    ``kind`` is ``kind``; every problem is raised as ``error`` naming the file.
    ``prepare`` may rebuild nested values of the parsed mapping before ``cls`` is built."""
    from pathlib import Path

    path = Path(path)
    try:
        body = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise error(f"{path.parent}: not an {kind.replace('.', ' ')} folder (no {path.name})") from exc
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not JSON: {exc}") from exc
    if not isinstance(body, dict) or body.get("kind") != kind:
        found = body.get("kind") if isinstance(body, dict) else None
        raise error(f"{path}: kind is {found!r}, expected {kind!r}")
    try:
        return cls(**(prepare(body) if prepare else body))
    except TypeError as exc:
        raise error(f"{path}: malformed: {exc}") from exc
