"""pretrain: train the model on the token shards with DeepSpeed, tracked in MLflow.

The task writes a training spec and runs `python -m model.train` in a child process,
streaming its progress into the Prefect log. Checkpoints live outside the stage folder
(<workdir>/checkpoints/pretrain/<key>), so a crashed or killed run resumes where it
stopped when the flow is run again.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections import deque
from dataclasses import asdict
from pathlib import Path

import mlflow
from prefect import task

import model.config
import model.train
from tasks import stage, tracking
from tasks.config import PretrainConfig
from tasks.reports import flat_counts, publish_counts

log = logging.getLogger("forja.pretrain")
MODEL_FIELDS = ("n_layer", "n_head", "n_kv_head", "n_embd")


def model_config(cfg: PretrainConfig, tokens: stage.Manifest) -> model.config.ModelConfig:
    overrides = {k: getattr(cfg, k) for k in MODEL_FIELDS}
    return model.config.from_preset(cfg.preset, tokens.stats["vocab_size"], tokens.stats["seq_len"], **overrides)


def train_spec(cfg: PretrainConfig, tokens: stage.Manifest, out: Path, ckpt: Path) -> model.train.TrainSpec:
    hp = cfg.model_dump(exclude={"preset", *MODEL_FIELDS})
    return model.train.TrainSpec(
        model=asdict(model_config(cfg, tokens)),
        train_files=[str(p) for p in tokens.files_matching("train-")],
        val_files=[str(p) for p in tokens.files_matching("val-")],
        tokenizer=str(tokens.path("tokenizer.json")), out_dir=str(out), checkpoint_dir=str(ckpt), **hp,
    )


def child_env(run_id: str, threads: int) -> dict:
    env = dict(os.environ, MLFLOW_RUN_ID=run_id, MLFLOW_TRACKING_URI=mlflow.get_tracking_uri(), PYTHONUNBUFFERED="1")
    n = str(threads or os.cpu_count() or 1)
    env.setdefault("OMP_NUM_THREADS", n)  # torch threads set deliberately: oversubscription is slow
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "forja" / "torch_extensions"))
    return env


def run_training(spec_path: Path, env: dict) -> None:
    """Run the training process, logging its lines; raise with its last lines if it fails."""
    tail: deque[str] = deque(maxlen=30)
    proc = subprocess.Popen([sys.executable, "-m", "model.train", str(spec_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        line = line.rstrip()
        tail.append(line)
        if line.startswith(("step", "model:", "resumed")):
            log.info("pretrain: %s", line)
    if proc.wait():
        raise RuntimeError(f"training process exited with {proc.returncode}; last lines:\n" + "\n".join(tail))


def loss_curve(metrics_file: Path, png: Path) -> None:
    """A PNG of train and validation loss against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in metrics_file.read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["train_loss"] for r in rows], label="train")
    val = [r for r in rows if "val_loss" in r]
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="forja pretraining")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def build(cfg: PretrainConfig, tokens: stage.Manifest, workdir: str, experiment: str, out: Path, key: str,
          upstream: list[stage.Manifest] = ()) -> dict:
    ckpt = Path(workdir).resolve() / "checkpoints" / "pretrain" / key
    ckpt.mkdir(parents=True, exist_ok=True)
    spec = train_spec(cfg, tokens, out, ckpt)
    (out / "spec.json").write_text(json.dumps(asdict(spec), indent=2))
    exp_id = tracking.setup(workdir, experiment)
    run_file = ckpt / "mlflow_run_id"  # a resumed training continues the same MLflow run
    run_id = run_file.read_text().strip() if run_file.exists() else None
    with mlflow.start_run(run_id=run_id, experiment_id=None if run_id else exp_id, run_name=f"pretrain-{key[:8]}") as run:
        run_file.write_text(run.info.run_id)
        if not run_id:
            mlflow.log_params({f"pretrain.{k}": v for k, v in cfg.model_dump().items()})
            mlflow.log_params({f"model.{k}": v for k, v in spec.model.items()})
            # The data stages' counts (documents in/out, drops by reason ...) beside the training metrics.
            mlflow.log_metrics({f"data.{m.stage}.{k}": float(v) for m in [*upstream, tokens]
                                for k, v in flat_counts(m.stats).items()})
            mlflow.set_tags({"forja.stage.pretrain": key, "forja.stage.tokenize": tokens.key,
                             "prefect.flow_run_id": tracking.prefect_flow_run_id(), **{
                                 f"forja.stage.{s}": k for s, k in tokens.inputs.items()}})
        if tokens.path("tokens.html").exists():
            mlflow.log_artifact(str(tokens.path("tokens.html")), "tokenizer")
        run_training(out / "spec.json", child_env(run.info.run_id, cfg.threads))
        loss_curve(out / "metrics.jsonl", out / "loss_curve.png")
        mlflow.log_artifact(str(out / "loss_curve.png"))
        mlflow.log_artifact(str(out / "metrics.jsonl"))
    summary = json.loads((out / "train_summary.json").read_text())
    return {**summary, "mlflow_run_id": run.info.run_id, "mlflow_experiment_id": exp_id, "model": spec.model}


# The modules whose source is part of this stage's key (and of Prefect's cache key).
CODE = ("tasks.pretrain", "model.config", "model.data", "model.generate", "model.gpt", "model.train")


@task(name="pretrain", persist_result=True, cache_policy=stage.cache_policy(*CODE))
def pretrain(cfg: PretrainConfig, tokens: stage.Manifest, workdir: str, experiment: str,
             upstream: list[stage.Manifest] = ()) -> stage.Manifest:
    """Train a model from scratch on the tokenize stage's shards (upstream: earlier data stages, for their counts)."""
    m = stage.run_stage("pretrain", cfg, [tokens], workdir,
                        lambda out, key: build(cfg, tokens, workdir, experiment, out, key, upstream), CODE)
    publish_counts("pretrain", m)
    return m
