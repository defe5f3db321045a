"""MLflow: where runs go, how a plain folder becomes a registered model version, and how a
model URI becomes a local folder again.

With no ``MLFLOW_TRACKING_URI`` set, tracking uses SQLite under the local state folder
(``$LDMFLOW_HOME/mlflow.db``) and every experiment keeps its artifacts under
``$LDMFLOW_HOME/mlartifacts``, never ``./mlruns``. With a tracking server set, the server
decides where artifacts go.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"


def state_dir() -> Path:
    return Path(os.environ.get("LDMFLOW_HOME") or ".ldmflow").absolute()


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, or SQLite in the local state folder."""
    uri = os.environ.get(ENV_TRACKING_URI)
    if uri:
        return uri
    state = state_dir()
    state.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{state / 'mlflow.db'}"


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


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    source: str
    run_id: str | None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def register_folder(name: str, run_id: str, artifact_path: str, tags: dict[str, str] | None = None) -> RegisteredVersion:
    """Register the run's artifact folder ``artifact_path`` as a new version of ``name``."""
    mlflow_client = client()
    try:
        mlflow_client.get_registered_model(name)
    except Exception:
        mlflow_client.create_registered_model(name)
    run = mlflow_client.get_run(run_id)
    source = f"{run.info.artifact_uri.rstrip('/')}/{artifact_path}"
    version = mlflow_client.create_model_version(name, source, run_id=run_id, tags=tags or {})
    return RegisteredVersion(name, str(version.version), source, run_id)


class ModelNotFound(LookupError):
    """A model URI that names nothing (no such model, version, alias, run or folder)."""


def resolve(uri: str, dest: str | None = None) -> tuple[Path, RegisteredVersion | None]:
    """A local folder holding the model at ``uri``, and its registry entry if it has one.

    ``uri`` is ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``models:/NAME/latest``,
    ``runs:/RUN_ID/PATH`` or a local folder.
    """
    import mlflow.artifacts

    if not uri.startswith(("models:/", "runs:/")):
        path = Path(uri)
        if not path.is_dir():
            raise ModelNotFound(f"{uri}: no such model folder")
        return path, None
    registered = None
    source = uri
    if uri.startswith("models:/"):
        registered = resolve_version(uri)
        source = registered.source
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=dest, tracking_uri=tracking_uri())
    except Exception as exc:
        raise ModelNotFound(f"{uri}: its files could not be fetched: {exc}") from exc
    return Path(local), registered


def resolve_version(uri: str) -> RegisteredVersion:
    """The registry entry of ``models:/NAME/VERSION``, ``@ALIAS`` or ``/latest`` (a concrete version)."""
    rest = uri[len("models:/") :]
    mlflow_client = client()
    try:
        if "@" in rest:
            name, alias = rest.split("@", 1)
            version = mlflow_client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = rest.partition("/")
            if number in ("", "latest"):
                versions = mlflow_client.search_model_versions(f"name='{name}'")
                if not versions:
                    raise ModelNotFound(f"{uri}: model {name!r} has no versions")
                version = max(versions, key=lambda v: int(v.version))
            else:
                version = mlflow_client.get_model_version(name, number)
    except ModelNotFound:
        raise
    except Exception as exc:
        raise ModelNotFound(f"{uri}: not in the model registry at {tracking_uri()}") from exc
    return RegisteredVersion(version.name, str(version.version), version.source, version.run_id)


class RankZeroTracker:
    """Logs metrics to an MLflow run from rank 0 of a Ray Train worker group only."""

    def __init__(self, run_id: str | None, tracking_uri: str | None, rank: int) -> None:
        from mlflow.tracking import MlflowClient

        self.run_id = run_id
        self.client = MlflowClient(tracking_uri=tracking_uri) if rank == 0 and run_id else None

    def log(self, step: int, **values: float) -> None:
        if self.client is None:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])
