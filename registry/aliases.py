"""Aliases of registered models: which version is ``production``, which held it before, and
going back to it.

The registered model keeps the list of versions that held ``production`` (tag
``ldmflow.production_history``, oldest first); ``previous`` points at the one before the
current, which :func:`rollback` restores. Moving ``production`` forward behind the
evaluation gate is :mod:`ldmflow.training.promotion`'s.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from ldmflow.errors import LdmflowError
from ldmflow.registry import tracking

PRODUCTION = "production"
PREVIOUS = "previous"
HISTORY_TAG = "ldmflow.production_history"


class RegistryError(LdmflowError, LookupError):
    """A registered model or alias that is not there, or a history with nothing to go back to."""


def version_of(name: str, alias: str) -> str | None:
    """The version ``alias`` of model ``name`` points at, or None."""
    try:
        return str(tracking.client().get_model_version_by_alias(name, alias).version)
    except Exception:
        return None


def history(name: str) -> list[str]:
    """Versions that held ``production``, oldest first, the current one last."""
    from mlflow.exceptions import MlflowException

    try:
        tags = tracking.client().get_registered_model(name).tags
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise RegistryError(f"{name}: no registered model of that name at {tracking.shown_uri()}") from None
    return json.loads(tags.get(HISTORY_TAG, "[]"))


def set_production(name: str, version: str, versions: list[str]) -> None:
    client = tracking.client()
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(versions))
    client.set_registered_model_alias(name, PRODUCTION, version)
    if len(versions) > 1:
        client.set_registered_model_alias(name, PREVIOUS, versions[-2])
    elif version_of(name, PREVIOUS) is not None:
        client.delete_registered_model_alias(name, PREVIOUS)


@dataclass(frozen=True)
class Rollback:
    name: str
    restored: str
    replaced: str

    def summary(self) -> str:
        return f"rollback: {self.name}: {PRODUCTION} is version {self.restored} again (was {self.replaced})"


def rollback(name: str) -> Rollback:
    """Move ``production`` back to the version that held it before the current one."""
    past = history(name)
    current = version_of(name, PRODUCTION)
    if current is None:
        raise RegistryError(f"{name}: no version holds {PRODUCTION}")
    if past and past[-1] == current:
        past = past[:-1]
    if not past:
        raise RegistryError(f"{name}: version {current} is the first to hold {PRODUCTION}; there is nothing to roll back to")
    restored = past[-1]
    set_production(name, restored, past)
    tracking.client().set_model_version_tag(name, restored, "ldmflow.rollback",
                                            f"restored {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} "
                                            f"replacing version {current}")
    return Rollback(name, restored, current)
