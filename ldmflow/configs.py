"""Stage configs: frozen dataclasses loaded from YAML, overridden by flags, saved as JSON.

Every stage has one frozen dataclass (:func:`stage_config`), validated by pydantic: types,
bounds and choices are declared on the fields, and unknown keys, wrong types and values
out of bounds are errors that name the field by its path (``train.noise.schedule: ...``):
a typo in a config never silently falls back to a default. A YAML file may hold one
stage's fields at the top level, or several stages under their section names
(``shard:``, ``autoencoder:``, …), as ``configs/tiny.yaml`` does.

Each config says once which of its fields change what its stage produces. Every field is
part of the stage's *identity* unless it is declared with :func:`execution`: a field that
only changes how the work is run or recorded (parallelism, logging, checkpoint cadence,
retries, where checkpoints go, the MLflow experiment). :func:`key` hashes the identity
fields with the stage's inputs, and every cache key, dataset key and run name is made by
it, so a change to an execution field never reruns a stage or restarts a training run,
and a change to an identity field always does. Which field is which, and why, is in
``docs/configuration.md``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import pydantic.dataclasses
import yaml

from ldmflow.errors import UsageError

C = TypeVar("C")


class ConfigError(UsageError, ValueError):
    """A config file or override that does not fit its dataclass."""


# The sections of a config file, one per stage config and `pipeline:`, in pipeline order.
SECTIONS = ("shard", "autoencoder", "precompute", "train", "evaluate", "promote", "serve", "pipeline")

EXECUTION = "ldmflow.execution"  # dataclass field metadata: the field is not part of the identity


def execution(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING) -> Any:
    """A config field that changes how a stage runs, never what it produces."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={EXECUTION: True})


def is_execution(field: dataclasses.Field) -> bool:
    return bool(field.metadata.get(EXECUTION))


@typing.dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field, execution))
def stage_config(cls: type[C]) -> type[C]:
    """Make ``cls`` a stage config: a frozen dataclass that pydantic validates whenever one is
    built (from a file, from flags, or in code), refusing unknown keys. Bounds and meanings
    are declared on the fields (``Annotated[int, Field(ge=1, description=...)]``)."""
    return pydantic.dataclasses.dataclass(frozen=True, config=pydantic.ConfigDict(extra="forbid"))(cls)


def from_dict(cls: type[C], values: Mapping[str, Any], prefix: str = "") -> C:
    """Build ``cls`` from a mapping: types coerced where lossless, bounds and choices checked,
    unknown keys refused; missing keys take defaults. Errors name the field by its path,
    after ``prefix`` (a section, say ``train.``)."""
    try:
        return pydantic.TypeAdapter(cls).validate_python(dict(values))
    except pydantic.ValidationError as exc:
        raise ConfigError("; ".join(_problem(error, prefix) for error in exc.errors())) from None


def _problem(error: Mapping[str, Any], prefix: str) -> str:
    """One pydantic error as ``path.to.field: what is wrong``."""
    where = prefix + ".".join(str(part) for part in error.get("loc", ()))
    message = str(error.get("msg", "invalid"))
    if error.get("type") == "unexpected_keyword_argument":
        message = "unknown field"
    message = message.removeprefix("Value error, ")
    return f"{where.rstrip('.')}: {message}" if where else message


def identity(config: Any) -> dict[str, Any]:
    """The fields of ``config`` (and of its nested configs) that change what its stage
    produces, as plain JSON-able values."""
    values = {}
    for field in dataclasses.fields(config):
        if is_execution(field):
            continue
        value = getattr(config, field.name)
        values[field.name] = identity(value) if dataclasses.is_dataclass(value) else value
    return json.loads(json.dumps(values))


def key(config: Any = None, **inputs: Any) -> str:
    """The one hash behind every cache key, dataset key, run name and resume digest: the
    identity of ``config`` (if given) and what the stage read (``inputs``), 16 hex digits."""
    body = dict(inputs)
    if config is not None:
        body["config"] = identity(config)
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_name(stage: str, config: Any, **inputs: Any) -> str:
    """``STAGE-KEY``: deterministic per (inputs, config identity), so the same job run again
    finds and resumes its own checkpoints, whatever its execution fields say."""
    return f"{stage}-{key(config, **inputs)[:12]}"


def to_dict(config: Any) -> dict[str, Any]:
    """A config as plain JSON-able values (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def load(cls: type[C], path: str | None = None, section: str | None = None, overrides: Mapping[str, Any] | None = None) -> C:
    """Defaults, then the YAML file at ``path`` (its ``section`` if it has one), then overrides.

    ``overrides`` with value ``None`` are ignored, so unset command-line flags keep the
    file's value; a mapping overrides the fields it names of a nested section
    (``{"ray_train": {"workers": 4}}``) and keeps the file's others.
    """
    values: dict[str, Any] = {}
    prefix = ""
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read it: {exc.strerror or exc}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        if section is not None and (section in loaded or _looks_sectioned(loaded, cls)):
            unknown = sorted(set(loaded) - set(SECTIONS))
            if unknown:
                raise ConfigError(f"{path}: unknown section(s) {', '.join(unknown)}: the sections are "
                                  f"{', '.join(SECTIONS)}")
        if section is not None and section in loaded:
            prefix = f"{section}."
            loaded = loaded[section]
            if not isinstance(loaded, Mapping):
                raise ConfigError(f"{path}: section {section!r} is not a mapping")
        elif section is not None and _looks_sectioned(loaded, cls):
            loaded = {}
        values.update(loaded)
    values = _merged(values, overrides or {})
    try:
        return from_dict(cls, values, prefix)
    except ConfigError as exc:
        where = f"{path}: " if path else ""
        raise ConfigError(f"{where}{exc}") from None


def _merged(values: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with ``overrides`` laid over them, nested mappings field by field, None skipped."""
    merged = dict(values)
    for name, value in overrides.items():
        if isinstance(value, Mapping):
            below = merged.get(name)
            merged_below = _merged(below if isinstance(below, Mapping) else {}, value)
            if merged_below:
                merged[name] = merged_below
        elif value is not None:
            merged[name] = value
    return merged


def _looks_sectioned(loaded: Mapping[str, Any], cls: type) -> bool:
    """True when a file holds other stages' sections and none of ``cls``'s own fields."""
    fields = {field.name for field in dataclasses.fields(cls)}
    return not (set(loaded) & fields) and all(isinstance(v, Mapping) for v in loaded.values())
