"""Batch inference: prompts from Parquet or JSONL, generations to Parquet, resumable by shard.

    forja batch models:/NAME@ALIAS INPUT OUTPUT_DIR [--shard-size 256] [--max-new-tokens 64]
                [--temperature 0] [--top-k 50] [--top-p 1] [--seed 0] [--batch-size 8] [--chat] [--fresh]

The input is cut into shards of --shard-size prompts; each becomes OUTPUT_DIR/part-NNNNN.parquet
(columns: row, prompt, output), written to a temporary name and renamed when complete.
A rerun skips the shards already there, so an interrupted job continues where it stopped;
_SUCCESS.json is written last. Each shard is a Prefect task (retried on failure). The model runs
where the flow's `device` says (auto: CUDA in bf16 when present, else the CPU in fp32).

One output is one job: OUTPUT_DIR/_JOB.json (written atomically before the first shard) records
the model version the URI resolved to and its weights sha256, the sampling, chat, the shard size
and the input's sha256. A rerun whose record differs (the alias moved, the input changed) is
refused, naming what changed, instead of mixing shards of two jobs; fresh=True (--fresh)
discards the old shards and starts over. Shards are generated with the version resolved at the
start (models:/NAME/VERSION), never by re-reading a moving alias. A job holds an exclusive lock
(flock on OUTPUT_DIR/.batch.lock, released by the kernel even on kill -9) while it writes, so a
second job on the same output is refused at once (BatchConflict) and nothing is corrupted.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import flow, task

logging.getLogger("forja").setLevel(logging.INFO)
log = logging.getLogger("forja.batch")


def read_prompts(path: Path, column: str = "prompt") -> list[str]:
    """The prompts of a Parquet file (a string column) or a JSONL file ({"prompt": ...} a line)."""
    from tasks.evals.suites import jsonl_lines

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


JOB, LOCK, SUCCESS = "_JOB.json", ".batch.lock", "_SUCCESS.json"
RECORDED = ("model", "weights_sha256", "sampling", "chat", "shard_size", "input_sha256", "prompts")


class BatchConflict(RuntimeError):
    """Another batch job is writing the same output folder."""


class BatchMismatch(ValueError):
    """The output folder holds shards of another job (model, sampling or input)."""


def resolve(model_uri: str, tracking_uri: str):
    """The registered version model_uri names now (an alias is read once, here)."""
    import mlflow

    from tasks.models import registry, tracking

    tracking.use(tracking_uri)
    return registry.resolve(mlflow.MlflowClient(), model_uri)


@lru_cache(maxsize=2)
def load(pinned_uri: str, tracking_uri: str, device: str = "auto"):
    """Download (sha256-checked) and load one registered version (models:/NAME/VERSION, which
    never changes, so caching it per process is safe) once per process, on the `device` setting's
    placement (model.device.resolve: CUDA in bf16 when present, else the CPU in fp32)."""
    import mlflow

    from model.device import resolve as placement
    from tasks.models import registry

    version = resolve(pinned_uri, tracking_uri)
    return registry.load_version(mlflow.MlflowClient(), version, placement(device)), f"{version.name}/{version.version}"


def shard_path(out: Path, index: int) -> Path:
    return out / f"part-{index:05d}.parquet"


def write_atomic(path: Path, text: str) -> None:
    """Write a small file whole or not at all: a temporary file, fsync, then rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_shard(pinned_uri: str, tracking_uri: str, prompts: list[str], first_row: int, out: str, index: int,
                sampling: dict, batch_size: int, chat: bool = False, device: str = "auto") -> int:
    """Generate one shard and write it to a temporary name, renamed when complete."""
    from model.generate import Sampling, generate_text

    (model, tokenizer), _ = load(pinned_uri, tracking_uri, device)
    outputs = generate_text(model, tokenizer, prompts, Sampling(**sampling), batch_size, chat)
    table = pa.table({"row": pa.array(range(first_row, first_row + len(prompts)), pa.int64()),
                      "prompt": prompts, "output": outputs})
    final = shard_path(Path(out), index)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, final)
    if os.environ.get("FORJA_FAULT") == f"batch-shard:{index}":  # tests: die after this shard
        raise SystemExit(f"fault injected after shard {index}")
    return len(prompts)


@task(name="batch-shard", retries=1)
def run_shard(pinned_uri: str, tracking_uri: str, prompts: list[str], first_row: int, out: str, index: int,
              sampling: dict, batch_size: int, chat: bool = False, device: str = "auto") -> int:
    return write_shard(pinned_uri, tracking_uri, prompts, first_row, out, index, sampling, batch_size, chat, device)


@contextmanager
def output_lock(out: Path):
    """Hold OUTPUT_DIR's job lock, or raise BatchConflict naming the process that holds it."""
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise BatchConflict(f"another batch job (pid {holder}) is writing {out}; wait for it to finish "
                                "(a rerun then resumes) or choose another output folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def job_record(version, prompts: list[str], shard_size: int, sampling: dict, chat: bool) -> dict:
    digest = hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode()).hexdigest()
    return {"model": f"{version.name}/{version.version}", "weights_sha256": version.tags.get("weights_sha256"),
            "sampling": sampling, "chat": chat, "shard_size": shard_size, "input_sha256": digest,
            "prompts": len(prompts)}


def clear_output(out: Path) -> int:
    """Remove what batch jobs wrote in out (shards, temporaries, the job record); their count."""
    files = [*out.glob("part-*.parquet"), *out.glob(".part-*.tmp"), *out.glob(f".{JOB}.*.tmp"), out / SUCCESS,
             out / JOB]
    removed = 0
    for f in files:
        if f.is_file():
            f.unlink()
            removed += 1
    return removed


def claim_output(out: Path, record: dict, fresh: bool) -> None:
    """Make out this job's folder: refuse shards of another job (unless fresh), record this one."""
    old = json.loads((out / JOB).read_text()) if (out / JOB).is_file() else None
    shards = sorted(out.glob("part-*.parquet"))
    if fresh:
        removed = clear_output(out)
        if removed:
            log.info("batch: --fresh: removed %d files of the previous job in %s", removed, out)
    elif old is None and shards:
        raise BatchMismatch(f"{out} holds {len(shards)} shards but no {JOB} saying which model, sampling and input "
                            "made them; rerun with --fresh (fresh=True) to discard them, or choose another folder")
    elif old is not None:
        changed = {k: (old.get(k), record[k]) for k in RECORDED if old.get(k) != record[k]}
        if changed:
            what = "; ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in changed.items())
            raise BatchMismatch(f"{out} holds {len(shards)} shards of another batch job ({what}): resuming would "
                                "mix their outputs. Rerun with --fresh (fresh=True) to discard them and start "
                                "over, or choose another output folder")
        return
    write_atomic(out / JOB, json.dumps(record, indent=2))


def run_batch(model_uri: str, input_path: str, output_dir: str, tracking_uri: str, shard_size: int = 256,
              sampling: dict | None = None, batch_size: int = 8, chat: bool = False, fresh: bool = False,
              shard=write_shard, device: str = "auto") -> dict:
    """The whole job (the flow's body, callable without Prefect): lock the output, check or write
    its job record, then generate the shards not yet written with the resolved version, on the
    `device` setting's placement (CUDA in bf16 when present, else the CPU). The device is not part
    of the job record: shards made on another machine by the same model belong to the same job."""
    from model.device import resolve as placement
    from model.generate import Sampling

    s = Sampling(**(sampling or {}))  # invalid values fail here, naming the field
    where = placement(device)  # a bad setting, or cuda without a GPU, fails before any work
    prompts = read_prompts(Path(input_path))
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    version = resolve(model_uri, tracking_uri)
    pinned = f"models:/{version.name}/{version.version}"
    with output_lock(out):
        claim_output(out, job_record(version, prompts, shard_size, s.__dict__, chat), fresh)
        for tmp in out.glob(".part-*.tmp"):  # a killed job's half-written shard (nobody else writes: locked)
            tmp.unlink()
        shards = [(i, prompts[start : start + shard_size])
                  for i, start in enumerate(range(0, len(prompts), shard_size))]
        done = [i for i, _ in shards if shard_path(out, i).is_file()]
        if done:
            log.info("batch: %d of %d shards already written in %s; generating the rest", len(done), len(shards), out)
        if len(done) < len(shards):
            log.info("batch: model on %s", where)
        for i, chunk in shards:
            if i not in done:
                shard(pinned, tracking_uri, chunk, i * shard_size, str(out), i, s.__dict__, batch_size, chat, device)
                log.info("batch: shard %d/%d written (%d prompts)", i + 1, len(shards), len(chunk))
        summary = {"model": f"{version.name}/{version.version}", "model_uri": model_uri,
                   "weights_sha256": version.tags.get("weights_sha256"), "input": str(input_path),
                   "prompts": len(prompts), "shards": len(shards), "resumed_shards": len(done),
                   "sampling": s.__dict__, "chat": chat, "device": str(where)}
        write_atomic(out / SUCCESS, json.dumps(summary, indent=2))
    return summary


@flow(name="forja-batch", log_prints=True)
def batch(model_uri: str, input_path: str, output_dir: str, shard_size: int = 256, sampling: dict | None = None,
          batch_size: int = 8, workdir: str = "", chat: bool = False, fresh: bool = False,
          device: str = "auto") -> dict:
    """Generate for every prompt of input_path into output_dir's Parquet shards, skipping finished ones.

    Args:
        model_uri: the registered version to run: models:/NAME@ALIAS or models:/NAME/VERSION.
        input_path: Parquet (a `prompt` column) or JSONL (`{"prompt": ...}` a line) file of prompts.
        output_dir: folder for part-NNNNN.parquet shards (row, prompt, output); a rerun of the same job
            skips finished shards, and a rerun of another job (model, sampling, input) is refused.
        shard_size: prompts per output shard (the unit of resuming).
        sampling: generation settings: max_new_tokens, temperature, top_k, top_p, seed.
        batch_size: prompts decoded together.
        workdir: the work directory whose MLflow store is used when MLFLOW_TRACKING_URI is not set.
        chat: send each prompt as a user message through the chat template (fine-tuned models).
        fresh: discard output_dir's shards of a previous job and start over.
        device: where the model runs: auto (CUDA in bf16 when present, else the CPU), cpu, cuda or cuda:N.
    """
    from flows.runtime import forward_logs
    from tasks.models import tracking

    forward_logs()
    tracking_uri = tracking.tracking_uri(workdir or os.environ.get("FORJA_WORKDIR") or "work")
    return run_batch(model_uri, input_path, output_dir, tracking_uri, shard_size, sampling, batch_size, chat, fresh,
                     shard=run_shard, device=device)
