"""register: log the model to MLflow, register a version, and gate the champion alias.

Every new version gets the alias `candidate`; `champion` moves to it only when its
gate metric beats the current champion's.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from prefect import task

import model as model_pkg
import model.serving
from tasks import stage, tracking
from tasks.config import RegisterConfig
from tasks.reports import publish_counts

log = logging.getLogger("forja.register")

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "prompt")]),
    outputs=Schema([ColSpec("string")]),
    params=ParamSchema([
        ParamSpec("max_new_tokens", "long", 48), ParamSpec("temperature", "double", 0.8),
        ParamSpec("top_k", "long", 50), ParamSpec("seed", "long", 0),
    ]),
)


def requirements() -> list[str]:
    import safetensors
    import tokenizers

    return [f"torch=={torch.__version__.split('+')[0]}", f"tokenizers=={tokenizers.__version__}",
            f"safetensors=={safetensors.__version__}", f"mlflow=={mlflow.__version__}", "pandas"]


def model_artifacts(trained: stage.Manifest) -> dict[str, str]:
    """Only what serving needs: weights (safetensors), config and tokenizer."""
    from model.generate import CONFIG, TOKENIZER, WEIGHTS

    return {"weights": str(trained.path(WEIGHTS)), "config": str(trained.path(CONFIG)),
            "tokenizer": str(trained.path(TOKENIZER))}


def beats(new: float, old: float | None, direction: str) -> bool:
    if old is None:
        return True
    return new < old if direction == "lower" else new > old


def current_champion(client: mlflow.MlflowClient, name: str, metric: str) -> tuple[str | None, float | None]:
    try:
        champ = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        return None, None
    value = champ.tags.get(f"metric.{metric}")
    return champ.version, (float(value) if value is not None else None)


def build(cfg: RegisterConfig, trained: stage.Manifest, evaluated: stage.Manifest, lineage: dict[str, str],
          workdir: str, out: Path) -> dict:
    if cfg.gate_metric not in evaluated.stats:
        raise ValueError(f"register.gate_metric {cfg.gate_metric!r} is not an evaluate metric; "
                         f"choose one of {[k for k, v in evaluated.stats.items() if isinstance(v, float)]}")
    tracking.setup(workdir, cfg.experiment)
    client = mlflow.MlflowClient()
    run_id = trained.stats["mlflow_run_id"]
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=model.serving.__file__, artifacts=model_artifacts(trained),
            code_paths=[str(Path(model_pkg.__file__).parent)], signature=SIGNATURE,
            input_example=pd.DataFrame({"prompt": ["O Linux é"]}), pip_requirements=requirements(),
        )
    mv = mlflow.register_model(info.model_uri, cfg.model_name)
    value = float(evaluated.stats[cfg.gate_metric])
    tags = {**{f"forja.stage.{s}": k for s, k in lineage.items()}, "prefect.flow_run_id": tracking.prefect_flow_run_id(),
            "mlflow.run_id": run_id, f"metric.{cfg.gate_metric}": value}
    for k, v in tags.items():
        client.set_model_version_tag(cfg.model_name, mv.version, k, str(v))
    client.set_registered_model_alias(cfg.model_name, "candidate", mv.version)
    champ_version, champ_value = current_champion(client, cfg.model_name, cfg.gate_metric)
    promoted = beats(value, champ_value, cfg.gate_direction)
    if promoted:
        client.set_registered_model_alias(cfg.model_name, "champion", mv.version)
    log.info("register: %s version %s (%s=%.4f); champion %s", cfg.model_name, mv.version, cfg.gate_metric, value,
             f"moved from {champ_version}" if promoted else f"stays on {champ_version} ({champ_value:.4f})")
    stats = {"model_name": cfg.model_name, "version": int(mv.version), "model_uri": f"models:/{cfg.model_name}@candidate",
             "mlflow_run_id": run_id, "promoted": promoted, "previous_champion": champ_version,
             cfg.gate_metric: value}
    (out / "registration.json").write_text(json.dumps(stats, indent=2))
    return stats


# The modules whose source is part of this stage's key (and of Prefect's cache key).
CODE = ("tasks.register", "model.serving")


@task(name="register", persist_result=True, cache_policy=stage.cache_policy(*CODE))
def register(cfg: RegisterConfig, trained: stage.Manifest, evaluated: stage.Manifest, lineage: dict[str, str],
             workdir: str) -> stage.Manifest:
    """Register the trained, evaluated model in MLflow and move its aliases."""
    m = stage.run_stage("register", cfg, [trained, evaluated], workdir,
                        lambda out, key: build(cfg, trained, evaluated, lineage, workdir, out), CODE)
    publish_counts("register", m)
    return m
