"""What the ``ldmflow`` subcommands share: option types, config loading with the CLI's error
style, and the one-line failure."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional

import typer

from ldmflow.errors import LdmflowError

ConfigOption = Annotated[
    Optional[str], typer.Option("--config", "-c", help="YAML config file; the stage reads its own section (e.g. shard:).")
]
ModelUri = Annotated[
    str, typer.Argument(metavar="MODEL_URI", help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model or a model folder.")
]


class ImageFormat(str, Enum):
    png = "png"
    jpg = "jpg"


def load_config(cls, path: str | None, section: str, overrides: dict):
    """``section`` of the config file at ``path`` with flag ``overrides`` (a mapping for a
    nested section's flags: ``ray_train={"workers": 4}`` is ``--workers 4``); a bad file is a
    usage error of ``--config``, a bad flag value one of that flag, each naming the field."""
    from ldmflow import configs

    try:
        configs.load(cls, path, section=section)  # the file alone
    except configs.ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--config") from exc
    try:
        return configs.load(cls, path, section=section, overrides=overrides)
    except configs.ConfigError as exc:
        failure = exc
    given = {}  # flag name -> its override
    for name, value in overrides.items():
        if isinstance(value, dict):
            given |= {inner: {name: {inner: v}} for inner, v in value.items() if v is not None}
        elif value is not None:
            given[name] = {name: value}
    for name, override in given.items():  # the flag whose value is refused on its own
        try:
            configs.load(cls, None, overrides=override)
        except configs.ConfigError as exc:
            raise typer.BadParameter(str(exc), param_hint=f"--{name.replace('_', '-')}") from exc
    flags = ", ".join(f"--{name.replace('_', '-')}" for name in given)
    raise typer.BadParameter(str(failure), param_hint=f"--config with {flags}") from failure


def expected_cause(exc: BaseException) -> LdmflowError | None:
    """The failure a user can act on behind ``exc``, or None for a bug. Looks through what
    wraps it on the way to the driver: a Ray task's error (``cause``), Ray Train's worker
    and controller failures, and ``raise … from`` chains; the outermost one found wins (it
    says the most: "no manifest" rather than the missing file under it). An exception
    raised while another was handled is not looked through: it is the failure."""
    seen: set[int] = set()
    queue: list[BaseException | None] = [exc]
    while queue:
        error = queue.pop(0)
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        wrapped = [getattr(error, "cause", None), getattr(error, "_base_exc", None),
                   getattr(error, "controller_failure", None), *(getattr(error, "worker_failures", None) or {}).values()]
        wrapped = [w for w in wrapped if isinstance(w, BaseException)]
        if isinstance(error, LdmflowError) and not wrapped:  # Ray's copy of an error is also of its class
            return error
        queue += [*wrapped, error.__cause__]
    return None


def fail(exc: Exception, code: int = 1) -> typer.Exit:
    """Print ``exc`` as one line on stderr; the exit to raise."""
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(code)
