"""The whole pipeline under Prefect's test harness, on the fixture site over loopback HTTP, then the
registry it fills: versions, the gate, the CLI, tampering."""
import json
from pathlib import Path
from types import SimpleNamespace

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


SUITES = {
    "txt": ("text", [{"text": "O Linux é um sistema operacional livre, usado em servidores e computadores."}]),
    "mc": ("choice", [{"question": "O comando cp", "choices": ["copia arquivos", "apaga a rede"], "answer": 0},
                      {"question": "O comando ping", "choices": ["copia arquivos", "testa a rede"], "answer": 1}]),
    "tema": ("classification", [{"text": "cp copia arquivos", "label": "arquivos"},
                                {"text": "ping testa a rede", "label": "rede"}]),
    "qa": ("generation", [{"prompt": "Pergunta: o que é o Linux?\nResposta:", "reference": "um sistema livre"},
                          {"prompt": "Pergunta: o que faz o cp?\nResposta:", "reference": "copia arquivos"}]),
}


def write_config(folder, site):
    suites = []
    for name, (kind, rows) in SUITES.items():
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        suites.append({"name": name, "kind": kind, "path": str(path), "max_new_tokens": 6})
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
        "evaluate": {"prompts": ["O Linux"], "max_new_tokens": 8, "suites": suites},
        "register": {"model_name": "forja-test", "experiment": "forja-test", "gate_metric": "txt.bits_per_byte",
                     "gate_direction": "lower"},
    }
    path = folder / "test.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return path


@pytest.fixture(scope="module")
def runs(prefect_harness, tmp_path_factory):
    """The pipeline three times: fresh, all cached, and with dedupe changed (a second version)."""
    from flows.pipeline import pipeline
    from tests.fixtures.site import make_site

    tmp = tmp_path_factory.mktemp("pipeline")
    config = write_config(tmp, make_site(tmp / "site"))
    workdir = str(tmp / "work")
    with pytest.MonkeyPatch.context() as env:
        # training here takes ~5 s, forja's 5 s sampling could end before its first sample
        env.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
        first = pipeline(config_path=str(config), workdir=workdir, return_state=True)
        second = pipeline(config_path=str(config), workdir=workdir, return_state=True)
        third = pipeline(config_path=str(config), overrides=["dedupe.threshold=0.9", "pretrain.seed=7"],
                         workdir=workdir, return_state=True)  # other weights: a second version
    return SimpleNamespace(tmp=tmp, config=config, workdir=workdir, states=[first, second, third],
                           tracking_uri=f"sqlite:///{tmp / 'work' / 'mlflow.db'}")


@pytest.fixture
def client(runs, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", runs.tracking_uri)
    mlflow.set_tracking_uri(runs.tracking_uri)
    return mlflow.MlflowClient()


def test_pipeline_end_to_end_then_cached_then_partial_rerun(runs, client):
    import mlflow

    state = runs.states[0]
    first = state.result()
    states = task_states(state.state_details.flow_run_id)
    assert set(states.values()) == {"Completed"}
    assert "normalize-shard" in states  # normalize mapped over the crawl's shards
    for s in STAGES:
        assert (runs.tmp / "work" / "artifacts" / s).is_dir()
    assert first["val_perplexity"] > 1 and first["model_uri"] == "models:/forja-test@candidate"

    # Same config again: every stage is a Prefect cache hit and nothing is rebuilt.
    state2 = runs.states[1]
    assert task_states(state2.state_details.flow_run_id) == {s: "Cached" for s in STAGES}  # no shard work either
    assert state2.result() == first

    # The registered version loads by alias and generates text for a table of prompts.
    mv = client.get_model_version(name="forja-test", version="1")
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
    assert "model.png" in {a.path for a in client.list_artifacts(run.info.run_id)}  # the model's diagram
    loaded = mlflow.pyfunc.load_model("models:/forja-test/1")
    out = loaded.predict(pd.DataFrame({"prompt": ["O Linux", "A rede"]}), params={"max_new_tokens": 5})
    assert len(out) == 2 and all(isinstance(t, str) for t in out)

    # Changing dedupe reruns dedupe and everything after it, nothing before it.
    states = task_states(runs.states[2].state_details.flow_run_id)
    assert states["crawl"] == "Cached"
    assert all(states[s] == "Completed" for s in STAGES[1:])


def test_each_version_carries_its_cost_stage_by_stage_with_the_reused_stages_marked(runs, client):
    from tasks.models import registry

    v1, v2 = (client.get_model_version("forja-test", v) for v in ("1", "2"))
    for v in (v1, v2):
        assert {f"forja.cost.stage.{s}" for s in STAGES[:-1]} <= set(v.tags)
        assert float(v.tags["forja.cost.cpu_s"]) > 0 and float(v.tags["forja.cost.peak_rss_mb"]) > 100
        assert float(v.tags["forja.cost.train_tokens"]) == 6 * 4 * 32  # steps x micro batch x seq_len
        assert float(v.tags["forja.cost.train_tokens_per_s"]) > 0 and 0 < float(v.tags["forja.cost.train_mfu"]) < 1
        assert "cost/cost.md" in {a.path for a in client.list_artifacts(v.run_id, "cost")}
    # training's CPU is its ranks' (grandchildren of the flow): the stage's CPU-seconds must include them
    pretrain = runs.states[0].result()["stages"]["pretrain"]
    from tasks.stage import read_manifest

    m = read_manifest(pretrain)
    assert m.cost["cpu_s"] > 0.5 * m.cost["wall_s"] and m.cost["tokens"] == 6 * 4 * 32
    # the first run made every stage; the third reused the crawl and rebuilt the rest
    assert not any(t.endswith("(reused)") for k, t in v1.tags.items() if k.startswith("forja.cost.stage."))
    assert v2.tags["forja.cost.stage.crawl"].endswith("(reused)")
    assert not v2.tags["forja.cost.stage.dedupe"].endswith("(reused)")
    assert float(v2.tags["forja.cost.rebuilt_cpu_s"]) < float(v2.tags["forja.cost.cpu_s"])
    # `forja models NAME` shows the cost beside the metrics
    rows = {r["version"]: r for r in registry.describe(client, "forja-test", write=False)}
    assert rows[1]["cost"]["cpu_s"] == float(v1.tags["forja.cost.cpu_s"]) and "pretrain" in rows[1]["cost"]["stages"]


def test_versions_carry_suite_metrics_lineage_and_weights_digest_and_the_gate_picks_the_champion(runs, client):
    from prefect.client.orchestration import get_client

    v1, v2 = (client.get_model_version("forja-test", v) for v in ("1", "2"))
    assert str(client.get_model_version_by_alias("forja-test", "candidate").version) == "2"
    for v in (v1, v2):
        metrics = {k[7:] for k in v.tags if k.startswith("metric.")}
        assert {"txt.bits_per_byte", "mc.accuracy", "tema.macro_f1", "qa.bleu", "qa.chrf", "qa.token_f1",
                "val_loss"} <= metrics
        assert len(v.tags["weights_sha256"]) == 64 and len(v.tags["suite.txt.sha256"]) == 64
        assert all(f"forja.stage.{s}" in v.tags for s in STAGES[:-1])
    # The gate: lower txt.bits_per_byte wins the champion alias.
    bpb = {str(v.version): float(v.tags["metric.txt.bits_per_byte"]) for v in (v1, v2)}
    assert str(client.get_model_version_by_alias("forja-test", "champion").version) == min(bpb, key=bpb.get)
    # The suite metrics are on the training run too, and in a Prefect table artifact.
    assert "qa.chrf" in client.get_run(v1.run_id).data.metrics
    with get_client(sync_client=True) as pc:
        table = pc.read_latest_artifacts(limit=50)
    assert any(a.key == "evaluate-metrics" for a in table)


def cli(*args) -> tuple[int, str, str]:
    import contextlib
    import io

    from flows.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def test_cli_evaluates_a_registered_version_and_promotes_and_rolls_back(runs, client):
    code, out, err = cli("evaluate", "models:/forja-test@champion", str(runs.config), "--workdir", runs.workdir)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    champion = client.get_model_version_by_alias("forja-test", "champion")
    assert result["version"] == int(champion.version)
    # the same model on the same suite: the registration's figure again
    assert result["txt.bits_per_byte"] == pytest.approx(float(champion.tags["metric.txt.bits_per_byte"]), rel=1e-4)

    code, _, err = cli("evaluate", "models:/forja-tset@champion", str(runs.config), "--workdir", runs.workdir)
    assert code == 2 and "forja-test" in err and "forja-tset" in err

    other = "1" if str(champion.version) == "2" else "2"
    assert cli("promote", "forja-test", other, "--workdir", runs.workdir)[0] == 0
    assert str(client.get_model_version_by_alias("forja-test", "champion").version) == other
    assert cli("rollback", "forja-test", "--workdir", runs.workdir)[0] == 0
    assert str(client.get_model_version_by_alias("forja-test", "champion").version) == str(champion.version)
    code, out, _ = cli("models", "forja-test", "--workdir", runs.workdir)
    rows = [json.loads(x) for x in out.splitlines()]
    assert [r["version"] for r in rows] == [1, 2] and "champion" in rows[int(champion.version) - 1]["aliases"]


def test_two_promotions_at_once_leave_champion_on_exactly_the_better_version(runs, client):
    from concurrent.futures import ThreadPoolExecutor

    from tasks.models import registry

    for v, value in (("1", "2.0"), ("2", "1.0")):  # 2 is better on this made-up metric
        client.set_model_version_tag("forja-test", v, "metric.race.score", value)
    client.delete_registered_model_alias("forja-test", "champion")

    def gate(version):
        with registry.registry_lock(runs.workdir):
            return registry.gate(client, "forja-test", version, "race.score", "lower", 0.0)

    with ThreadPoolExecutor(2) as pool:
        decisions = list(pool.map(gate, ["1", "2"]))
    assert str(client.get_model_version_by_alias("forja-test", "champion").version) == "2"
    assert sum(d["promoted"] for d in decisions) >= 1
    # a margin the candidate does not clear keeps the champion where it is
    client.set_model_version_tag("forja-test", "1", "metric.race.score", "0.95")
    assert not registry.gate(client, "forja-test", "1", "race.score", "lower", 0.1)["promoted"]
    assert str(client.get_model_version_by_alias("forja-test", "champion").version) == "2"


def test_tampered_weights_are_refused_before_loading(runs, client, tmp_path):
    import mlflow

    from model.serving import TamperedWeights

    local = mlflow.artifacts.download_artifacts(artifact_uri="models:/forja-test/1", dst_path=str(tmp_path))
    weights = next(Path(local).rglob("model.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(Exception) as e:
        mlflow.pyfunc.load_model(local)
    assert isinstance(e.value, TamperedWeights) or "differs from the registered" in str(e.value)


def test_mlflow_models_serve_answers_on_loopback_with_a_response_cache_and_400s(runs, client, tmp_path):
    import re

    from model.train import free_port
    from tests.fixtures.serving import mlflow_serve_command, serve_env, serving
    from tests.fixtures.serving import invoke as post

    port = free_port()
    env = serve_env(MLFLOW_TRACKING_URI=runs.tracking_uri)
    with serving(mlflow_serve_command("models:/forja-test@champion", port), port, env, tmp_path / "serve.log") as url:
        def invoke(prompts, **params):
            return post(url, prompts, **params)

        first = invoke(["O Linux", "A rede"], max_new_tokens=6, temperature=0)
        assert first.status_code == 200, first.text
        predictions = first.json()["predictions"]
        assert len(predictions) == 2 and all(isinstance(p, str) for p in predictions)
        again = invoke(["O Linux", "A rede"], max_new_tokens=6, temperature=0)
        assert again.json()["predictions"] == predictions
        seeded = [invoke(["O Linux"], max_new_tokens=6, temperature=1.0, seed=7).json() for _ in range(2)]
        assert seeded[0] == seeded[1]

        chat = invoke(["O que faz o cp?"], max_new_tokens=4, temperature=0, chat=True)  # through the chat template
        assert chat.status_code == 200 and len(chat.json()["predictions"]) == 1, chat.text
        long = invoke(["palavra " * 200], max_new_tokens=4, temperature=0)  # longer than the 32-token context
        assert long.status_code == 200, long.text
        for field, value in (("temperature", -1.0), ("top_p", 1.5), ("max_new_tokens", 0)):
            bad = invoke(["O Linux"], **{field: value})
            assert bad.status_code == 400 and field in bad.text, bad.text
        log_text = (tmp_path / "serve.log").read_text()
        cached = re.findall(r"(\d+) prompt\(s\), (\d+) from the response cache, ([\d.]+) ms", log_text)
        assert ("2", "2") in [(n, c) for n, c, _ in cached]  # the repeated request generated nothing
        assert min(float(ms) for n, c, ms in cached if n == c) < 5.0


def test_cli_exports_a_registered_version_that_transformers_loads(runs, client, tmp_path):
    import transformers

    code, out, err = cli("export", "models:/forja-test@champion", str(tmp_path / "hf"), "--workdir", runs.workdir)
    assert code == 0, err
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert model.config.model_type == "llama" and (tmp_path / "hf" / "tokenizer.json").is_file()


def finetune_config(runs, tmp_path, base="models:/forja-test@champion") -> Path:
    pairs = [("O que faz o cp?", "Copia arquivos."), ("O que faz o mv?", "Move arquivos."),
             ("O que faz o ls?", "Lista arquivos."), ("O que faz o rm?", "Remove arquivos."),
             ("O que faz o ping?", "Testa a rede."), ("O que faz o cat?", "Mostra arquivos.")]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": q, "response": a}, ensure_ascii=False) + "\n" for q, a in pairs)
                    + json.dumps({"messages": [{"role": "user", "content": "E o cd?"},
                                               {"role": "assistant", "content": "Muda de pasta."}]}) + "\n")
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"prompt": "O que faz o cp?", "reference": "Copia arquivos."}) + "\n")
    cfg = yaml.safe_load(runs.config.read_text())
    cfg["finetune"] = {
        "base_model": base, "data": str(data), "val_fraction": 0.3, "model_name": "forja-test-ft",
        "training": {"max_steps": 4, "micro_batch_size": 2, "warmup_steps": 1, "log_every": 2, "eval_every": 2,
                     "checkpoint_every": 2, "threads": 1, "eval_batches": 1},
        "lora": {"rank": 4, "alpha": 8},
        "suites": [{"name": "qa_chat", "kind": "generation", "path": str(chat), "chat": True, "max_new_tokens": 4}],
        "gate_metric": "qa_chat.chrf", "gate_direction": "higher",
    }
    path = tmp_path / "finetune.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return path


def test_finetune_flow_trains_lora_on_responses_only_and_registers_a_child_version(runs, client, tmp_path):
    import mlflow
    import numpy as np
    from tokenizers import Tokenizer

    from flows.finetune import finetune

    result = finetune(config_path=str(finetune_config(runs, tmp_path)), workdir=runs.workdir)
    parent = client.get_model_version_by_alias("forja-test", "champion")
    assert result["base_model"] == f"forja-test/{parent.version}"
    rows = {r["metric"]: r for r in result["comparison"]}
    assert {"qa_chat.chrf", "qa_chat.bleu", "qa_chat.token_f1", "val_loss"} <= set(rows)
    assert all({"base", "finetuned"} <= set(r) for r in rows.values())

    # The rendered data: every learned token is a response's or its <|end|>.
    data = Path(result["stages"]["sft-data"])
    tok = Tokenizer.from_file(str(data / "base" / "tokenizer.json"))
    tokens, mask = np.load(data / "train.npy"), np.load(data / "train.mask.npy")
    learned = {tok.decode([int(t) for t in r[m]], skip_special_tokens=False) for r, m in zip(tokens, mask)}
    responses = {"Copia arquivos.", "Move arquivos.", "Lista arquivos.", "Remove arquivos.", "Testa a rede.",
                 "Mostra arquivos.", "Muda de pasta."}
    assert learned and all(x.endswith("<|end|>") and x[: -len("<|end|>")] in responses for x in learned)

    trained = Path(result["stages"]["finetune"])
    assert (trained / "adapter.safetensors").is_file() and (trained / "model.safetensors").is_file()
    v = client.get_model_version("forja-test-ft", str(result["model_version"]))
    assert v.tags["forja.parent"] == f"forja-test/{parent.version}" and "metric.qa_chat.chrf" in v.tags
    assert str(client.get_model_version_by_alias("forja-test-ft", "champion").version) == str(v.version)
    out = mlflow.pyfunc.load_model(f"models:/forja-test-ft/{v.version}").predict(
        pd.DataFrame({"prompt": ["O Linux"]}), params={"max_new_tokens": 3, "temperature": 0})
    assert len(out) == 1


def test_finetune_from_a_model_that_does_not_exist_names_the_registered_ones(runs, tmp_path):
    code, _, err = cli("finetune", str(finetune_config(runs, tmp_path, "models:/nope@champion")),
                       "--workdir", runs.workdir)
    assert code == 2 and "nope" in err and "forja-test" in err


def test_batch_inference_writes_parquet_shards_and_resumes_after_a_crash(runs, client, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    from flows.batch import batch
    from model.generate import Sampling, generate_text, load_folder
    from tasks.models import registry

    prompts = [f"O Linux {i}" for i in range(7)]
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    out = tmp_path / "out"
    greedy = {"max_new_tokens": 4, "temperature": 0.0}
    monkeypatch.setenv("FORJA_FAULT", "batch-shard:1")  # the job dies after writing its second shard
    with pytest.raises(BaseException):
        batch("models:/forja-test@champion", str(src), str(out), shard_size=3, sampling=greedy, workdir=runs.workdir)
    assert sorted(p.name for p in out.glob("part-*.parquet")) == ["part-00000.parquet", "part-00001.parquet"]
    first = (out / "part-00000.parquet").stat().st_mtime_ns
    monkeypatch.delenv("FORJA_FAULT")
    summary = batch("models:/forja-test@champion", str(src), str(out), shard_size=3, sampling=greedy,
                    workdir=runs.workdir)
    assert summary["shards"] == 3 and summary["resumed_shards"] == 2
    assert (out / "part-00000.parquet").stat().st_mtime_ns == first  # not redone
    table = pq.read_table(sorted(out.glob("part-*.parquet")))
    assert table.column("row").to_pylist() == list(range(7)) and table.column("prompt").to_pylist() == prompts
    version = registry.resolve(client, "models:/forja-test@champion")
    model, tok = load_folder(registry.download(client, version, tmp_path / "m"))
    assert table.column("output").to_pylist() == generate_text(model, tok, prompts, Sampling(**greedy))
    assert (out / "_SUCCESS.json").is_file()


def test_a_champion_measured_on_another_suite_file_is_rescored_before_the_gate_compares(runs, client):
    from tasks.models import registry

    for v, value, digest in (("1", "0.50", "old-file"), ("2", "0.40", "new-file")):
        client.set_model_version_tag("forja-test", v, "metric.drift.score", value)
        client.set_model_version_tag("forja-test", v, "suite.drift.sha256", digest)
    registry.move_champion(client, "forja-test", "1", "test setup")
    rescored = []

    def rescore(champion):  # the champion on the candidate's (new) suite file
        rescored.append(str(champion.version))
        return 0.30

    decision = registry.gate(client, "forja-test", "2", "drift.score", "lower", 0.0, rescore)
    assert rescored == ["1"] and decision["champion_value"] == 0.30 and not decision["promoted"]
    champion = client.get_model_version("forja-test", "1")
    assert champion.tags["metric.drift.score"] == "0.3" and champion.tags["suite.drift.sha256"] == "new-file"
    assert str(client.get_model_version_by_alias("forja-test", "champion").version) == "1"


def test_register_retries_while_the_tracking_server_is_down_then_fails_naming_it(runs, monkeypatch):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.runtime import with_policy
    from model.train import free_port
    from tasks.config import load_config
    from tasks.register import register
    from tasks.stage import Manifest

    def manifest(stage: str) -> Manifest:
        return Manifest.model_validate_json((Path(runs.states[0].result()["stages"][stage]) / "manifest.json").read_text())

    trained, evaluated = manifest("pretrain"), manifest("evaluate")
    down = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", down)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    monkeypatch.setenv("FORJA_RETRY_DELAY_SCALE", "0.01")
    cfg = load_config(runs.config, ["register.model_name=forja-down"]).register

    @flow
    def register_only():
        return with_policy(register)(cfg, trained, evaluated, {}, str(Path(runs.workdir) / "other"))

    state = register_only(return_state=True)
    assert state.is_failed()
    with get_client(sync_client=True) as c:
        (task_run,) = c.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    assert task_run.run_count == 4  # three retries
    assert down in str(state.message) or down in str(task_run.state.message)
    assert Path(trained.folder, "model.safetensors").is_file()  # the trained model is still there
