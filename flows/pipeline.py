"""The pipeline flow: crawl -> dedupe -> normalize -> tokenize -> pretrain -> evaluate -> register."""
from __future__ import annotations

import logging
import os

from prefect import flow

from tasks.config import load_config
from tasks.crawl import crawl
from tasks.dedupe import dedupe
from tasks.evaluate import evaluate, suite_digests
from tasks.normalize import normalize
from tasks.pretrain import pretrain
from tasks.register import register
from tasks.tokenization import tokenize

# Stage progress is logged on "forja.*" loggers; Prefect forwards them to the run's log
# (PREFECT_LOGGING_EXTRA_LOGGERS=forja) once they pass this level.
logging.getLogger("forja").setLevel(logging.INFO)


def default_workdir() -> str:
    return os.environ.get("FORJA_WORKDIR", "work")


@flow(name="forja-pipeline", log_prints=True)
def pipeline(config_path: str = "configs/demo.yaml", overrides: list[str] | None = None,
             workdir: str | None = None) -> dict:
    """Build a corpus, train, evaluate and register a model from one config file.

    overrides are `section.key=value` strings, as `forja run --set` takes them.
    """
    cfg = load_config(config_path, overrides or [])
    wd = os.path.abspath(workdir or default_workdir())
    crawled = crawl(cfg.crawl, wd)
    deduped = dedupe(cfg.dedupe, crawled, wd)
    normalized = normalize(cfg.normalize, deduped, wd)
    tokens = tokenize(cfg.tokenize, normalized, wd)
    trained = pretrain(cfg.pretrain, tokens, wd, cfg.register.experiment, [crawled, deduped, normalized])
    evaluated = evaluate(cfg.evaluate, trained, tokens, wd, suite_digests(cfg.evaluate))
    lineage = {m.stage: m.key for m in (crawled, deduped, normalized, tokens, trained, evaluated)}
    registered = register(cfg.register, trained, evaluated, lineage, wd)
    return {
        "workdir": wd,
        "stages": {m.stage: m.folder for m in (crawled, deduped, normalized, tokens, trained, evaluated, registered)},
        "val_perplexity": evaluated.stats["val_perplexity"],
        "val_bits_per_byte": evaluated.stats["val_bits_per_byte"],
        "sample": evaluated.stats["samples"][0],
        "model_uri": registered.stats["model_uri"],
        "model_version": registered.stats["version"],
        "promoted": registered.stats["promoted"],
        "mlflow_run_id": trained.stats["mlflow_run_id"],
    }
