"""``ldmflow.json``: the description file of every ldmflow model folder (the autoencoder
folder of :mod:`ldmflow.model.autoencoders`, the diffusion model folder of
:mod:`ldmflow.model.model_format`), read one way.

Each names its ``kind`` and the ``version`` of that kind's format. A folder of another
version is refused with one line naming both versions, never converted: an ldmflow reads
the format it writes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TypeVar

C = TypeVar("C")
NAME = "ldmflow.json"


def read(path, kind: str, version: int, cls: type[C], error: type[Exception], prepare=None) -> C:
    """A folder's JSON description file (``ldmflow.json``) as ``cls``, after checking that its
    ``kind`` is ``kind`` at format ``version``; every problem is raised as ``error`` naming the
    file. ``prepare`` may rebuild nested values of the parsed mapping before ``cls`` is built."""
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
    check_version(body.get("version", 0), version, f"{path}: {kind}", "train it again with this ldmflow", error)
    try:
        return cls(**(prepare(body) if prepare else body))
    except TypeError as exc:
        raise error(f"{path}: malformed: {exc}") from exc


def check_version(found: object, version: int, what: str, remedy: str, error: type[Exception]) -> None:
    """Refuse a format of another ``version`` than this ldmflow's, in one line (``found`` 0:
    written before formats were versioned)."""
    if found == version:
        return
    if isinstance(found, int) and found > version:
        raise error(f"{what} format version {found} is newer than this ldmflow's ({version}): upgrade ldmflow")
    raise error(f"{what} format version {found} is older than this ldmflow's ({version}) and is not converted: {remedy}")


def file_sha256(path: str | Path) -> str:
    """The sha256 of a (weights) file, read in 1 MiB blocks: a model file's identity."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
