"""evaluate: held-out perplexity and bits per byte, and sample generations."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import mlflow
import torch
from prefect import task

from model.data import eval_batches, open_rows
from model.generate import Sampling, generate_text, load_folder
from tasks import stage, tracking
from tasks.config import EvaluateConfig
from tasks.reports import publish_counts

log = logging.getLogger("forja.evaluate")


@torch.no_grad()
def heldout_loss(model, files: list[Path], batch_size: int) -> tuple[float, int]:
    """Mean next-token loss (nats) over every validation row, and the tokens scored."""
    rows = open_rows(files)  # the memory-mapped .npy copy when tokenize wrote one
    total, count = 0.0, 0
    for x, y in eval_batches(rows, batch_size, max_batches=len(rows)):
        _, loss = model(x, y)
        total += float(loss) * y.numel()
        count += y.numel()
    return total / count, count


def build(cfg: EvaluateConfig, trained: stage.Manifest, tokens: stage.Manifest, workdir: str, out: Path) -> dict:
    model, tokenizer = load_folder(Path(trained.folder))
    loss, n = heldout_loss(model, tokens.files_matching("val-"), cfg.batch_size)
    metrics = {
        "val_loss": loss,
        "val_perplexity": math.exp(loss),
        # nats/token -> bits/byte using the validation split's bytes per token.
        "val_bits_per_byte": loss / math.log(2) / tokens.stats["val_bytes_per_token"],
        "val_tokens": n,
    }
    samples = generate_text(model, tokenizer, cfg.prompts, Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_k or None, None, cfg.seed))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    md = "\n\n".join(f"**{p}**{s}" for p, s in zip(cfg.prompts, samples))
    (out / "samples.md").write_text(md + "\n")
    run_id = trained.stats.get("mlflow_run_id")
    if run_id:
        mlflow.set_tracking_uri(tracking.tracking_uri(workdir))
        client = mlflow.MlflowClient()
        for k, v in metrics.items():
            client.log_metric(run_id, f"eval_{k}", v)
        client.log_artifact(run_id, str(out / "samples.md"))
    log.info("evaluate: val perplexity %.2f, %.3f bits/byte", metrics["val_perplexity"], metrics["val_bits_per_byte"])
    return {**metrics, "samples": [{"prompt": p, "text": s} for p, s in zip(cfg.prompts, samples)]}


# The modules whose source is part of this stage's key (and of Prefect's cache key).
CODE = ("tasks.evaluate", "model.data", "model.generate", "model.gpt")


@task(name="evaluate", persist_result=True, cache_policy=stage.cache_policy(*CODE))
def evaluate(cfg: EvaluateConfig, trained: stage.Manifest, tokens: stage.Manifest, workdir: str) -> stage.Manifest:
    """Score the trained model on the held-out split and sample from it."""
    m = stage.run_stage("evaluate", cfg, [trained, tokens], workdir,
                        lambda out, key: build(cfg, trained, tokens, workdir, out), CODE)
    publish_counts("evaluate", m)
    return m
