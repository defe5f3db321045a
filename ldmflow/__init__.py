"""ldmflow: a distributed pipeline for training and serving latent diffusion models.

One installed package whose rooms keep the repository's top-level folders (mapped in
``pyproject.toml``): ``ldmflow.model`` (``model/``), ``ldmflow.data`` (``data/``),
``ldmflow.registry`` (``registry/``), ``ldmflow.training`` (``training/``),
``ldmflow.serving`` (``serving/``) and ``ldmflow.flows`` (``flows/``). This folder holds
what every room uses: the stage config machinery (:mod:`ldmflow.configs`) and the local
state folder (:mod:`ldmflow.state`). Which room may import which is in
``docs/architecture.md`` and enforced by ``tests/test_layering.py``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ldmflow")
except PackageNotFoundError:  # imported from a checkout that was never installed
    __version__ = "0+unknown"
