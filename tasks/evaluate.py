"""evaluate: held-out perplexity and bits per byte, the configured suites (tasks/evals/suites.py), samples."""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from prefect import task

from model.data import eval_batches, open_rows
from model.checkpoint import file_sha256
from model.device import Placement, resolve
from model.generate import Sampling, generate_text, load_folder
from tasks import stage
from tasks.models import tracking
from tasks.config import EvaluateConfig, SuiteConfig
from tasks.reports import publish_counts
from tasks.evals.suites import Suite, SuiteError, run_suites

log = logging.getLogger("forja.evaluate")


@torch.no_grad()
def heldout_loss(model, files: list[Path], batch_size: int) -> tuple[float, int]:
    """Mean next-token loss (nats) over every validation row, and the tokens scored. The model may
    compute in bf16; its loss is taken in float32 (GPT.forward) and summed here in Python floats."""
    rows = open_rows(files)  # the memory-mapped .npy copy when tokenize wrote one
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for x, y in eval_batches(rows, batch_size, max_batches=len(rows), device=device):
        _, loss = model(x, y)
        total += float(loss) * y.numel()
        count += y.numel()
    return total / count, count


def placement(setting: str | None, stage: str) -> Placement:
    """Where a stage's models run (model.device.resolve of the config's `device`), said once in the
    stage's log: "evaluate: model on cuda (bfloat16)". A bad setting fails here, before any loading."""
    p = resolve(setting)
    log.info("%s: model on %s", stage, p)
    return p


def load_placed(folder: Path, where: Placement):
    """(model, tokenizer) of a model folder on the placement's device, in its dtype."""
    return load_folder(Path(folder), where.device, where.torch_dtype)


def suite_list(suites: list[SuiteConfig]) -> list[Suite]:
    """The configured suites, with classification labels read when given as a file."""
    out = []
    for sc in suites:
        labels = sc.labels
        if isinstance(labels, str):
            try:
                labels = json.loads(Path(labels).read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise SuiteError(f"evaluate.suites[{sc.name}].labels: cannot read a JSON list from {labels}: {e}")
        out.append(Suite(sc.name, sc.kind, str(Path(sc.path).resolve()), sc.template, labels, sc.max_new_tokens,
                         sc.limit, sc.chat))
    return out


def suite_digests(cfg: EvaluateConfig | list[SuiteConfig]) -> dict[str, str]:
    """sha256 of each suite file: part of the stage's key, and recorded on model versions so
    that two versions are only compared on the same items."""
    out = {}
    for sc in cfg if isinstance(cfg, list) else cfg.suites:
        if not Path(sc.path).is_file():
            raise SuiteError(f"evaluate.suites[{sc.name}]: suite file {sc.path} does not exist")
        out[sc.name] = file_sha256(sc.path)
    return out


def evaluate_model(model, tokenizer, cfg: EvaluateConfig | list[SuiteConfig], batch_size: int = 8) -> tuple[dict, dict]:
    """Suite metrics {"suite.metric": value} and the generations behind them."""
    if isinstance(cfg, EvaluateConfig):
        cfg, batch_size = cfg.suites, cfg.batch_size
    return run_suites(model, tokenizer, suite_list(cfg), batch_size)


def metrics_table(metrics: dict) -> list[dict]:
    rows = []
    for k, v in metrics.items():
        suite, _, metric = k.rpartition(".")
        rows.append({"suite": suite or "heldout", "metric": metric, "value": round(v, 4)})
    return rows


def publish_table(key: str, rows: list[dict], description: str) -> None:
    """A table artifact in the Prefect UI (when a run is active)."""
    try:
        from prefect.artifacts import create_table_artifact

        create_table_artifact(key=key, table=rows, description=description)
    except Exception as e:  # outside a flow run there is nowhere to publish
        log.debug("no Prefect table for %s: %s", key, e)


NOT_SCORES = (".items", ".tokens", ".chance")  # suite results that describe the suite, not the model


def log_to_run(workdir: str, run_id: str | None, metrics: dict, files: list[Path], prefix: str = "",
               step: int = 0) -> None:
    """Evaluation results and files on an MLflow run.

    Scores people compare across runs are metrics, logged at the run's last training step so
    that they sit at the end of its curves: held-out loss, perplexity and bits per byte as
    eval_*, suite scores as suite.metric. Counts and baselines (the held-out tokens, a suite's
    items and tokens, a choice suite's chance level) say what was measured, not how well: they
    are tags (eval.val_tokens, eval.SUITE.items ...), which a re-evaluation may overwrite, unlike
    params.
    """
    if not run_id:
        return
    from mlflow.entities import Metric, RunTag

    client = tracking.client(workdir)
    ts = int(time.time() * 1000)
    counts = {k for k in metrics if k == "val_tokens" or k.endswith(NOT_SCORES)}
    client.log_batch(
        run_id,
        metrics=[Metric(prefix + (k if "." in k else f"eval_{k}"), float(v), ts, step)
                 for k, v in metrics.items() if k not in counts],
        tags=[RunTag(f"{prefix}eval.{k}", str(metrics[k])) for k in sorted(counts)])
    for f in files:
        client.log_artifact(run_id, str(f))


def build(cfg: EvaluateConfig, trained: stage.Manifest, tokens: stage.Manifest, workdir: str, out: Path,
          where: Placement = Placement("cpu", "float32")) -> dict:
    model, tokenizer = load_placed(Path(trained.folder), where)
    loss, n = heldout_loss(model, tokens.files_matching("val-"), cfg.batch_size)
    metrics = {
        "val_loss": loss,
        "val_perplexity": math.exp(loss),
        # nats/token -> bits/byte using the validation split's bytes per token.
        "val_bits_per_byte": loss / math.log(2) / tokens.stats["val_bytes_per_token"],
        "val_tokens": n,
    }
    suite_metrics, generations = evaluate_model(model, tokenizer, cfg)
    metrics |= suite_metrics
    samples = generate_text(model, tokenizer, cfg.prompts,
                            Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_k or None, None, cfg.seed))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    md = "\n\n".join(f"**{p}**{s}" for p, s in zip(cfg.prompts, samples))
    (out / "samples.md").write_text(md + "\n")
    with open(out / "generations.jsonl", "w", encoding="utf-8") as f:
        for suite, rows in generations.items():
            for r in rows:
                f.write(json.dumps({"suite": suite, **r}, ensure_ascii=False) + "\n")
    publish_table("evaluate-metrics", metrics_table(metrics), f"Evaluation of {trained.folder}")
    log_to_run(workdir, trained.stats.get("mlflow_run_id"), metrics, [out / "samples.md", out / "generations.jsonl"],
               step=trained.stats.get("steps", 0))
    log.info("evaluate: val perplexity %.2f, %.3f bits/byte; %s", metrics["val_perplexity"],
             metrics["val_bits_per_byte"], ", ".join(f"{k} {v:.3f}" for k, v in suite_metrics.items()
                                                     if not k.endswith(".items")))
    return {**metrics, "suite_sha256": suite_digests(cfg),
            "samples": [{"prompt": p, "text": s} for p, s in zip(cfg.prompts, samples)]}


# The modules whose source is part of this stage's key (and of Prefect's cache key).
CODE = ("tasks.evaluate", "tasks.evals.suites", "model.data", "model.generate", "model.gpt")


@task(name="evaluate", **stage.task_options(*CODE))
def evaluate(cfg: EvaluateConfig, trained: stage.Manifest, tokens: stage.Manifest, workdir: str,
             suites_sha256: dict[str, str] | None = None, device: str = "auto") -> stage.Manifest:
    """Score the trained model on the held-out split and the configured suites, and sample from it.

    suites_sha256 (suite_digests(cfg)) puts the suite files' contents in the cache keys. device is
    the config's top-level `device` (auto: CUDA in bf16 when present, else the CPU in fp32).
    """
    key_config = cfg.model_dump(mode="json") | {"suites_sha256": suites_sha256 or suite_digests(cfg)}
    # The device is not part of the key: the same model scored on another machine is the same
    # result, so a folder evaluated on a GPU is reused on the CPU and the other way round.
    m = stage.run_stage("evaluate", key_config, [trained, tokens], workdir,
                        lambda out, key: build(cfg, trained, tokens, workdir, out, placement(device, "evaluate")),
                        CODE)
    publish_counts("evaluate", m)
    return m
