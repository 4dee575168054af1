"""finetune: specialise a registered model on conversations.

Three stages, each a folder with a manifest like the pipeline's:
  sft-data   the base version downloaded (weights sha256-checked) and the conversations,
             PII scrubbed as the corpus was (finetune.scrub_pii), rendered through the chat
             template: token rows, right-padded, with a loss mask over the assistant's words
             (Parquet, plus .npy copies to memory-map)
  finetune   model.train under the deepspeed launcher from the base weights (all of
             them, or LoRA adapters merged at the end), tracked in MLflow
  then the suites are scored on the base and the fine-tuned model side by side, and the
  result is registered as its own model, tagged with its parent version, and gated.

Right padding needs no attention mask in a causal model (no real token ever attends to a
later position), and the padded positions carry no loss.
"""
from __future__ import annotations

import json
import logging
import random
import shutil
from collections import Counter
import tempfile
from dataclasses import asdict
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task

import model.train
from model.chat import PAD, ChatTemplate, as_messages
from model.checkpoint import file_sha256
from model.config import ModelConfig
from model.device import Placement
from model.generate import CONFIG, TOKENIZER
from tasks import pretrain as pretrain_task
from tasks import stage
from tasks.models import registry, tracking
from tasks.config import FinetuneConfig
from tasks.text.pii import scrub
from tasks.reports import publish_counts
from tasks.evals.suites import jsonl_lines

log = logging.getLogger("forja.finetune")


def data_file(path: str | Path) -> Path:
    if not Path(path).is_file():
        raise FileNotFoundError(f"finetune.data {path} does not exist")
    return Path(path)


def read_conversations(path: Path) -> list[list[dict]]:
    out = [as_messages(item if isinstance(item, dict) else {}, where) for where, item in jsonl_lines(path, ValueError)]
    if len(out) < 2:
        raise ValueError(f"finetune.data {path} has {len(out)} conversations; at least 2 are needed (train and val)")
    return out


def write_split(out: Path, name: str, rows: np.ndarray, mask: np.ndarray) -> None:
    width = rows.shape[1]
    dtype = pa.uint16() if rows.max(initial=0) < 2**16 else pa.uint32()
    tokens = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1), dtype), width)
    learn = pa.FixedSizeListArray.from_arrays(pa.array(mask.reshape(-1), pa.bool_()), width)
    pq.write_table(pa.table({"tokens": tokens, "loss_mask": learn}), out / f"{name}-00000.parquet", compression="zstd")
    np.save(out / f"{name}.npy", rows)
    np.save(out / f"{name}.mask.npy", mask)


def build_data(cfg: FinetuneConfig, workdir: str, out: Path) -> dict:
    client = tracking.client(workdir)
    version = registry.resolve(client, cfg.base_model)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(registry.download(client, version, Path(tmp)), out / "base")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "base" / TOKENIZER))
    block = ModelConfig.load(out / "base" / CONFIG).block_size
    stats = {"base_model": f"{version.name}/{version.version}", "base_weights_sha256": version.tags.get("weights_sha256")}
    return stats | write_sft_data(cfg, tok, min(cfg.seq_len or block, block), out)


def scrub_conversations(convs: list[list[dict]], enabled: bool) -> tuple[list[list[dict]], Counter]:
    """Every message's content through the normalize stage's PII scrubber (the same rules the
    pretraining corpus passed), and how many of each kind were replaced; unchanged when off."""
    counts: Counter = Counter()
    if not enabled:
        return convs, counts
    out = []
    for msgs in convs:
        clean = []
        for m in msgs:
            text, found = scrub(m["content"])
            counts.update(found)
            clean.append({**m, "content": text})
        out.append(clean)
    return out, counts


def write_sft_data(cfg: FinetuneConfig, tok, seq_len: int, out: Path) -> dict:
    """Render cfg.data's conversations through the chat template into train/val rows in out
    (Parquet plus .npy copies), and return the counts the manifest keeps."""
    template = ChatTemplate(tok)
    convs, pii = scrub_conversations(read_conversations(data_file(cfg.data)), cfg.scrub_pii)
    random.Random(cfg.seed).shuffle(convs)
    n_val = max(1, round(cfg.val_fraction * len(convs)))
    pad = tok.token_to_id(PAD)
    stats = {"seq_len": seq_len, "truncated": 0, "learned_tokens": {}, "scrub_pii": cfg.scrub_pii,
             "pii_replaced": dict(pii)}
    for name, part in (("val", convs[:n_val]), ("train", convs[n_val:])):
        rows = np.full((len(part), seq_len + 1), pad, dtype=np.int64)
        mask = np.zeros((len(part), seq_len + 1), dtype=bool)
        for i, msgs in enumerate(part):
            enc = template.encode(msgs, seq_len + 1)
            rows[i, : len(enc.ids)], mask[i, : len(enc.ids)] = enc.ids, enc.loss_mask
            stats["truncated"] += enc.truncated
        write_split(out, name, rows, mask)
        stats["learned_tokens"][name] = int(mask[:, 1:].sum())
    stats["rows"] = {"train": len(convs) - n_val, "val": n_val}
    if stats["truncated"]:
        log.warning("finetune: %d conversations longer than %d tokens were cut (their ends carry no loss)",
                    stats["truncated"], seq_len)
    return stats


DATA_CODE = ("tasks.finetune", "tasks.text.pii", "model.chat")


def data_key_config(cfg: FinetuneConfig, base_sha256: str, data_sha256: str) -> dict:
    """What the rendered data depends on: the stage's key and its manifest's config."""
    return {"base_model": cfg.base_model, "base_sha256": base_sha256, "data_sha256": data_sha256,
            "seq_len": cfg.seq_len, "val_fraction": cfg.val_fraction, "seed": cfg.seed, "scrub_pii": cfg.scrub_pii}


@task(name="sft-data", **stage.task_options(*DATA_CODE))
def sft_data(cfg: FinetuneConfig, workdir: str, base_sha256: str, data_sha256: str) -> stage.Manifest:
    """Download the base version and render the conversations (the digests key the cache)."""
    m = stage.run_stage("sft-data", data_key_config(cfg, base_sha256, data_sha256), [], workdir, lambda out, key: build_data(cfg, workdir, out), DATA_CODE)
    publish_counts("sft-data", m)
    return m


def build_training(cfg: FinetuneConfig, data: stage.Manifest, workdir: str, experiment: str, out: Path, key: str) -> dict:
    t = cfg.training
    ckpt = Path(workdir).resolve() / "checkpoints" / "finetune" / (t.run_name or key)
    ckpt.mkdir(parents=True, exist_ok=True)
    base = Path(data.folder) / "base"
    hp = t.model_dump(exclude={"preset", *pretrain_task.MODEL_FIELDS, *pretrain_task.LAUNCHER_ONLY})
    hp["threads"] = pretrain_task.rank_threads(t)
    model_cfg = ModelConfig.load(base / CONFIG)
    spec = model.train.TrainSpec(
        model=asdict(model_cfg), train_files=[str(p) for p in data.files_matching("train-")],
        val_files=[str(p) for p in data.files_matching("val-")], tokenizer=str(base / TOKENIZER),
        out_dir=str(out), checkpoint_dir=str(ckpt), data_key=data.key, init_from=str(base),
        lora_rank=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_targets=list(cfg.lora.targets),
        extra={"preset": f"finetune of {data.stats['base_model']}"}, **hp)
    (out / "spec.json").write_text(json.dumps(asdict(spec), indent=2))
    exp_id = tracking.setup(workdir, experiment)
    run_file = ckpt / "mlflow_run_id"
    run_id = run_file.read_text().strip() if run_file.exists() else None
    name = tracking.run_name(f"finetune-{key[:8]}", cfg.model_name)
    with mlflow.start_run(run_id=run_id, experiment_id=None if run_id else exp_id, run_name=None if run_id else name,
                          log_system_metrics=True) as run:
        run_file.write_text(run.info.run_id)
        if not run_id:
            mlflow.log_params({f"finetune.{k}": v for k, v in t.model_dump().items() if k not in ("preset",)})
            mlflow.log_params({"finetune.lora_rank": cfg.lora.rank, "finetune.base_model": data.stats["base_model"],
                               "finetune.scrub_pii": data.config.get("scrub_pii", cfg.scrub_pii),
                               "finetune.pii_replaced": json.dumps(data.stats.get("pii_replaced", {}), sort_keys=True)})
            tracking.log_token_inputs(data)  # the rendered conversations, train and validation
            mlflow.set_tags({"forja.stage.sft-data": data.key, "forja.stage.finetune": key,
                             "forja.parent": data.stats["base_model"], **tracking.prefect_tags()})
        training_s = pretrain_task.run_training(pretrain_task.launch_command(t, out / "spec.json"),
                                                pretrain_task.child_env(run.info.run_id, t), t.max_steps, "finetune")
        pretrain_task.loss_curve(out / "metrics.jsonl", out / "loss_curve.png", "forja fine-tuning")
        for f in ("loss_curve.png", "metrics.jsonl", "samples.txt", "adapter.safetensors"):
            if (out / f).exists():
                mlflow.log_artifact(str(out / f))
    summary = json.loads((out / "train_summary.json").read_text())
    return {**summary, "mlflow_run_id": run.info.run_id, "base_model": data.stats["base_model"], "model": spec.model,
            "cost": pretrain_task.training_cost(summary, out / "metrics.jsonl", training_s, t)}


TRAIN_CODE = ("tasks.finetune", "tasks.pretrain", *pretrain_task.CODE[1:], "model.lora")


@task(name="finetune", **stage.task_options(*TRAIN_CODE))
def finetune_train(cfg: FinetuneConfig, data: stage.Manifest, workdir: str, experiment: str) -> stage.Manifest:
    """Train from the base weights on the rendered conversations."""
    key_cfg = cfg.model_dump(mode="json", include={"training", "lora"})
    m = stage.run_stage("finetune", key_cfg, [data], workdir,
                        lambda out, key: build_training(cfg, data, workdir, experiment, out, key), TRAIN_CODE)
    publish_counts("finetune", m)
    return m


def base_digests(cfg: FinetuneConfig, workdir: str) -> tuple[str, str]:
    """(the base version's weights sha256, the data file's sha256): what the data stage depends on."""
    version = registry.resolve(tracking.client(workdir), cfg.base_model)
    return version.tags.get("weights_sha256", f"{version.name}/{version.version}"), file_sha256(data_file(cfg.data))


def build_comparison(cfg: FinetuneConfig, data: stage.Manifest, trained: stage.Manifest, workdir: str,
                     out: Path, where: Placement = Placement("cpu", "float32")) -> dict:
    """The suites and the held-out conversations' loss, on the base and on the fine-tuned model,
    each loaded on where's device and dtype (the loss is taken in float32 either way)."""
    from model.data import open_mask, open_rows
    from model.train import evaluate_loss
    from tasks.evaluate import evaluate_model, load_placed, log_to_run, publish_table, suite_digests

    val_files = data.files_matching("val-")
    rows, mask = open_rows(val_files), open_mask(val_files)
    results, generations = {}, {}
    for who, folder in (("base", Path(data.folder) / "base"), ("finetuned", Path(trained.folder))):
        model_, tok = load_placed(folder, where)
        metrics, generations[who] = evaluate_model(model_, tok, list(cfg.suites))
        metrics["val_loss"] = evaluate_loss(model_, rows, 8, max(1, len(rows) // 8 + 1), where.device, mask)
        results[who] = metrics
        del model_  # one model on the device at a time
    after = results["finetuned"]
    table = [{"metric": k, "base": round(results["base"][k], 4), "finetuned": round(v, 4)}
             for k, v in after.items() if not k.endswith(".items")]
    (out / "comparison.json").write_text(json.dumps(table, indent=2))
    with open(out / "generations.jsonl", "w", encoding="utf-8") as f:
        for who, suites in generations.items():
            for suite, rows_ in suites.items():
                for r in rows_:
                    f.write(json.dumps({"model": who, "suite": suite, **r}, ensure_ascii=False) + "\n")
    publish_table("finetune-comparison", table, f"{data.stats['base_model']} before and after fine-tuning")
    run_id = trained.stats.get("mlflow_run_id")
    steps = trained.stats.get("steps", 0)
    log_to_run(workdir, run_id, after, [out / "comparison.json", out / "generations.jsonl"], step=steps)
    log_to_run(workdir, run_id, results["base"], [], prefix="base.", step=steps)
    for row in table:
        log.info("finetune: %-28s base %10.4f  fine-tuned %10.4f", row["metric"], row["base"], row["finetuned"])
    return {**after, "suite_sha256": suite_digests(list(cfg.suites)), "comparison": table}


COMPARE_CODE = ("tasks.finetune", "tasks.evaluate", "tasks.evals.suites", "model.generate", "model.gpt", "model.chat")


@task(name="finetune-compare", **stage.task_options(*COMPARE_CODE))
def compare(cfg: FinetuneConfig, data: stage.Manifest, trained: stage.Manifest, workdir: str,
            suites_sha256: dict[str, str], device: str = "auto") -> stage.Manifest:
    """Score base and fine-tuned model on the same suites (its config is an evaluate config, so the
    registry can re-score a champion on these suites). device is the config's top-level `device`
    (auto: CUDA in bf16 when present, else the CPU in fp32)."""
    from tasks.evaluate import placement

    key_cfg = {"suites": [s.model_dump(mode="json") for s in cfg.suites], "batch_size": 8,
               "suites_sha256": suites_sha256}
    # The device is not part of the key: the same models scored on another machine give the same result.
    m = stage.run_stage("finetune-compare", key_cfg, [data, trained], workdir,
                        lambda out, key: build_comparison(cfg, data, trained, workdir, out,
                                                          placement(device, "finetune-compare")), COMPARE_CODE)
    publish_counts("finetune-compare", m)
    return m
