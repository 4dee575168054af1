"""register: log the model to MLflow, register a version, and gate the champion alias
(the rules are in tasks/models/registry.py)."""
from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import mlflow
import requests
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from prefect import task

import model as model_pkg
import model.serving
from model.checkpoint import disk_full, file_sha256
from model.faults import fault_point
from model.generate import WEIGHTS
from tasks import cost, stage
from tasks.models import registry, tracking
from tasks.config import RegisterConfig
from tasks.reports import publish_counts

log = logging.getLogger("forja.register")

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "prompt")]),
    outputs=Schema([ColSpec("string")]),
    params=ParamSchema([
        ParamSpec("max_new_tokens", "long", 48), ParamSpec("temperature", "double", 0.8),
        ParamSpec("top_k", "long", 50), ParamSpec("top_p", "double", 1.0), ParamSpec("seed", "long", -1),
        ParamSpec("chat", "boolean", False),
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


def rescorer(evaluated: stage.Manifest, metric: str, workdir: str, device: str = "auto"):
    """Scores a champion on the candidate's suite when its recorded value came from another file,
    with the champion loaded where the config's `device` says (CUDA in bf16 when present)."""
    from tasks.config import EvaluateConfig
    from tasks.evaluate import evaluate_model, placement

    cfg = EvaluateConfig(**{k: v for k, v in evaluated.config.items() if k != "suites_sha256"})
    suite = registry.suite_of(metric)

    def rescore(champion) -> float:
        if suite is None:
            raise ValueError(f"champion {champion.version} has no {metric!r} and held-out metrics cannot be "
                             "recomputed here; gate on a suite metric")
        where = placement(device, "register (champion re-scoring)")
        model, tokenizer = registry.load_version(mlflow.MlflowClient(), champion, where)
        sub = cfg.model_copy(update={"suites": [s for s in cfg.suites if s.name == suite]})
        value = evaluate_model(model, tokenizer, sub)[0][metric]
        log.info("register: champion %s re-scored on the current %s suite: %s %.4f", champion.version, suite,
                 metric, value)
        return value
    return rescore


class TrackingUnavailable(ConnectionError):
    """The tracking server did not answer; retrying later is the cure (the flow's retries)."""


def tracking_answers(uri: str) -> bool:
    """Whether an http(s) tracking server answers its health check; other stores are assumed up."""
    if not tracking.is_remote(uri):
        return True
    try:
        return requests.get(uri.rstrip("/") + "/health", timeout=5).ok
    except requests.RequestException:
        return False


def logged_model_uri(run_id: str, weights_sha256: str) -> str | None:
    """The model logged for these weights in the training run: one a failed attempt logged
    before it could register it, or a new one."""
    from mlflow.entities import LoggedModelStatus

    experiment = mlflow.get_run(run_id).info.experiment_id
    earlier = [m for m in mlflow.search_logged_models(
        experiment_ids=[experiment], output_format="list",
        filter_string=f"source_run_id = '{run_id}' AND tags.weights_sha256 = '{weights_sha256}'")
        if m.status == LoggedModelStatus.READY]  # (the status filter does not match on SQLite stores)
    if earlier:
        log.info("register: reusing logged model %s from an earlier attempt", earlier[0].model_id)
        return earlier[0].model_uri
    return None


def log_model(trained: stage.Manifest, run_id: str, weights_sha256: str) -> str:
    """Log the servable model (pyfunc) into the training run; its URI. The signature says what it
    takes; no input example, whose check would load the model before it is registered, which
    serving refuses (it serves only weights a registered version vouches for)."""
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=model.serving.__file__, artifacts=model_artifacts(trained),
            code_paths=[str(Path(model_pkg.__file__).parent)], signature=SIGNATURE,
            pip_requirements=requirements(), model_config={"weights_sha256": weights_sha256},
            tags={"weights_sha256": weights_sha256},  # with the model, so a retry after any crash finds it
        )
    return info.model_uri


def register_version(cfg: RegisterConfig, trained: stage.Manifest, run_id: str, weights_sha256: str,
                     tags: dict[str, str]):
    """The version of cfg.model_name holding these weights: an existing one (a retry after a
    crash, or a concurrent run with the same weights), or a new one. Call under the registry
    lock, so the check and the registration are one step for every machine."""
    client = mlflow.MlflowClient()
    mv = registry.find_by_weights(client, cfg.model_name, weights_sha256)
    if mv is not None:
        log.info("register: %s version %s already holds these weights (sha256 %s); reusing it", cfg.model_name,
                 mv.version, weights_sha256[:12])
        for k, v in tags.items():
            if k not in mv.tags:  # keep the lineage of the first registration
                client.set_model_version_tag(cfg.model_name, mv.version, k, v)
        return mv, True
    uri = logged_model_uri(run_id, weights_sha256) or log_model(trained, run_id, weights_sha256)
    fault_point("register:logged")
    # tags go in with the version, so no crash can leave a version without its weights_sha256
    mv = mlflow.register_model(uri, cfg.model_name, tags=tags)
    fault_point("register:version-created")
    return mv, False


def model_cost(lineage: dict[str, str], workdir: str, run_started: float | None) -> list[dict]:
    """The cost table (tasks.cost) of the stages that made this model, read from their manifests:
    a stage made before run_started (the flow run's start) is marked reused."""
    rows = []
    for name, key in lineage.items():
        m = stage.read_manifest(stage.stage_dir(workdir, name, key))
        if m is not None:
            rows.append(cost.stage_row(name, m.cost, run_started is not None and m.created_at < run_started))
    return rows


def publish_cost(rows: list[dict], title: str, run_id: str) -> None:
    """The cost table in the training run (cost/cost.md and a table, cost/cost.json) and in the
    Prefect run (a markdown and a table artifact)."""
    md = cost.markdown(rows, title)
    client = mlflow.MlflowClient()
    client.log_text(run_id, md, "cost/cost.md")
    client.log_table(run_id, {k: [r.get(k) for r in rows] for k in rows[0]}, "cost/cost.json")
    try:
        from prefect.artifacts import create_markdown_artifact, create_table_artifact

        create_markdown_artifact(key="model-cost", markdown=md, description=title)
        create_table_artifact(key="model-cost-table", table=rows, description=title)
    except Exception as e:  # a view, never a failure
        log.warning("could not publish the cost artifacts: %s", e)


def build(cfg: RegisterConfig, trained: stage.Manifest, evaluated: stage.Manifest, lineage: dict[str, str],
          workdir: str, out: Path, extra_tags: dict[str, str] | None = None, device: str = "auto",
          run_started: float | None = None) -> dict:
    metrics = {k: float(v) for k, v in evaluated.stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if cfg.gate_metric not in metrics:
        raise ValueError(f"register.gate_metric {cfg.gate_metric!r} is not an evaluate metric; "
                         f"choose one of {sorted(metrics)}")
    uri = tracking.tracking_uri(workdir)
    try:
        return _build(cfg, trained, evaluated, lineage, workdir, out, extra_tags, metrics, device, run_started)
    except (MlflowException, requests.RequestException, OSError) as e:
        if store_full(e, workdir):
            raise stage.StageDiskFull(
                errno.ENOSPC, f"register: the disk holding the MLflow store or its artifacts is full ({e}); free space "
                f"on the filesystem of {Path(workdir).resolve()} (or the tracking server's) and run again: a retry reuses "
                f"whatever this attempt registered, and the trained model stays in {trained.folder}") from e
        if isinstance(e, OSError) or tracking_answers(uri):
            raise
        raise TrackingUnavailable(
            f"the MLflow tracking server at {uri} does not answer ({type(e).__name__}); nothing is lost: the "
            f"trained model stays in its stage folder {trained.folder}. Start the server (or fix "
            "MLFLOW_TRACKING_URI) and run again: a retry reuses whatever this attempt registered") from e


def store_full(exc: BaseException, workdir: str) -> bool:
    """Whether registering failed because a disk filled up: ENOSPC in the chain, or SQLite's own
    words for it (the MLflow store on a SQLite file reports no errno)."""
    if disk_full(exc, Path(workdir)):
        return True
    e: BaseException | None = exc
    while e is not None and "database or disk is full" not in str(e):
        e = e.__cause__ or e.__context__
    return e is not None


def _build(cfg: RegisterConfig, trained: stage.Manifest, evaluated: stage.Manifest, lineage: dict[str, str],
           workdir: str, out: Path, extra_tags: dict[str, str] | None, metrics: dict[str, float],
           device: str = "auto", run_started: float | None = None) -> dict:
    tracking.setup(workdir, cfg.experiment)
    client = mlflow.MlflowClient()
    run_id = trained.stats["mlflow_run_id"]
    weights_sha256 = file_sha256(trained.path(WEIGHTS))
    costs = model_cost(lineage, workdir, run_started)
    tags = {**{f"forja.stage.{s}": k for s, k in lineage.items()}, "prefect.flow_run_id": tracking.prefect_flow_run_id(),
            "mlflow.run_id": run_id, "weights_sha256": weights_sha256, **cost.version_tags(costs),
            **(extra_tags or {})}
    tags = {k: str(v) for k, v in tags.items()}
    with registry.registry_lock(workdir, cfg.model_name):
        mv, reused = register_version(cfg, trained, run_id, weights_sha256, tags)
        registry.record_metrics(client, client.get_model_version(cfg.model_name, mv.version), metrics,
                                evaluated.stats.get("suite_sha256", {}))
        fault_point("register:metrics-recorded")
        client.set_registered_model_alias(cfg.model_name, registry.CANDIDATE, mv.version)
        fault_point("register:candidate-alias")
        decision = registry.gate(client, cfg.model_name, mv.version, cfg.gate_metric, cfg.gate_direction,
                                 cfg.gate_margin, rescorer(evaluated, cfg.gate_metric, workdir, device))
    if costs:
        publish_cost(costs, f"What {cfg.model_name} version {mv.version} cost", run_id)
        (out / "cost.md").write_text(cost.markdown(costs, f"What {cfg.model_name} version {mv.version} cost"))
    log.info("register: %s version %s (%s=%.4f); champion %s", cfg.model_name, mv.version, cfg.gate_metric,
             metrics[cfg.gate_metric], f"moved from {decision['previous_champion']}" if decision["promoted"]
             else f"stays on {decision['previous_champion']} ({decision['champion_value']:.4f})")
    stats = {"model_name": cfg.model_name, "version": int(mv.version), "model_uri": f"models:/{cfg.model_name}@candidate",
             "mlflow_run_id": run_id, "weights_sha256": weights_sha256, "reused_version": reused, **decision}
    (out / "registration.json").write_text(json.dumps(stats, indent=2))
    return stats


# The modules whose source is part of this stage's key (and of Prefect's cache key).
CODE = ("tasks.register", "tasks.models.registry", "model.serving")


@task(name="register", **stage.task_options(*CODE))
def register(cfg: RegisterConfig, trained: stage.Manifest, evaluated: stage.Manifest, lineage: dict[str, str],
             workdir: str, extra_tags: dict[str, str] | None = None, device: str = "auto",
             run_started: float | None = None) -> stage.Manifest:
    """Register the trained, evaluated model in MLflow and move its aliases. device (the config's
    top-level `device`) is where the gate re-scores a champion measured on another suite file; it
    is not part of the key: a champion scored on another machine gives the same result.
    run_started (the flow's start, time.time()) marks the stages made before it as reused in the
    version's cost; not part of the key either."""
    m = stage.run_stage("register", cfg, [trained, evaluated], workdir,
                        lambda out, key: build(cfg, trained, evaluated, lineage, workdir, out, extra_tags, device,
                                               run_started),
                        CODE)
    publish_counts("register", m)
    return m
