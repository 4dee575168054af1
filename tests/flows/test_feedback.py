"""The forja-feedback flow under Prefect's test harness: too little feedback skips, saying so and
registering nothing; enough feedback fine-tunes the champion of a tiny registered model (random
weights, no pretraining), registers a version tagged with the snapshot, gates it, and records the
snapshot so the next run starts after it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tasks.feedback.store import default_url, open_store

QA = [("Como vejo o espaço livre?", "Use df -h."), ("Como listo arquivos?", "Use ls -l."),
      ("Como copio arquivos?", "Use cp origem destino."), ("Como movo arquivos?", "Use mv origem destino."),
      ("Como apago arquivos?", "Use rm arquivo."), ("Como vejo processos?", "Use ps aux."),
      ("Como mudo de pasta?", "Use cd pasta."), ("Como crio pastas?", "Use mkdir pasta."),
      ("Como vejo a rede?", "Use ip addr."), ("Como testo a rede?", "Use ping host."),
      ("Como leio arquivos?", "Use cat arquivo."), ("Como busco texto?", "Use grep texto.")]


def write_config(tmp: Path, min_records: int, model: str) -> Path:
    suite = tmp / "qa.jsonl"
    suite.write_text(json.dumps({"text": "O comando ls lista os arquivos de uma pasta no terminal."}) + "\n",
                     encoding="utf-8")
    base = tmp / "base.jsonl"
    base.write_text("".join(json.dumps({"prompt": q, "response": a}, ensure_ascii=False) + "\n" for q, a in QA[:3]),
                    encoding="utf-8")
    cfg = {
        "name": "feedback-test", "crawl": {"folders": [str(tmp)]},  # (unused by this flow)
        "register": {"experiment": "feedback-test"},
        "finetune": {
            "base_model": "models:/unused@champion", "data": str(base), "val_fraction": 0.2, "model_name": model,
            "training": {"max_steps": 6, "micro_batch_size": 4, "lr": 3.0e-3, "warmup_steps": 1, "log_every": 3,
                         "eval_every": 3, "checkpoint_every": 6, "threads": 1, "eval_batches": 1},
            "lora": {"rank": 0},
            "suites": [{"name": "qa", "kind": "text", "path": str(suite)}],
            "gate_metric": "feedback_heldout.bits_per_byte", "gate_direction": "lower",
        },
        "feedback": {"min_records": min_records, "heldout_fraction": 0.25},
    }
    path = tmp / "feedback.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return path


def rate(workdir: Path, model: str, version: str, pairs, rating: int = 1) -> list[int]:
    store = open_store(default_url(str(workdir)))
    try:
        return [int(store.add(request_id=f"r{i}", model_name=model, model_version=version,
                              messages=[{"role": "user", "content": q}], answer=a, rating=rating,
                              correction=None, consent=True)) for i, (q, a) in enumerate(pairs)]
    finally:
        store.close()


def snapshot_counts() -> dict:
    """The latest feedback-snapshot counts table published to the Prefect API, as {metric: value}."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["feedback-snapshot-counts"])))
    latest = max(found, key=lambda a: a.created)
    data = json.loads(latest.data) if isinstance(latest.data, str) else latest.data
    return {row["metric"]: row["value"] for row in data}


def test_too_little_feedback_skips_saying_so_and_registers_nothing(prefect_harness, tmp_path):
    from flows.feedback import feedback

    workdir = tmp_path / "work"
    config = write_config(tmp_path, min_records=5, model="chat-skip")
    result = feedback(config_path=str(config), workdir=str(workdir))
    assert result["skipped"] == "skipped: 0 new usable conversations, feedback.min_records is 5"
    rate(workdir, "chat-skip", "1", QA[:3])
    rate(workdir, "chat-skip", "1", QA[3:5], rating=-1)  # 👎 without a correction: not usable
    result = feedback(config_path=str(config), workdir=str(workdir))
    assert result["skipped"] == "skipped: 3 new usable conversations, feedback.min_records is 5"
    assert result["model_version"] is None and result["feedback"]["records"] == 5
    assert result["feedback"]["dropped"]["thumbs_down_without_correction"] == 2
    assert snapshot_counts()["dropped.thumbs_down_without_correction"] == 2  # the counts table in the Prefect run
    store = open_store(default_url(str(workdir)))
    try:
        assert store.last_snapshot("chat-skip") is None  # nothing trained: the feedback waits for the next run
    finally:
        store.close()


@pytest.mark.slow
def test_feedback_fine_tunes_the_champion_registers_a_tagged_version_and_gates_it(prefect_harness, tmp_path):
    import mlflow

    from flows.feedback import feedback
    from tasks.models import tracking
    from tests.model.test_serving_bounds import register_tiny

    workdir = tmp_path / "work"
    parent = register_tiny(workdir, "chat-tiny")
    client = mlflow.MlflowClient(tracking.tracking_uri(str(workdir)))
    client.set_registered_model_alias("chat-tiny", "champion", parent.version)
    ids = rate(workdir, "chat-tiny", parent.version, QA)
    config = write_config(tmp_path, min_records=8, model="chat-tiny")

    result = feedback(config_path=str(config), workdir=str(workdir))
    assert result["skipped"] is None and result["base_model"] == f"chat-tiny/{parent.version}"
    fb = result["feedback"]
    assert fb["kept"] == 12 and fb["train"] + fb["heldout"] == 12 and fb["heldout"] >= 1
    rows = {r["metric"]: r for r in result["comparison"]}
    assert {"qa.bits_per_byte", "feedback_heldout.bits_per_byte"} <= set(rows)
    version = client.get_model_version("chat-tiny", str(result["model_version"]))
    assert version.tags["feedback.records"] == str(fb["train"])
    assert version.tags["feedback.snapshot"] == Path(result["stages"]["feedback-snapshot"]).name
    assert version.tags["feedback.record_ids"] == f"{ids[0]}-{ids[-1]}"
    assert version.tags["forja.parent"] == f"chat-tiny/{parent.version}"
    champion = client.get_model_version_by_alias("chat-tiny", "champion").version
    after, before = rows["feedback_heldout.bits_per_byte"]["finetuned"], rows["feedback_heldout.bits_per_byte"]["base"]
    assert after < before and result["promoted"]  # the gate: better on the held-out feedback than the champion
    assert str(champion) == str(version.version)

    # the snapshot is recorded: the next run sees nothing new and skips
    again = feedback(config_path=str(config), workdir=str(workdir))
    assert again["skipped"] == "skipped: 0 new usable conversations, feedback.min_records is 8"
    assert again["after_record_id"] == ids[-1]
