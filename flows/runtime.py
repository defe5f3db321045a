"""The local state folder and the environment the embedded services need.

With no endpoints configured, everything runs on one machine under one state folder
(``.ldmflow/`` by default, ``LDMFLOW_HOME`` or ``--state-dir`` otherwise): Prefect's
local API (:mod:`ldmflow.flows.local_api`) keeps its database there. :func:`configure`
must run before Prefect is imported, because Prefect reads its settings at import time.
"""

from __future__ import annotations

import os
from pathlib import Path

from ldmflow import console, state


def configure(explicit_state_dir: str | None = None, verbose: bool = False) -> Path:
    """Point Prefect at the state folder (unless the environment already says otherwise),
    and keep the libraries' own log lines out of the terminal unless ``verbose``: a failure
    is reported once, by the command (Prefect would log it again, with its traceback, as
    the task's and the flow's)."""
    console.set_quiet(not verbose)
    folder = state.state_dir(explicit_state_dir)
    folder.mkdir(parents=True, exist_ok=True)
    os.environ[state.ENV] = str(folder)
    os.environ.setdefault("PREFECT_HOME", str(folder / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
    if verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    else:
        os.environ["PREFECT_LOGGING_LEVEL"] = "CRITICAL"
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # "🏃 View run …" per run
        os.environ.setdefault("MLFLOW_PRINT_MODEL_URLS_ON_CREATION", "false")
    return folder


def prefect_api() -> str:
    """The Prefect API this command's flows report to: ``PREFECT_API_URL`` if set, else the
    local one under the state folder, kept running between commands (see
    :mod:`ldmflow.flows.local_api`). Call after :func:`configure`, before Prefect is imported."""
    from ldmflow.flows import local_api

    return local_api.use(Path(os.environ["PREFECT_HOME"]))


def verbose() -> bool:
    """Whether the command line was given ``-v``."""
    return not console.quiet()
