"""The feedback flow: users' rated answers -> the next fine-tune of the champion, gated.

    forja feedback CONFIG.yaml      (weekly as a deployment; the config's feedback and finetune sections)

1. snapshot the consented feedback of the model since the last snapshot (tasks/feedback/snapshot.py:
   👍 answers and corrected 👎 answers as conversations, suite copies and duplicates removed, a
   held-out share set aside); fewer usable conversations than feedback.min_records: skip, saying so;
2. fine-tune models:/NAME@ALIAS (the champion) on them plus finetune.data, with the finetune
   section's knobs (tasks/finetune.py's stages);
3. score its suites and the held-out feedback (a `text` suite of their answers) before and after,
   register and gate as the fine-tune flow does, the version tagged with the snapshot;
4. record the snapshot in the store only once a version is registered: a failed run leaves the
   feedback for the next one.
"""
from __future__ import annotations

import logging
import os
from typing import Literal

from prefect import flow

from flows.runtime import forward_logs, link_mlflow_run, with_policy, workdir_lock
from tasks.config import ConfigError, RegisterConfig, SuiteConfig, load_config
from tasks.feedback.snapshot import HELDOUT_SUITE, TRAIN_MIX, pending, snapshot
from tasks.feedback.store import default_url, open_store

logging.getLogger("forja").setLevel(logging.INFO)
log = logging.getLogger("forja.feedback")
HELDOUT_NAME = "feedback_heldout"  # the held-out feedback's suite: metrics feedback_heldout.bits_per_byte, ...


def _skip(result: dict, usable: int, minimum: int) -> dict:
    message = f"skipped: {usable} new usable conversations, feedback.min_records is {minimum}"
    log.warning("feedback: %s", message)
    print(message)
    return {**result, "skipped": message, "model_uri": None, "model_version": None, "promoted": False}


@flow(name="forja-feedback", log_prints=True)
def feedback(config_path: str = "configs/demo.yaml", overrides: list[str] | None = None,
             workdir: str = "", if_busy: Literal["wait", "fail"] = "wait") -> dict:
    """Fine-tune the champion on the feedback users gave since the last snapshot, score it, register it.

    Args:
        config_path: YAML config with finetune and feedback sections (relative to the repository root).
        overrides: config values to change for this run, one `section.key=value` each,
            e.g. `feedback.min_records=50` or `finetune.training.max_steps=300`.
        workdir: where stage folders, checkpoints and the default feedback database go; empty:
            $FORJA_WORKDIR, else ./work.
        if_busy: when another run holds the work directory: `wait` for it, or `fail` at once.
    """
    from tasks.evaluate import suite_digests
    from tasks.finetune import base_digests, compare, finetune_train, sft_data
    from tasks.register import register

    forward_logs()
    cfg = load_config(config_path, overrides or [])
    if cfg.finetune is None:
        raise ConfigError(f"{config_path} has no finetune section: the feedback flow fine-tunes with its settings "
                          "(training, suites, gate, base data)")
    fb, ft = cfg.feedback, cfg.finetune
    if any(s.name == HELDOUT_NAME for s in ft.suites):
        raise ConfigError(f"finetune.suites: the name {HELDOUT_NAME!r} is the feedback flow's own held-out suite; "
                          "rename yours")
    name = fb.model_name or ft.model_name
    wd = os.path.abspath(workdir or os.environ.get("FORJA_WORKDIR") or "work")
    db = fb.db or cfg.serve.feedback_db or default_url(wd)  # the database forja serve writes to
    with workdir_lock(wd, if_busy):
        store = open_store(db)
        try:
            after, new = pending(store, name)
        finally:
            store.close()
        result = {"workdir": wd, "model_name": name, "after_record_id": after, "new_records": len(new)}
        if not new:
            return _skip({**result, "feedback": {}, "snapshot": None}, 0, fb.min_records)
        snap = snapshot(fb, name, db, after, new[-1]["id"], list(ft.suites), ft.data, wd)
        ids = snap.stats["record_ids"]
        result |= {"feedback": snap.stats, "snapshot": snap.folder}
        if snap.stats["kept"] < fb.min_records:
            return _skip(result, snap.stats["kept"], fb.min_records)

        base_uri = f"models:/{name}@{fb.alias}"
        heldout = [SuiteConfig(name=HELDOUT_NAME, kind="text", path=str(snap.path(HELDOUT_SUITE)))]
        tuned = ft.model_copy(update={"base_model": base_uri, "data": str(snap.path(TRAIN_MIX)), "model_name": name,
                                      "suites": [*ft.suites, *(heldout if snap.stats["heldout"] else [])]})
        base_sha, data_sha = base_digests(tuned, wd)
        data = with_policy(sft_data)(tuned, wd, base_sha, data_sha)
        trained = with_policy(finetune_train)(tuned, data, wd, cfg.register.experiment)
        link_mlflow_run(trained.stats["mlflow_run_id"], wd, "MLflow fine-tuning run (feedback)")
        scored = with_policy(compare)(tuned, data, trained, wd, suite_digests(list(tuned.suites)))
        gate = RegisterConfig(model_name=name, experiment=cfg.register.experiment, gate_metric=ft.gate_metric,
                              gate_direction=ft.gate_direction, gate_margin=ft.gate_margin)
        tags = {"forja.parent": data.stats["base_model"], "forja.parent_uri": base_uri,
                "feedback.records": str(snap.stats["train"]), "feedback.snapshot": snap.key,
                "feedback.record_ids": f"{ids['first']}-{ids['last']}"}
        stages = (snap, data, trained, scored)
        registered = with_policy(register)(gate, trained, scored, {m.stage: m.key for m in stages}, wd, tags)
        store = open_store(db)
        try:
            store.record_snapshot(model_name=name, first_record_id=ids["first"], last_record_id=ids["last"],
                                  stage_key=snap.key, counts={k: snap.stats[k] for k in ("records", "kept", "train",
                                                                                         "heldout")})
        finally:
            store.close()
    log.info("feedback: %s version %s registered from %d feedback conversations (records %s-%s); %s",
             name, registered.stats["version"], snap.stats["train"], ids["first"], ids["last"],
             "promoted to champion" if registered.stats["promoted"] else "the champion stays")
    return {
        **result, "skipped": None, "base_model": data.stats["base_model"], "comparison": scored.stats["comparison"],
        "model_uri": registered.stats["model_uri"], "model_version": registered.stats["version"],
        "promoted": registered.stats["promoted"], "stages": {m.stage: m.folder for m in stages},
    }
