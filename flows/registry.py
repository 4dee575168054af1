"""Registry flows, so a person can move the champion from the Prefect UI (deployments
`promote` and `rollback` in prefect.yaml) as `forja promote` / `forja rollback` do."""
from __future__ import annotations

import logging
import os

from prefect import flow

from flows.runtime import forward_logs
from tasks.models import registry, tracking

log = logging.getLogger("forja.registry")


def _workdir(workdir: str | None) -> str:
    return os.path.abspath(workdir or os.environ.get("FORJA_WORKDIR") or "work")


@flow(name="forja-promote", log_prints=True)
def promote(model_name: str = "forja-demo", version: int = 1, workdir: str = "") -> dict:
    """Move the champion alias of a registered model to a version (a person's decision).

    Args:
        model_name: the registered model, e.g. forja-demo.
        version: the version that becomes champion.
        workdir: the work directory whose MLflow store is used when MLFLOW_TRACKING_URI is not set.
    """
    forward_logs()
    wd = _workdir(workdir)
    client = tracking.client(wd)
    with registry.registry_lock(wd, model_name):  # queues behind a gate in progress
        old = registry.promote(client, model_name, str(version))
    log.info("%s: champion %s -> %s", model_name, old, version)
    return {"model": model_name, "previous_champion": old, "champion": str(version)}


@flow(name="forja-rollback", log_prints=True)
def rollback(model_name: str = "forja-demo", workdir: str = "") -> dict:
    """Move the champion alias back to the version it was on before.

    Args:
        model_name: the registered model, e.g. forja-demo.
        workdir: the work directory whose MLflow store is used when MLFLOW_TRACKING_URI is not set.
    """
    forward_logs()
    wd = _workdir(workdir)
    client = tracking.client(wd)
    with registry.registry_lock(wd, model_name):
        old, new = registry.rollback(client, model_name)
    log.info("%s: champion %s -> %s", model_name, old, new)
    return {"model": model_name, "previous_champion": old, "champion": new}
