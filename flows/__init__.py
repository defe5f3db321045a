"""Prefect flows that compose ldmflow's stages, and the ``ldmflow`` command line."""
