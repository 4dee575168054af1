"""Batch inference: prompts from Parquet or JSONL, generations to Parquet, resumable by shard.

    forja batch models:/NAME@ALIAS INPUT OUTPUT_DIR [--shard-size 256] [--max-new-tokens 64]
                [--temperature 0] [--top-k 50] [--top-p 1] [--seed 0] [--batch-size 8] [--chat]

The input is cut into shards of --shard-size prompts; each becomes OUTPUT_DIR/part-NNNNN.parquet
(columns: row, prompt, output), written to a temporary name and renamed when complete.
A rerun skips the shards already there, so an interrupted job continues where it stopped;
_SUCCESS.json is written last. Each shard is a Prefect task (retried on failure).
"""
from __future__ import annotations

import json
import logging
import os
from functools import lru_cache
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import flow, task

logging.getLogger("forja").setLevel(logging.INFO)
log = logging.getLogger("forja.batch")


def read_prompts(path: Path, column: str = "prompt") -> list[str]:
    """The prompts of a Parquet file (a string column) or a JSONL file ({"prompt": ...} a line)."""
    from tasks.suites import jsonl_lines

    if not path.is_file():
        raise FileNotFoundError(f"batch input {path} does not exist")
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        if column not in table.column_names:
            raise ValueError(f"{path}: no {column!r} column; columns are {table.column_names}")
        return [str(x) for x in table.column(column).to_pylist()]
    prompts = []
    for where, item in jsonl_lines(path, ValueError):
        if not isinstance(item, dict) or not isinstance(item.get(column), str):
            raise ValueError(f"{where}: expected an object with a string {column!r} field")
        prompts.append(item[column])
    return prompts


@lru_cache(maxsize=2)
def load(model_uri: str, tracking_uri: str):
    """Download (sha256-checked) and load a registered version once per process."""
    import mlflow

    from tasks import registry, tracking

    tracking.use(tracking_uri)
    client = mlflow.MlflowClient()
    version = registry.resolve(client, model_uri)
    return registry.load_version(client, version), f"{version.name}/{version.version}"


def shard_path(out: Path, index: int) -> Path:
    return out / f"part-{index:05d}.parquet"


@task(name="batch-shard", retries=1)
def run_shard(model_uri: str, tracking_uri: str, prompts: list[str], first_row: int, out: str, index: int,
              sampling: dict, batch_size: int, chat: bool = False) -> int:
    from model.generate import Sampling, generate_text

    (model, tokenizer), _ = load(model_uri, tracking_uri)
    outputs = generate_text(model, tokenizer, prompts, Sampling(**sampling), batch_size, chat)
    table = pa.table({"row": pa.array(range(first_row, first_row + len(prompts)), pa.int64()),
                      "prompt": prompts, "output": outputs})
    final = shard_path(Path(out), index)
    tmp = final.with_name(f".{final.name}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, final)
    if os.environ.get("FORJA_FAULT") == f"batch-shard:{index}":  # tests: die after this shard
        raise SystemExit(f"fault injected after shard {index}")
    return len(prompts)


@flow(name="forja-batch", log_prints=True)
def batch(model_uri: str, input_path: str, output_dir: str, shard_size: int = 256, sampling: dict | None = None,
          batch_size: int = 8, workdir: str = "", chat: bool = False) -> dict:
    """Generate for every prompt of input_path into output_dir's Parquet shards, skipping finished ones.

    Args:
        model_uri: the registered version to run: models:/NAME@ALIAS or models:/NAME/VERSION.
        input_path: Parquet (a `prompt` column) or JSONL (`{"prompt": ...}` a line) file of prompts.
        output_dir: folder for part-NNNNN.parquet shards (row, prompt, output); a rerun skips finished shards.
        shard_size: prompts per output shard (the unit of resuming).
        sampling: generation settings: max_new_tokens, temperature, top_k, top_p, seed.
        batch_size: prompts decoded together.
        workdir: the work directory whose MLflow store is used when MLFLOW_TRACKING_URI is not set.
        chat: send each prompt as a user message through the chat template (fine-tuned models).
    """
    from flows.runtime import forward_logs
    from model.generate import Sampling

    forward_logs()
    from tasks import tracking

    s = Sampling(**(sampling or {}))  # invalid values fail here, naming the field
    prompts = read_prompts(Path(input_path))
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tracking_uri = tracking.tracking_uri(workdir or os.environ.get("FORJA_WORKDIR") or "work")
    _, version = load(model_uri, tracking_uri)
    shards = [(i, prompts[start : start + shard_size]) for i, start in enumerate(range(0, len(prompts), shard_size))]
    done = [i for i, _ in shards if shard_path(out, i).is_file()]
    if done:
        log.info("batch: %d of %d shards already written in %s; generating the rest", len(done), len(shards), out)
    for i, chunk in shards:
        if i not in done:
            run_shard(model_uri, tracking_uri, chunk, i * shard_size, str(out), i, s.__dict__, batch_size, chat)
            log.info("batch: shard %d/%d written (%d prompts)", i + 1, len(shards), len(chunk))
    summary = {"model": version, "model_uri": model_uri, "input": str(input_path), "prompts": len(prompts),
               "shards": len(shards), "resumed_shards": len(done), "sampling": s.__dict__, "chat": chat}
    (out / "_SUCCESS.json").write_text(json.dumps(summary, indent=2))
    return summary
