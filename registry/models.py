"""Registered models: how a folder becomes an MLflow model version, and how a model URI
becomes a local folder (or a ready :class:`~ldmflow.model.sampler.Sampler`) again.

Every version is an MLflow 3 *logged model* of the run that trained it (so metrics, such as
evaluation scores, attach to the model itself) registered under its name. A diffusion
model is an MLflow pyfunc model whose ``data/ldm`` is the model folder
(:mod:`ldmflow.model.model_format`) and whose ``loader_module`` is
:mod:`ldmflow.registry.pyfunc`; an autoencoder is its folder as it is. Model URIs:
``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``models:/NAME/latest``,
``runs:/RUN_ID/PATH`` or a local folder.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldmflow.data import jobs
from ldmflow.errors import LdmflowError
from ldmflow.model import model_format
from ldmflow.registry import tracking

PYFUNC_LOADER = "ldmflow.registry.pyfunc"  # written into every MLmodel: a persisted name
CANDIDATE = "candidate"  # the alias of every newly trained version
MODEL_ID_TAG = "ldmflow.model_id"  # on each version: the MLflow logged model it was made from
EVAL_TAG = "ldmflow.eval."  # on each evaluated version: its scores (ldmflow.training.evaluation.record)


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    source: str
    run_id: str | None
    model_id: str | None = None  # the MLflow logged model (None: a version registered outside ldmflow)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def register_folder(name: str, run_id: str, folder: str | Path, kind: str,
                    tags: dict[str, str] | None = None) -> RegisteredVersion:
    """Log ``folder`` as an MLflow logged model of the run ``run_id`` (MLflow 3: the model is
    an entity of its own, to which metrics attach) and register it as a new version of
    ``name``; ``tags`` go on both, ``kind`` is the logged model's type."""
    client = tracking.client()
    try:
        client.get_registered_model(name)
    except Exception:
        client.create_registered_model(name)
    run = client.get_run(run_id)
    logged = client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id, tags=tags,
                                        model_type=kind)
    try:
        client.log_model_artifacts(logged.model_id, str(folder))
    except Exception:
        client.finalize_logged_model(logged.model_id, "FAILED")
        raise
    client.finalize_logged_model(logged.model_id, "READY")
    # The artifact location itself as the source (the store resolves a models:/ source
    # through the process-wide tracking URI, which ldmflow never sets), with the model id,
    # against which a tracking server checks that source: a logged model's files are not
    # under its run's artifacts.
    version = client.create_model_version(name, logged.artifact_location, run_id=run_id, model_id=logged.model_id,
                                          tags={**(tags or {}), MODEL_ID_TAG: logged.model_id})
    return RegisteredVersion(name, str(version.version), logged.artifact_location, run_id, logged.model_id)


class ModelNotFound(LdmflowError, LookupError):
    """A model URI that names nothing (no such model, version, alias, run or folder)."""


def resolve(uri: str, dest: str | None = None) -> tuple[Path, RegisteredVersion | None]:
    """A local folder holding the model at ``uri``, and its registry entry if it has one.

    ``uri`` is ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``models:/NAME/latest``,
    ``runs:/RUN_ID/PATH`` or a local folder.
    """
    if not uri.startswith(("models:/", "runs:/")):  # a folder: no MLflow import (a second of start-up)
        path = Path(uri)
        if not path.is_dir():
            raise ModelNotFound(f"{uri}: no such model folder")
        return path, None
    import mlflow.artifacts

    registered = None
    source = uri
    if uri.startswith("models:/"):
        registered = resolve_version(uri)
        source = registered.source
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=dest, tracking_uri=tracking.tracking_uri())
    except Exception as exc:
        raise ModelNotFound(f"{uri}: its files could not be fetched: {exc}") from exc
    return Path(local), registered


def resolve_version(uri: str) -> RegisteredVersion:
    """The registry entry of ``models:/NAME/VERSION``, ``@ALIAS`` or ``/latest`` (a concrete version)."""
    rest = uri[len("models:/") :]
    mlflow_client = tracking.client()
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
        raise ModelNotFound(f"{uri}: not in the model registry at {tracking.shown_uri()}") from exc
    return RegisteredVersion(version.name, str(version.version), version.source, version.run_id,
                             version.tags.get(MODEL_ID_TAG))


def alias_version(uri: str) -> str | None:
    """The version an alias URI (``models:/NAME@ALIAS``) points at now; None for other URIs."""
    if not uri.startswith("models:/") or "@" not in uri:
        return None
    return resolve_version(uri).version


def describe_versions(name: str) -> list[dict[str, Any]]:
    """Every version of the registered model ``name``, newest first: its number, aliases,
    training run and creation time, its evaluation scores (the numeric ``ldmflow.eval.*``
    tags, as numbers) and all its ``ldmflow.*`` tags (lineage, promotion decisions)."""
    client = tracking.client()
    try:
        registered = client.get_registered_model(name)
        versions = client.search_model_versions(f"name='{name}'")
    except Exception as exc:
        raise ModelNotFound(f"{name}: not in the model registry at {tracking.shown_uri()}") from exc
    aliases: dict[str, list[str]] = {}
    for alias, version in sorted((registered.aliases or {}).items()):
        aliases.setdefault(str(version), []).append(alias)
    described = []
    for version in sorted(versions, key=lambda v: int(v.version), reverse=True):
        tags = {key: value for key, value in version.tags.items() if key.startswith("ldmflow.")}
        described.append({
            "version": str(version.version), "aliases": aliases.get(str(version.version), []),
            "run_id": version.run_id, "created": version.creation_timestamp / 1000,
            "metrics": {key[len(EVAL_TAG):]: number for key, value in tags.items()
                        if key.startswith(EVAL_TAG) and (number := _number(value)) is not None},
            "tags": tags,
        })
    return described


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def load_sampler(uri: str, device: str = "cpu"):
    """The :class:`~ldmflow.model.sampler.Sampler` of the model at ``uri``, and its registry
    entry (None for a folder)."""
    from ldmflow.model.sampler import Sampler

    folder, registered = resolve(uri)
    return Sampler.from_folder(folder, device), registered


# ---------------------------------------------------------------------------------------
# A diffusion model folder as an MLflow pyfunc model


def signature():
    """Input: one row per image, the fields of a request (:data:`ldmflow.data.jobs.FIELDS`, all
    optional, ``n`` left out); output: the PNG, base64, and its seed."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    inputs = Schema([ColSpec(kind, name, required=False) for name, kind in jobs.FIELDS.items() if name != "n"])
    outputs = Schema([ColSpec("string", "image"), ColSpec("long", "seed")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def package(folder: str | Path, dest: str | Path) -> Path:
    """An MLflow pyfunc model at ``dest`` wrapping the model folder (copied to ``data/ldm``)."""
    import warnings
    from importlib.metadata import version

    import mlflow.pyfunc

    dest = Path(dest)
    with tempfile.TemporaryDirectory() as scratch:
        staged = Path(scratch) / model_format.MLFLOW_DATA  # save_model names the data folder after its source
        shutil.copytree(folder, staged)
        requirements = [f"{name}=={version(name)}" for name in ("torch", "diffusers", "safetensors", "pillow", "pandas")]
        with warnings.catch_warnings():  # no input example: predicting one at save time would sample
            warnings.filterwarnings("ignore", message=".*input example.*", category=UserWarning)
            mlflow.pyfunc.save_model(
                str(dest), loader_module=PYFUNC_LOADER, data_path=str(staged), signature=signature(),
                pip_requirements=requirements + [f"ldmflow=={version('ldmflow')}"],
                metadata={"ldmflow_kind": model_format.KIND},
            )
    return dest


def register(model_folder: str | Path, name: str, run_id: str) -> RegisteredVersion:
    """Package the model folder as an MLflow pyfunc model, log it as a logged model of
    ``run_id`` and register it as a new version of ``name`` with the alias ``candidate``;
    the version's tags carry the model's lineage."""
    info = model_format.read_info(model_format.model_folder(model_folder))
    with tempfile.TemporaryDirectory() as scratch:
        packaged = package(model_folder, Path(scratch) / "model")
        registered = register_folder(name, run_id, packaged, model_format.KIND, tags=lineage_tags(info))
    tracking.client().set_registered_model_alias(name, CANDIDATE, registered.version)
    return registered


def lineage_tags(info: model_format.ModelInfo) -> dict[str, str]:
    """Model-version tags that link back through training run, latents, autoencoder and images."""
    tags = {f"ldmflow.{key}": str(value) for key, value in info.lineage.items()}
    tags["ldmflow.autoencoder"] = str(info.autoencoder.get("uri", ""))
    tags["ldmflow.autoencoder_sha256"] = str(info.autoencoder.get("weights_sha256", ""))
    tags["ldmflow.conditioning"] = info.conditioning
    if info.inpainting:
        tags["ldmflow.inpainting"] = "true"  # its UNet takes the known latents and the mask
    return tags


def check_inpainting_model(uri: str, served_uri: str, where: str = "serve.inpainting_model") -> None:
    """Refuse, in one line, a model that cannot stand in for ``served_uri``'s inpainting:
    one not trained for it (no extra input channels), or of another autoencoder."""
    info = model_format.read_info(model_format.model_folder(resolve(uri)[0]))
    if not info.inpainting:
        raise model_format.ModelError(
            f"{where} {uri}: not trained for inpainting (its UNet takes the latent's {info.latent_shape[0]} "
            f"channels only): train one with train: inpainting: true")
    served = model_format.read_info(model_format.model_folder(resolve(served_uri)[0]))
    if info.autoencoder.get("weights_sha256") != served.autoencoder.get("weights_sha256"):
        raise model_format.ModelError(f"{where} {uri}: made with another autoencoder than {served_uri}")
