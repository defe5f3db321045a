"""How much of the libraries' own output reaches the terminal.

The command line is quiet unless ``-v`` (:func:`ldmflow.flows.runtime.configure` says so):
Ray's worker output and its warnings, Prefect's and MLflow's log lines stay out of the
terminal (Ray's still go to its log folder and dashboard). Used as a library (a test, a
notebook, the flow run a Prefect worker starts) nothing is hidden.
"""

from __future__ import annotations

_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def quiet() -> bool:
    return _quiet
