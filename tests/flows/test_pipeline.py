"""The whole pipeline under Prefect's test harness, on the fixture site over loopback HTTP."""
import pandas as pd
import pytest
import yaml

STAGES = ["crawl", "dedupe", "normalize", "tokenize", "pretrain", "evaluate", "register"]
pytestmark = pytest.mark.slow


def task_states(flow_run_id) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name.rsplit("-", 1)[0]: r.state.name for r in runs}


@pytest.fixture
def config_file(site, tmp_path):
    cfg = {
        "name": "test",
        "crawl": {"serve_dir": str(site), "seeds": ["{serve}/docs/index.html"], "delay_s": 0, "retries": 1,
                  "shard_docs": 4,  # several shards: normalize maps over them
                  "allow_loopback": True},
        "dedupe": {"threshold": 0.7},
        "normalize": {"min_chars": 100},
        "tokenize": {"vocab_size": 300, "seq_len": 32, "val_fraction": 0.2, "min_frequency": 1},
        "pretrain": {"preset": "micro", "max_steps": 6, "micro_batch_size": 4, "warmup_steps": 1, "log_every": 3,
                     "eval_every": 3, "checkpoint_every": 3, "threads": 1, "grad_norms_every": 3,
                     "sample_every": 3, "sample_prompts": ["O Linux"]},
        "evaluate": {"prompts": ["O Linux"], "max_new_tokens": 8},
        "register": {"model_name": "forja-test", "experiment": "forja-test"},
    }
    path = tmp_path / "test.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return path


def test_pipeline_end_to_end_then_cached_then_partial_rerun(prefect_harness, config_file, tmp_path):
    import mlflow

    from flows.pipeline import pipeline

    workdir = str(tmp_path / "work")
    state = pipeline(config_path=str(config_file), workdir=workdir, return_state=True)
    first = state.result()
    states = task_states(state.state_details.flow_run_id)
    assert set(states.values()) == {"Completed"}
    assert "normalize-shard" in states  # normalize mapped over the crawl's shards
    for s in STAGES:
        assert (tmp_path / "work" / "artifacts" / s).is_dir()
        (folder,) = [p for p in (tmp_path / "work" / "artifacts" / s).iterdir() if not p.name.startswith(".")]
        assert (folder / "manifest.json").is_file()
    assert first["val_perplexity"] > 1 and first["model_uri"] == "models:/forja-test@candidate"

    # Same config again: every stage is a Prefect cache hit and nothing is rebuilt.
    state2 = pipeline(config_path=str(config_file), workdir=workdir, return_state=True)
    assert task_states(state2.state_details.flow_run_id) == {s: "Cached" for s in STAGES}  # no shard work either
    assert state2.result() == first

    # The registered version loads by alias and generates text for a table of prompts.
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    mv = client.get_model_version_by_alias("forja-test", "candidate")
    assert client.get_model_version_by_alias("forja-test", "champion").version == mv.version
    assert mv.tags["forja.stage.crawl"] and mv.tags["prefect.flow_run_id"] == str(state.state_details.flow_run_id)
    # The training run: live training metrics, per-layer gradients, samples, system metrics.
    run = client.get_run(mv.run_id)
    names = set(run.data.metrics)
    assert {"train_loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "memory_peak_gb"} <= names
    assert {"grad_norm.blocks.0", "grad_norm.blocks.1", "grad_norm.embed"} <= names
    assert 0 < run.data.metrics["mfu"] < 1 and run.data.metrics["memory_peak_gb"] > 0.05
    assert any(n.startswith("system/") for n in names)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert "samples/step-000003.txt" in artifacts and "samples/step-000006.txt" in artifacts
    loaded = mlflow.pyfunc.load_model("models:/forja-test@candidate")
    out = loaded.predict(pd.DataFrame({"prompt": ["O Linux", "A rede"]}), params={"max_new_tokens": 5})
    assert len(out) == 2 and all(isinstance(t, str) for t in out)

    # Changing dedupe reruns dedupe and everything after it, nothing before it.
    state3 = pipeline(config_path=str(config_file), overrides=["dedupe.threshold=0.9"], workdir=workdir,
                      return_state=True)
    states = task_states(state3.state_details.flow_run_id)
    assert states["crawl"] == "Cached"
    assert all(states[s] == "Completed" for s in STAGES[1:])
    v2 = client.get_model_version_by_alias("forja-test", "candidate")
    assert int(v2.version) == int(mv.version) + 1
    champion = client.get_model_version_by_alias("forja-test", "champion")
    losses = {v.version: float(v.tags["metric.val_loss"]) for v in (mv, v2)}
    assert champion.version == min(losses, key=losses.get)
