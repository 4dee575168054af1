"""feedback-snapshot: the feedback since the last snapshot, as the next fine-tune's conversations.

A stage like the others (tasks/stage.py): a folder keyed by the record id range, the
settings, the suite files and the base data, with a manifest written last. It holds

  conversations.jsonl  every kept conversation, with its record id and rating
  train.jsonl          the kept conversations fine-tuned on ({"messages": [...]})
  heldout.jsonl        the held-out ones, scored and never trained on
  heldout-suite.jsonl  their assistant turns as a `text` suite (bits per byte before and after)
  train-mix.jsonl      train.jsonl followed by the lines of finetune.data: the fine-tune's data
  dropped.jsonl        record id and reason of every record not kept

A 👍 record becomes its messages plus the answer as the assistant turn; a 👎 with a
correction, its messages plus the correction; a 👎 without one, and any record without the
user's consent, is counted and not kept. Then conversations that copy an evaluation suite
item or each other are removed (tasks/feedback/decontam.py) and a seeded share is held out.

The records were PII-scrubbed when stored; the fine-tune scrubs them again (finetune.scrub_pii).
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

from prefect import task

from model.checkpoint import file_sha256
from tasks import stage
from tasks.config import FeedbackConfig, SuiteConfig
from tasks.feedback import decontam
from tasks.feedback.store import open_store, safe_url
from tasks.reports import publish_counts

log = logging.getLogger("forja.feedback")
STAGE = "feedback-snapshot"
HELDOUT_SUITE = "heldout-suite.jsonl"
TRAIN_MIX = "train-mix.jsonl"


def conversations(records: list[dict]) -> tuple[list[dict], Counter, list[dict]]:
    """(usable conversations, counts by rating and by reason, the dropped records' ids and reasons)."""
    counts: Counter = Counter()
    kept, dropped = [], []
    for r in records:
        counts["thumbs_up" if r["rating"] > 0 else "thumbs_down"] += 1
        if not r["consent"]:
            reason = "no_consent"
        elif r["rating"] < 0 and not (r["correction"] or "").strip():
            reason = "thumbs_down_without_correction"
        else:
            turn = r["answer"] if r["rating"] > 0 else r["correction"]
            kept.append({"record_id": r["id"], "rating": r["rating"],
                         "messages": [*r["messages"], {"role": "assistant", "content": turn}]})
            continue
        counts[reason] += 1
        dropped.append({"record_id": r["id"], "reason": reason})
    return kept, counts, dropped


def pending(store, model_name: str) -> tuple[int, list[dict]]:
    """(the last snapshot's last record id or 0, the model's records after it): what the next snapshot takes."""
    last = store.last_snapshot(model_name)
    after = last["last_record_id"] if last else 0
    return after, store.records(model_name, after=after)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def build(cfg: FeedbackConfig, records: list[dict], suite_paths: list[str], base_data: str, out: Path) -> dict:
    """Write the stage's files from the records; return its stats (counts, split sizes, id range)."""
    usable, counts, dropped = conversations(records)
    index = decontam.SuiteIndex(decontam.suite_items(suite_paths), cfg.decontam_ngram) if suite_paths else None
    kept, removed = decontam.clean(usable, index, cfg.decontam_overlap)
    seen = {c["record_id"] for c in kept}
    dropped += [{"record_id": c["record_id"], "reason": "contaminated_or_duplicate"} for c in usable
                if c["record_id"] not in seen]
    train, heldout = decontam.heldout_split(kept, cfg.heldout_fraction, cfg.seed)
    write_jsonl(out / "conversations.jsonl", kept)
    write_jsonl(out / "train.jsonl", [{"messages": c["messages"]} for c in train])
    write_jsonl(out / "heldout.jsonl", [{"messages": c["messages"]} for c in heldout])
    write_jsonl(out / HELDOUT_SUITE, [{"text": c["messages"][-1]["content"]} for c in heldout])
    write_jsonl(out / "dropped.jsonl", sorted(dropped, key=lambda d: d["record_id"]))
    with open(out / TRAIN_MIX, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"messages": c["messages"]}, ensure_ascii=False) + "\n" for c in train)
        base = Path(base_data).read_text(encoding="utf-8")
        f.write(base if base.endswith("\n") or not base else base + "\n")
    ids = [r["id"] for r in records]
    train_ids = sorted(c["record_id"] for c in train)
    stats = {
        "records": len(records),
        "ratings": {"thumbs_up": counts["thumbs_up"], "thumbs_down": counts["thumbs_down"]},
        "kept": len(kept),
        "dropped": {"no_consent": counts["no_consent"],
                    "thumbs_down_without_correction": counts["thumbs_down_without_correction"],
                    "contaminated": removed["contaminated"], "duplicate": removed["duplicate"]},
        "train": len(train), "heldout": len(heldout),
        "record_ids": {"first": min(ids, default=0), "last": max(ids, default=0)},
        "train_record_ids": {"first": train_ids[0] if train_ids else 0, "last": train_ids[-1] if train_ids else 0},
    }
    log.info("feedback: %d records (%d 👍, %d 👎) -> %d kept (%d train, %d held out); dropped %s", len(records),
             counts["thumbs_up"], counts["thumbs_down"], len(kept), len(train), len(heldout), stats["dropped"])
    return stats


CODE = ("tasks.feedback.snapshot", "tasks.feedback.decontam", "tasks.feedback.store")


def key_config(cfg: FeedbackConfig, model_name: str, db_url: str, after: int, upto: int,
               suites: list[SuiteConfig], base_data: str) -> dict:
    """What the snapshot depends on: records are never changed once written, so the database,
    the model and the id range name them; plus the settings and the files it compares with."""
    if not Path(base_data).is_file():
        raise FileNotFoundError(f"finetune.data {base_data} does not exist (the feedback fine-tune mixes it in)")
    return {"model_name": model_name, "db": safe_url(db_url), "after": after, "upto": upto,
            **cfg.model_dump(include={"heldout_fraction", "decontam_ngram", "decontam_overlap", "seed"}),
            "suites_sha256": {s.name: file_sha256(s.path) for s in suites}, "base_data_sha256": file_sha256(base_data)}


@task(name=STAGE, retries=0, timeout_seconds=2 * 3600, **stage.task_options(*CODE))
def snapshot(cfg: FeedbackConfig, model_name: str, db_url: str, after: int, upto: int,
             suites: list[SuiteConfig], base_data: str, workdir: str) -> stage.Manifest:
    """The model's feedback records after..upto as cleaned conversations, split and mixed with the base data."""
    def build_stage(out: Path, key: str) -> dict:
        store = open_store(db_url)
        try:
            records = store.records(model_name, after=after, upto=upto)
        finally:
            store.close()
        return build(cfg, records, [s.path for s in suites], base_data, out)

    m = stage.run_stage(STAGE, key_config(cfg, model_name, db_url, after, upto, suites, base_data), [], workdir,
                        build_stage, CODE)
    publish_counts(STAGE, m)
    return m
