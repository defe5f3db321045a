# syntax=docker/dockerfile:1
#
# The MLflow tracking server for infra/compose.yaml: PostgreSQL for runs and the model
# registry (psycopg2), artifacts proxied to MinIO (boto3). MLflow is pinned to the
# version ldmflow requires (pyproject.toml: mlflow>=3.17,<3.18), so client and server
# agree. Built by compose; nothing from the build context is needed.

FROM python:3.11-slim

ARG MLFLOW_VERSION=3.17.2

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

RUN pip install "mlflow==${MLFLOW_VERSION}" psycopg2-binary boto3

RUN useradd --uid 1000 --create-home --shell /bin/bash mlflow
USER mlflow
WORKDIR /home/mlflow

EXPOSE 5000
ENTRYPOINT ["mlflow"]
CMD ["server", "--host", "0.0.0.0", "--port", "5000"]
