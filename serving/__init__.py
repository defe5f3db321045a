"""The Ray Serve sampler (HTTP API, replicas, alias following), the MLflow pyfunc face of a
registered model, and the diffusers export. Never imports training.
"""
