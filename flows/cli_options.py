"""What the ``ldmflow`` subcommands share: option types, config loading with the CLI's error
style, and the one-line failure."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional

import typer

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
    """``section`` of the config file at ``path`` with flag ``overrides``; a bad file or value
    is a usage error naming the field."""
    from ldmflow import configs

    try:
        return configs.load(cls, path, section=section, overrides=overrides)
    except configs.ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--config") from exc


def fail(exc: Exception, code: int = 1) -> typer.Exit:
    """Print ``exc`` as one line on stderr; the exit to raise."""
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(code)
