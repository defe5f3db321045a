"""The local state folder: where everything embedded lives when no service is configured.

``.ldmflow/`` in the working directory by default, ``LDMFLOW_HOME`` (or the command line's
``--state-dir``, which sets it) otherwise. MLflow's SQLite database and artifacts, Ray
Train checkpoints, Prefect's local API, sample grids, model folders and cached evaluation
classifiers all go under it.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "LDMFLOW_HOME"
DEFAULT = ".ldmflow"


def state_dir(explicit: str | None = None) -> Path:
    """``explicit``, else ``$LDMFLOW_HOME``, else ``./.ldmflow``, as an absolute path."""
    return Path(explicit or os.environ.get(ENV) or DEFAULT).absolute()
