"""MLflow: where runs and registered models go.

With no ``MLFLOW_TRACKING_URI`` set, tracking uses SQLite under the local state folder
(``$LDMFLOW_HOME/mlflow.db``) and every experiment keeps its artifacts under
``$LDMFLOW_HOME/mlartifacts``, never ``./mlruns``. With a tracking server set, the server
decides where artifacts go.
"""

from __future__ import annotations

import os

from ldmflow.state import state_dir

ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, or SQLite in the local state folder."""
    uri = os.environ.get(ENV_TRACKING_URI)
    if uri:
        return uri
    state = state_dir()
    state.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{state / 'mlflow.db'}"


def shown_uri() -> str:
    """The tracking URI as messages may show it: a user and password in it are masked."""
    uri = tracking_uri()
    scheme, sep, rest = uri.partition("://")
    host, slash, path = rest.partition("/")
    if sep and "@" in host:
        return f"{scheme}://***@{host.rsplit('@', 1)[1]}{slash}{path}"
    return uri


def client():
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(name: str) -> str:
    """The id of experiment ``name``, created (with local artifacts when embedded) if missing."""
    mlflow_client = client()
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if not os.environ.get(ENV_TRACKING_URI):
        location = (state_dir() / "mlartifacts" / name).as_uri()
    try:
        return mlflow_client.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another process
        experiment = mlflow_client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id
