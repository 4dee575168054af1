"""The flows that build a model: `forja-data` (crawl -> dedupe -> normalize -> tokenize) and
`forja-pipeline` (the same data stages, then pretrain -> evaluate -> register).

Both take a `runner` parameter: where the data stages' units of work run (flows.runners).
The runner never enters a stage key: the same config gives the same folders on any runner.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Literal

from prefect import flow

from flows.runners import open_runner, resolve
from flows.runtime import forward_logs, link_mlflow_run, with_policy, workdir_lock
from tasks.config import load_config
from tasks.crawl import crawl
from tasks.dedupe import dedupe
from tasks.normalize import normalize
from tasks.tokenization import tokenize

# pretrain, evaluate and register (torch, MLflow) are imported by pipeline() itself: the runner's
# worker processes import this module to find the flow a unit belongs to, and need none of them.

# Stage progress is logged on "forja.*" loggers; flows.runtime.forward_logs sends them to the
# run's log in the Prefect UI once they pass this level.
logging.getLogger("forja").setLevel(logging.INFO)
log = logging.getLogger("forja.pipeline")


def default_workdir() -> str:
    return os.environ.get("FORJA_WORKDIR") or "work"


def tokenizer_base(cfg, wd: str) -> dict | None:
    """pretrain.init_from's (or tokenize.tokenizer_from's) registered version, whose tokenizer the
    tokenize stage encodes with; None when a new tokenizer is trained."""
    if not (cfg.pretrain.init_from or cfg.tokenize.tokenizer_from):
        return None
    from tasks.pretrain import init_base

    return init_base(cfg.pretrain, cfg.tokenize, wd)


def build_corpus(cfg, wd: str, runner: str | None, base: dict | None = None) -> list:
    """crawl -> dedupe -> normalize -> tokenize with their units on one runner opened for them
    (a `dask` cluster lives only this long: training does not share the machine with it).
    The manifests of the four stages, in order."""
    with open_runner(runner):
        crawled = with_policy(crawl)(cfg.crawl, wd)
        deduped = with_policy(dedupe)(cfg.dedupe, crawled, wd)
        normalized = with_policy(normalize)(cfg.normalize, deduped, wd)
        tokens = with_policy(tokenize)(cfg.tokenize, normalized, wd, base)
    return [crawled, deduped, normalized, tokens]


def data_summary(manifests: list, wd: str, runner: str, seconds: float) -> dict:
    """What `forja data` prints: each stage's folder, key and counts (the numbers in its stats)."""
    stages = {}
    for m in manifests:
        counts = {k: v for k, v in m.stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        stages[m.stage] = {"key": m.key, "folder": m.folder, "files": len(m.files), "counts": counts}
    return {"workdir": wd, "runner": runner, "seconds": round(seconds, 1), "stages": stages}


@flow(name="forja-data", log_prints=True)
def data(config_path: str = "configs/demo.yaml", overrides: list[str] | None = None, workdir: str = "",
         runner: str = "", if_busy: Literal["wait", "fail"] = "wait") -> dict:
    """Build the corpus and its token shards from one config file (the pipeline's first four stages).

    Args:
        config_path: YAML config in configs/ (relative to the repository root the worker runs in).
        overrides: config values to change for this run, one `section.key=value` each.
        workdir: where stage folders go; empty: $FORJA_WORKDIR, else ./work.
        runner: where the stages' units run: `local` (processes here), `dask` (a Dask cluster
            started for the run) or `tcp://HOST:PORT` (an existing scheduler); empty: $FORJA_RUNNER, else local.
        if_busy: when another run holds the work directory: `wait` for it, or `fail` at once.
    """
    forward_logs()
    started = time.time()
    cfg = load_config(config_path, overrides or [])
    resolve(runner or None)  # a misspelt runner fails here, before any stage
    wd = os.path.abspath(workdir or default_workdir())
    with workdir_lock(wd, if_busy):
        manifests = build_corpus(cfg, wd, runner or None, tokenizer_base(cfg, wd))
    summarize(manifests, started)
    return data_summary(manifests, wd, resolve(runner or None), time.time() - started)


@flow(name="forja-pipeline", log_prints=True)
def pipeline(config_path: str = "configs/demo.yaml", overrides: list[str] | None = None,
             workdir: str = "", if_busy: Literal["wait", "fail"] = "wait", runner: str = "") -> dict:
    """Build a corpus, train, evaluate and register a model from one config file.

    Args:
        config_path: YAML config in configs/ (relative to the repository root the worker runs in).
        overrides: config values to change for this run, one `section.key=value` each,
            e.g. `pretrain.max_steps=600` or `dedupe.threshold=0.9` (as `forja run --set`).
        workdir: where stage folders, checkpoints and the local MLflow/Prefect data go;
            empty: $FORJA_WORKDIR, else ./work.
        if_busy: when another run holds the work directory: `wait` for it, or `fail` at once.
        runner: where the data stages' units run: `local` (processes here), `dask` (a Dask cluster
            started for the run) or `tcp://HOST:PORT` (an existing scheduler); empty: $FORJA_RUNNER, else local.
    """
    forward_logs()
    started = time.time()
    cfg = load_config(config_path, overrides or [])  # a bad config fails here, before any stage
    resolve(runner or None)  # so does a misspelt runner
    wd = os.path.abspath(workdir or default_workdir())
    with workdir_lock(wd, if_busy):
        return build_model(cfg, wd, runner or None, started)


def build_model(cfg, wd: str, runner: str | None, started: float) -> dict:
    """Every stage, crawl to register, for one config in a work directory the caller holds (the
    pipeline flow, or a sweep for each of its trials). What `forja run` reports."""
    from tasks.evaluate import evaluate, suite_digests
    from tasks.pretrain import pretrain
    from tasks.register import register

    base = tokenizer_base(cfg, wd)
    crawled, deduped, normalized, tokens = build_corpus(cfg, wd, runner, base)
    trained = with_policy(pretrain)(cfg.pretrain, tokens, wd, cfg.register.experiment,
                                    [crawled, deduped, normalized], cfg.register.model_name, base)
    link_mlflow_run(trained.stats["mlflow_run_id"], wd, "MLflow training run")
    evaluated = with_policy(evaluate)(cfg.evaluate, trained, tokens, wd, suite_digests(cfg.evaluate),
                                      device=cfg.device)
    lineage = {m.stage: m.key for m in (crawled, deduped, normalized, tokens, trained, evaluated)}
    registered = with_policy(register)(cfg.register, trained, evaluated, lineage, wd,
                                       trained.stats.get("version_tags") or None, device=cfg.device,
                                       run_started=started)
    manifests = [crawled, deduped, normalized, tokens, trained, evaluated, registered]
    summarize(manifests, started)
    return {
        "workdir": wd,
        "stages": {m.stage: m.folder for m in manifests},
        "val_perplexity": evaluated.stats["val_perplexity"],
        "val_bits_per_byte": evaluated.stats["val_bits_per_byte"],
        "metrics": {k: v for k, v in evaluated.stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
        "sample": evaluated.stats["samples"][0],
        "model_uri": registered.stats["model_uri"],
        "model_version": registered.stats["version"],
        "promoted": registered.stats["promoted"],
        "mlflow_run_id": trained.stats["mlflow_run_id"],
        "training": {"params": trained.stats["params"], "model": trained.stats["model"],
                     "tokens": trained_tokens(cfg.pretrain, trained.stats)},
    }


def trained_tokens(pcfg, stats: dict) -> int:
    """Tokens the model was trained on over all its steps (a resumed run's stats count only the last leg)."""
    return int(stats["steps"] * pcfg.micro_batch_size * pcfg.grad_accum_steps * stats["world_size"]
               * stats["model"]["block_size"])


def summarize(manifests: list, started: float) -> list[str]:
    """Say which stages this run rebuilt and which it reused (made before it started: a Prefect
    cache hit or a finished stage folder), in the log and as a table on the flow run, with what
    each cost when it was made (tasks.cost)."""
    rebuilt = [m.stage for m in manifests if m.created_at >= started]
    if not rebuilt:
        log.info("pipeline: all %d stages were cache hits: nothing changed since the last run", len(manifests))
    else:
        reused = [m.stage for m in manifests if m.created_at < started]
        log.info("pipeline: rebuilt %s; reused %s", ", ".join(rebuilt), ", ".join(reused) or "nothing")
    try:
        from prefect.artifacts import create_table_artifact

        create_table_artifact(key="pipeline-stages", description="Stages rebuilt or reused by this run",
                              table=[{"stage": m.stage, "key": m.key, "rebuilt": m.stage in rebuilt,
                                      **{k: m.cost.get(k) for k in ("wall_s", "cpu_s", "peak_rss_mb")},
                                      "folder": m.folder} for m in manifests])
    except Exception as e:  # a view, never a failure
        log.warning("could not publish the stage table: %s", e)
    return rebuilt
