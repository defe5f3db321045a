"""The model a replica serves, and the thread that keeps it on its registry alias.

A replica's model sits in a :class:`ModelSlot` and is only ever replaced whole, under a
lock, after the new one has loaded beside it: a batch reads the slot once and finishes on
the model it started with. With ``models:/NAME@ALIAS`` an :class:`AliasFollower` polls
the alias and swaps when it moves, so a promotion reaches the server without a failed
request; the registry being away only delays that.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("ldmflow.serve")


@dataclass
class Loaded:
    """One model version in memory: the sampler and where it came from."""

    sampler: Any
    uri: str
    name: str | None
    version: str | None
    tags: dict[str, str]
    loaded_at: float


def load_model(uri: str) -> Loaded:
    """The sampler of ``uri`` with its registry version and ``ldmflow.*`` tags (none for a folder)."""
    from ldmflow.registry import models, tracking

    sampler, registered = models.load_sampler(uri)
    if registered is None:
        return Loaded(sampler, uri, None, None, {}, time.time())
    version = tracking.client().get_model_version(registered.name, registered.version)
    tags = {k: v for k, v in version.tags.items() if k.startswith("ldmflow.")}
    return Loaded(sampler, uri, registered.name, registered.version, tags, time.time())


class ModelSlot:
    """The current :class:`Loaded` model and the URI it was asked for, swapped whole;
    ``on_change`` hears of every model put in."""

    def __init__(self, on_change: Callable[[Loaded], None] = lambda loaded: None) -> None:
        self.loaded: Loaded | None = None
        self.uri = ""
        self.on_change = on_change
        self._lock = threading.Lock()

    def put(self, uri: str, loaded: Loaded) -> None:
        with self._lock:
            self.loaded, self.uri = loaded, uri
        self.on_change(loaded)

    def replace(self, uri: str, loaded: Loaded) -> bool:
        """Swap in ``loaded`` if the slot still serves ``uri`` (a reconfigure may have moved it)."""
        with self._lock:
            if uri != self.uri:
                return False
            self.loaded = loaded
        self.on_change(loaded)
        return True


class AliasFollower(threading.Thread):
    """Polls the slot's alias every ``interval()`` seconds (0: paused) and swaps in a new
    version when the alias moves. A daemon thread: it ends with the replica."""

    def __init__(self, slot: ModelSlot, interval: Callable[[], float]) -> None:
        super().__init__(name="alias-follower", daemon=True)
        self.slot, self.interval = slot, interval

    def run(self) -> None:
        while True:
            time.sleep(self.interval() or 10.0)
            if self.interval():  # 0: turned off by a later reconfigure
                self.check()

    def check(self) -> None:
        from ldmflow.registry import models

        uri, current = self.slot.uri, self.slot.loaded
        try:
            version = models.alias_version(uri)
            if version is None or current is None or version == current.version:
                return
            loaded = load_model(uri)
            if self.slot.replace(uri, loaded):
                log.warning("alias %s moved: now serving version %s (was %s)", uri, loaded.version, current.version)
        except Exception as exc:  # the registry being away must not stop the replica
            log.warning("could not follow %s: %s", uri, exc)
