"""pretrain: train the model on the token shards with DeepSpeed, tracked in MLflow.

The task writes a training spec and runs `python -m model.train` in a child process,
streaming its progress into the Prefect log. Checkpoints live outside the stage folder
(<workdir>/checkpoints/pretrain/<key>), so a crashed or killed run resumes where it
stopped when the flow is run again.

From scratch by default; with pretrain.init_from (models:/NAME@champion) training starts from
that registered version's weights: the flow resolves it once (init_base), the tokenize stage
encodes with its tokenizer, the shape is checked before training, and the run and the version
it registers carry forja.init_from = NAME/VERSION.

The MLflow run is named after the Prefect flow run and the model, links back to the flow run,
lists the token rows as its dataset inputs, and keeps the data stages' counts as params and a
table (data_counts.json), leaving its metrics page to the training curves.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

import mlflow
from prefect import task

import model.config
import model.kernels
import model.train
from model.checkpoint import file_sha256
from model.diagram import draw as draw_model
from model.generate import CONFIG, TOKENIZER, WEIGHTS
from tasks import launch, stage
from tasks.launch import (REPORTED, TrainingProgress, check_hostfile, child_env, die_with_parent,  # noqa: F401
                          launch_command, master_port, rank_threads, run_training, stop_group)
from tasks.models import registry, tracking
from tasks.config import PretrainConfig, TokenizeConfig
from tasks.reports import flat_counts, publish_counts

log = logging.getLogger("forja.pretrain")
MODEL_FIELDS = ("n_layer", "n_head", "n_kv_head", "n_embd")


def model_config(cfg: PretrainConfig, tokens: stage.Manifest) -> model.config.ModelConfig:
    overrides = {k: getattr(cfg, k) for k in MODEL_FIELDS}
    return model.config.from_preset(cfg.preset, tokens.stats["vocab_size"], tokens.stats["seq_len"], **overrides)


# Settings of the launch or of the stage, not of the training loop (init_from: a URI, resolved by the stage).
LAUNCHER_ONLY = ("num_gpus", "hostfile", "run_name", "init_from", "launcher", "ssh_port", "include", "exclude",
                 "master_addr", "global_batch_size")


def train_spec(cfg: PretrainConfig, tokens: stage.Manifest, out: Path, ckpt: Path) -> model.train.TrainSpec:
    hp = cfg.model_dump(exclude={"preset", *MODEL_FIELDS, *LAUNCHER_ONLY})
    hp["threads"] = rank_threads(cfg)
    hp["grad_accum_steps"] = cfg.accum_for(*launch.world_size(cfg))  # global_batch_size over a hostfile's ranks
    return model.train.TrainSpec(
        model=asdict(model_config(cfg, tokens)),
        train_files=[str(p) for p in tokens.files_matching("train-")],
        val_files=[str(p) for p in tokens.files_matching("val-")],
        tokenizer=str(tokens.path("tokenizer.json")), out_dir=str(out), checkpoint_dir=str(ckpt),
        data_key=tokens.key, extra={"preset": cfg.preset}, **hp,
    )


def check_tokens(cfg: PretrainConfig, tokens: stage.Manifest) -> None:
    """Enough training sequences for one global batch, or an error naming the stage that made them."""
    rows = tokens.stats.get("rows", {})
    need = cfg.micro_batch_size * launch.world_size(cfg)[0]
    if rows.get("train", 0) < need or rows.get("val", 0) < 1:
        raise ValueError(
            f"the tokenize stage ({tokens.folder}) produced {rows.get('train', 0)} training and {rows.get('val', 0)} "
            f"validation sequences of {tokens.stats.get('seq_len')} tokens; pretraining needs at least {need} "
            "(micro_batch_size x processes) and 1. Crawl more text, lower tokenize.seq_len, or lower "
            "pretrain.micro_batch_size")


def loss_curve(metrics_file: Path, png: Path, title: str = "forja pretraining") -> None:
    """A PNG of train and validation loss against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in metrics_file.read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["train_loss"] for r in rows], label="train")
    val = [r for r in rows if "val_loss" in r]
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def base_version(uri: str | None, workdir: str) -> dict | None:
    """The registered version behind models:/NAME@ALIAS (or /VERSION): its URI, NAME/VERSION and
    weights sha256, or None without a URI. Resolved in the flow and passed to tokenize and pretrain,
    so that their cache keys follow the version an alias points at now."""
    if not uri:
        return None
    version = registry.resolve(tracking.client(workdir), uri)
    sha = version.tags.get("weights_sha256")
    if not sha:
        raise ValueError(f"{uri} ({version.name}/{version.version}) has no weights_sha256 tag: it was not "
                         "registered by forja; start from a version forja registered")
    return {"uri": uri, "version": f"{version.name}/{version.version}", "weights_sha256": sha}


def init_base(cfg: PretrainConfig, tokenize_cfg: TokenizeConfig, workdir: str) -> dict | None:
    """The version whose tokenizer the tokenize stage encodes with (pretrain.init_from, else
    tokenize.tokenizer_from), or None: a new tokenizer is trained."""
    if cfg.init_from and tokenize_cfg.tokenizer_from and cfg.init_from != tokenize_cfg.tokenizer_from:
        raise ValueError(f"pretrain.init_from ({cfg.init_from}) and tokenize.tokenizer_from "
                         f"({tokenize_cfg.tokenizer_from}) differ: weights only make sense with their own "
                         "tokenizer; remove tokenize.tokenizer_from")
    return base_version(cfg.init_from or tokenize_cfg.tokenizer_from, workdir)


def fetch_base(base: dict, workdir: str, dst: Path) -> Path:
    """The base version's model folder under dst: downloaded once (a resumed run finds it), its
    weights' sha256 checked every time."""
    from model.serving import check_weights

    folder = dst / "model"
    if not (folder / WEIGHTS).is_file():
        import tempfile

        dst.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dst) as tmp:
            os.replace(tracking.download_base(base, workdir, Path(tmp)), folder)
    check_weights(str(folder / WEIGHTS), base["weights_sha256"])
    return folder


# Where a mismatched field of the model's shape is set.
SHAPE_SOURCE = {"vocab_size": "the tokenizer", "block_size": "tokenize.seq_len", "n_layer": "pretrain.n_layer",
                "n_head": "pretrain.n_head", "n_kv_head": "pretrain.n_kv_head", "n_embd": "pretrain.n_embd"}


def check_init(base: dict, folder: Path, spec: model.train.TrainSpec) -> None:
    """Fail before training unless the base version has this run's shape and tokenizer."""
    have = asdict(model.config.ModelConfig.load(folder / CONFIG))
    diffs = [f"{k} {have[k]} there, {v} here (from {SHAPE_SOURCE.get(k, 'pretrain.preset')})"
             for k, v in spec.model.items() if k != "dropout" and have.get(k) != v]
    if diffs:
        raise ValueError(f"pretrain.init_from {base['uri']} ({base['version']}) has another shape: "
                         + "; ".join(diffs) + ". Set the preset and sizes to the base's, or remove pretrain.init_from")
    mine, theirs = file_sha256(spec.tokenizer), file_sha256(folder / TOKENIZER)
    if mine != theirs:
        raise ValueError(f"pretrain.init_from {base['uri']} ({base['version']}): the tokenize stage's tokenizer "
                         f"({spec.tokenizer}) is not the base's; tokenize with it (tokenize.tokenizer_from "
                         "unset or the same URI)")


def log_data_counts(upstream: list[stage.Manifest]) -> None:
    """The data stages' counts (documents in and out, drops by reason, tokens ...) as params,
    comparable across runs, and as one table artifact (data_counts.json); not as metrics,
    where each would be a one-point chart crowding the training curves."""
    counts = [(m.stage, k, v) for m in upstream for k, v in flat_counts(m.stats).items()]
    mlflow.log_params({f"data.{s}.{k}": v for s, k, v in counts})
    mlflow.log_table({"stage": [s for s, _, _ in counts], "count": [k for _, k, _ in counts],
                      "value": [float(v) for _, _, v in counts]}, artifact_file="data_counts.json")


def build(cfg: PretrainConfig, tokens: stage.Manifest, workdir: str, experiment: str, out: Path, key: str,
          upstream: list[stage.Manifest] = (), model_name: str | None = None, base: dict | None = None) -> dict:
    check_tokens(cfg, tokens)
    model.train.device_and_dtype(cfg.precision)  # bf16 where the device lacks it: refused once, before any rank
    ckpt = Path(workdir).resolve() / "checkpoints" / "pretrain" / (cfg.run_name or key)
    ckpt.mkdir(parents=True, exist_ok=True)
    spec = train_spec(cfg, tokens, out, ckpt)
    lineage = {}
    if cfg.init_from:
        folder = fetch_base(base, workdir, ckpt / "init")
        check_init(base, folder, spec)
        spec.init_from = str(folder)
        lineage = {"forja.init_from": base["version"], "forja.init_from_uri": base["uri"],
                   "forja.init_from_sha256": base["weights_sha256"]}
    (out / "spec.json").write_text(json.dumps(asdict(spec), indent=2))
    exp_id = tracking.setup(workdir, experiment)
    if "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL" not in os.environ:
        mlflow.set_system_metrics_sampling_interval(5)  # CPU, memory (and GPU) every 5 s, not 10
    run_file = ckpt / "mlflow_run_id"  # a resumed training continues the same MLflow run
    run_id = run_file.read_text().strip() if run_file.exists() else None
    name = tracking.run_name(f"pretrain-{key[:8]}", model_name or cfg.preset)
    with mlflow.start_run(run_id=run_id, experiment_id=None if run_id else exp_id, run_name=None if run_id else name,
                          log_system_metrics=True) as run:
        run_file.write_text(run.info.run_id)
        if not run_id:
            mlflow.log_params({f"pretrain.{k}": v for k, v in cfg.model_dump().items()})
            mlflow.log_params({f"model.{k}": v for k, v in spec.model.items()})
            log_data_counts([*upstream, tokens])
            tracking.log_token_inputs(tokens)
            mlflow.set_tags({"forja.stage.pretrain": key, "forja.stage.tokenize": tokens.key, **lineage,
                             **tracking.prefect_tags(), **{f"forja.stage.{s}": k for s, k in tokens.inputs.items()}})
        if tokens.path("tokens.html").exists():
            mlflow.log_artifact(str(tokens.path("tokens.html")), "tokenizer")
        # A picture of the network, drawn from its config (model.diagram), beside the run's curves.
        draw_model(model.config.ModelConfig(**spec.model), out / "model.png",
                   f"forja {model_name or cfg.preset} ({cfg.preset})")
        mlflow.log_artifact(str(out / "model.png"))
        training_s = run_training(launch_command(cfg, out / "spec.json"), child_env(run.info.run_id, cfg, out),
                                  cfg.max_steps)
        if (out / "samples.txt").exists():
            mlflow.log_artifact(str(out / "samples.txt"))
        loss_curve(out / "metrics.jsonl", out / "loss_curve.png")
        mlflow.log_artifact(str(out / "loss_curve.png"))
        mlflow.log_artifact(str(out / "metrics.jsonl"))
    summary = json.loads((out / "train_summary.json").read_text())
    return {**summary, "mlflow_run_id": run.info.run_id, "mlflow_experiment_id": exp_id, "model": spec.model,
            "init_from": base if cfg.init_from else None, "version_tags": lineage,
            "cost": training_cost(summary, out / "metrics.jsonl", training_s, cfg)}


def training_cost(summary: dict, metrics_file: Path, training_s: float, cfg: PretrainConfig) -> dict:
    """Training's own figures for the stage's cost (tasks.cost): tokens trained, tokens per second
    of the training loop, the median MFU its log intervals measured and, on GPUs, GPU-seconds
    (the launcher's wall time times the GPUs it held). A resumed run counts the steps it ran."""
    rows = [json.loads(x) for x in metrics_file.read_text().splitlines() if x.strip()]
    mfu = sorted(r["mfu"] for r in rows if r.get("step", 0) > summary.get("resumed_from", 0) and "mfu" in r)
    cost = {"tokens": int(summary["tokens"]),
            "tokens_per_s": round(summary["tokens"] / summary["seconds"], 1) if summary.get("seconds") else None,
            "mfu": round(mfu[len(mfu) // 2], 5) if mfu else None, "resumed_from_step": summary.get("resumed_from", 0)}
    if model.train.device_and_dtype()[0] == "cuda":
        cost["gpu_s"] = round(training_s * summary.get("world_size", cfg.num_gpus), 1)
    return cost


# The modules whose source is part of this stage's key (and of Prefect's cache key).
CODE = ("tasks.pretrain", "tasks.launch", "model.checkpoint", "model.optim", "model.records", "model.reshard",
        "model.config", "model.data", "model.generate", "model.gpt", "model.monitor", "model.precision",
        "model.train", "model.kernels", model.kernels.SOURCE)


def stage_key_config(cfg: PretrainConfig) -> dict:
    """What names a pretraining run (its stage key and checkpoint folder): the settings of the
    model and its training, with the batch as the global batch, not how it is split over ranks,
    micro-batches and accumulation steps, nor where the ranks run. The same run on another
    number of ranks (a lost node, a bigger allocation) then finds its checkpoints and resumes
    there (model/reshard.py); with pretrain.global_batch_size kept, every step draws the same rows."""
    ranks, where = launch.world_size(cfg)
    accum = cfg.accum_for(ranks, where)
    key = cfg.model_dump(mode="json", exclude={"num_gpus", "grad_accum_steps", "global_batch_size",
                                               *launch.LAUNCH_KEYS})
    return key | {"global_batch": cfg.micro_batch_size * accum * ranks}


@task(name="pretrain", **stage.task_options(*CODE))
def pretrain(cfg: PretrainConfig, tokens: stage.Manifest, workdir: str, experiment: str,
             upstream: list[stage.Manifest] = (), model_name: str | None = None,
             base: dict | None = None) -> stage.Manifest:
    """Train a model on the tokenize stage's shards: from scratch, or from the registered version
    pretrain.init_from names (base: init_base(...), resolved by the flow so the cache follows it).

    upstream: earlier data stages, for their counts; model_name: the registered model's name, for
    the MLflow run's name."""
    key_cfg = stage_key_config(cfg)
    if cfg.init_from:
        if not base or base.get("uri") != cfg.init_from:
            raise ValueError(f"pretrain.init_from is {cfg.init_from}: pass base=init_base(...) for it")
        key_cfg["init_from_sha256"] = base["weights_sha256"]
    m = stage.run_stage("pretrain", key_cfg, [tokens], workdir,
                        lambda out, key: build(cfg, tokens, workdir, experiment, out, key, upstream, model_name, base),
                        CODE)
    publish_counts("pretrain", m)
    return m
