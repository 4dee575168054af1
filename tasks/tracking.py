"""MLflow wiring: where runs go by default, and the experiment with its artifact folder."""
from __future__ import annotations

import os
from pathlib import Path

import mlflow


def tracking_uri(workdir: str | Path) -> str:
    """MLFLOW_TRACKING_URI if set, else a SQLite file in the work directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


def setup(workdir: str | Path, experiment: str) -> str:
    """Point MLflow at the workdir's store and return the experiment id (created if new)."""
    mlflow.set_tracking_uri(tracking_uri(workdir))
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        return exp.experiment_id
    artifacts = (Path(workdir).resolve() / "mlartifacts").as_uri()
    return client.create_experiment(experiment, artifact_location=artifacts)


def client(workdir: str | Path) -> mlflow.MlflowClient:
    """An MLflow client on the workdir's store (MLFLOW_TRACKING_URI if set), also made the default."""
    mlflow.set_tracking_uri(tracking_uri(workdir))
    return mlflow.MlflowClient()


def prefect_flow_run_id() -> str:
    from prefect.runtime import flow_run

    return str(flow_run.id or "")
