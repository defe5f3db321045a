"""MLflow: where runs and models are recorded, how a model folder becomes a registered
version and a model URI a folder again, and the aliases (``candidate``, ``production``,
``previous``) that say which version is which. Never imports Ray or Prefect.
"""
