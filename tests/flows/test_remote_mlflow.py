"""The pipeline against a real `mlflow server` (SQLite database, proxied artifacts) on loopback:
registered weights live on the server and load from anywhere, the training run reads well in
the MLflow UI, and a retrain with pretrain.init_from continues from the champion."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.flows.test_pipeline import write_config

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
ROOT = Path(__file__).parents[2]


def start_mlflow_server(folder: Path) -> tuple[subprocess.Popen, str]:
    """`mlflow server` with a SQLite backend and proxied artifacts at a free loopback port."""
    import httpx

    from model.train import free_port

    folder.mkdir(parents=True)
    port = free_port()
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
         "--artifacts-destination", str(folder / "artifacts"), "--serve-artifacts", "--workers", "1",
         "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError("mlflow server did not start:\n" + (folder / "server.log").read_text()[-3000:])
        time.sleep(0.5)


@pytest.fixture(scope="module")
def remote(prefect_harness, tmp_path_factory):
    """A server; the pipeline run against it (v1), then again with pretrain.init_from pointing at
    the champion (v2, a tiny learning rate so that its weights stay next to v1's); then both work
    directories are moved away, so that only the server holds the models."""
    import mlflow

    from flows.pipeline import pipeline
    from tests.fixtures.site import make_site

    tmp = tmp_path_factory.mktemp("remote")
    server, url = start_mlflow_server(tmp / "server")
    os.environ["MLFLOW_TRACKING_URI"] = url
    try:
        config = write_config(tmp, make_site(tmp / "site"))
        t0 = time.time()
        first = pipeline(config_path=str(config), workdir=str(tmp / "work1"), return_state=True)
        t1 = time.time()
        second = pipeline(config_path=str(config), workdir=str(tmp / "work2"), return_state=True,
                          overrides=["pretrain.init_from=models:/forja-test@champion", "pretrain.lr=1e-6"])
        t2 = time.time()
        print(f"pipeline against the server: {t1 - t0:.0f} s; with init_from: {t2 - t1:.0f} s")
        runs = [first.result(), second.result()]
        keep = tmp / "kept"  # what the checks need from the work directories before they go
        keep.mkdir()
        for i, r in enumerate(runs, 1):
            stages = r["stages"]
            shutil.copy(Path(stages["tokenize"]) / "tokenizer.json", keep / f"tokenizer{i}.json")
            shutil.copy(Path(stages["tokenize"]) / "manifest.json", keep / f"tokenize{i}.json")
            shutil.copy(Path(stages["pretrain"]) / "spec.json", keep / f"spec{i}.json")
            shutil.copy(Path(stages["pretrain"]) / "model.safetensors", keep / f"weights{i}.safetensors")
            assert not list((tmp / f"work{i}").glob("mlartifacts/**/*.safetensors"))  # nothing local
            (tmp / f"work{i}").rename(tmp / f"work{i}-moved")
        mlflow.set_tracking_uri(url)
        yield SimpleNamespace(url=url, tmp=tmp, config=config, states=[first, second], runs=runs, kept=keep,
                              server=tmp / "server", client=mlflow.MlflowClient())
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        server.terminate()
        server.wait(30)


def other_env(remote, folder: Path) -> dict:
    """A fresh process's environment: only the tracking server in common with the test."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    return env | {"MLFLOW_TRACKING_URI": remote.url, "PREFECT_HOME": str(folder / "prefect"),
                  "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


def test_registered_weights_live_on_the_server_and_load_from_another_directory(remote, tmp_path):
    client = remote.client
    experiment = client.get_experiment_by_name("forja-test")
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
    v1 = client.get_model_version("forja-test", "1")
    assert v1.source.startswith(("mlflow-artifacts:", "models:/"))  # MLflow 3: the logged model, stored at:
    assert client.get_model_version_download_uri("forja-test", "1").startswith("mlflow-artifacts:")
    on_server = list((remote.server / "artifacts").rglob("model.safetensors"))
    assert len(on_server) == 2  # v1 and v2, stored by the server

    script = ("import json, mlflow, pandas as pd; m = mlflow.pyfunc.load_model('models:/forja-test@champion'); "
              "print(json.dumps(list(m.predict(pd.DataFrame({'prompt': ['O Linux', 'A rede']}), "
              "params={'max_new_tokens': 4, 'temperature': 0}))))")
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=other_env(remote, tmp_path),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    outputs = json.loads(out.stdout.strip().splitlines()[-1])  # the continuations of the two prompts
    assert len(outputs) == 2 and all(isinstance(o, str) and o for o in outputs)


def test_cli_evaluate_and_batch_use_the_tracking_server(remote, tmp_path):
    env = other_env(remote, tmp_path)
    forja = [sys.executable, "-m", "flows.cli"]
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = str(root)
    ev = subprocess.run([*forja, "evaluate", "models:/forja-test@champion", str(remote.config), "--workdir",
                         str(tmp_path / "w")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr[-3000:]
    result = json.loads(ev.stdout.strip().splitlines()[-1])
    champion = remote.client.get_model_version_by_alias("forja-test", "champion")
    assert result["version"] == int(champion.version)
    assert result["txt.bits_per_byte"] == pytest.approx(float(champion.tags["metric.txt.bits_per_byte"]), rel=1e-4)

    (tmp_path / "prompts.jsonl").write_text('{"prompt": "O Linux"}\n{"prompt": "A rede"}\n')
    bt = subprocess.run([*forja, "batch", "models:/forja-test@champion", "prompts.jsonl", "out", "--max-new-tokens",
                         "3", "--workdir", str(tmp_path / "w")], cwd=tmp_path, env=env, capture_output=True,
                        text=True, timeout=300)
    assert bt.returncode == 0, bt.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "_SUCCESS.json").read_text())["prompts"] == 2
    assert not (tmp_path / "w" / "mlflow.db").exists()  # the server, not a local store


def test_the_training_run_is_named_linked_and_lists_its_data(remote):
    from prefect.client.orchestration import get_client

    client = remote.client
    v1 = client.get_model_version("forja-test", "1")
    run = client.get_run(v1.run_id)
    flow_run_id = remote.states[0].state_details.flow_run_id
    with get_client(sync_client=True) as pc:
        flow_run = pc.read_flow_run(flow_run_id)
    assert run.info.run_name == f"{flow_run.name} · forja-test"
    assert run.data.tags["prefect.flow_run_id"] == str(flow_run_id)
    assert run.data.tags["prefect.flow_run_url"].endswith(f"/runs/flow-run/{flow_run_id}")

    # The metrics are curves and scores; the data counts are params and a table.
    metrics = run.data.metrics
    assert not [k for k in metrics if k.startswith("data.")]
    assert {"train_loss", "val_loss", "val_perplexity", "lr", "tokens_per_s", "eval_val_perplexity",
            "txt.bits_per_byte"} <= set(metrics)
    assert "eval_val_tokens" not in metrics and "txt.items" not in metrics
    assert int(run.data.tags["eval.val_tokens"]) > 0 and run.data.tags["eval.txt.items"] == "1.0"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_val_loss")] == [6]
    tokenize = json.loads((remote.kept / "tokenize1.json").read_text())
    assert run.data.params["data.tokenize.rows.train"] == str(tokenize["stats"]["rows"]["train"])
    assert "data.crawl.counts.fetched" in run.data.params or any(p.startswith("data.crawl.") for p in run.data.params)
    assert "data_counts.json" in {a.path for a in client.list_artifacts(run.info.run_id)}

    # The token rows it trained and validated on, as dataset inputs.
    inputs = {next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset
              for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation"}
    train_npy = [f for f in tokenize["files"] if f["path"].startswith("train-") and f["path"].endswith(".npy")]
    assert inputs["training"].name == f"tokenize-{tokenize['key']}-train"
    assert inputs["training"].digest == (train_npy[0]["sha256"] if len(train_npy) == 1 else hashlib.sha256(
        "".join(f["sha256"] for f in train_npy).encode()).hexdigest())[:12]
    assert inputs["training"].source == json.dumps({"uri": Path(tokenize["folder"]).as_uri()})
    assert json.loads(inputs["validation"].profile)["tokens"] == tokenize["stats"]["tokens"]["val"]


def test_init_from_continues_from_the_champion_with_its_tokenizer(remote):
    import numpy as np
    from safetensors.numpy import load_file

    from model.checkpoint import file_sha256

    client = remote.client
    assert remote.runs[1]["model_version"] == 2
    v1, v2 = client.get_model_version("forja-test", "1"), client.get_model_version("forja-test", "2")
    # lineage: the version and its run name the parent
    assert v2.tags["forja.init_from"] == "forja-test/1" and "forja.init_from" not in v1.tags
    assert client.get_run(v2.run_id).data.tags["forja.init_from"] == "forja-test/1"
    # the same tokenizer: encoded with v1's, not a new BPE
    assert file_sha256(remote.kept / "tokenizer2.json") == file_sha256(remote.kept / "tokenizer1.json")
    tokenize2 = json.loads((remote.kept / "tokenize2.json").read_text())
    assert tokenize2["stats"]["tokenizer_from"]["weights_sha256"] == v1.tags["weights_sha256"]
    # training started from v1's weights: at a learning rate of 1e-6 it ends next to them
    w1, w2 = load_file(remote.kept / "weights1.safetensors"), load_file(remote.kept / "weights2.safetensors")
    assert max(float(np.abs(w1[k] - w2[k]).max()) for k in w1) < 1e-3
    # and its first logged loss is v1's last, far below v1's first
    loss1 = [m.value for m in sorted(client.get_metric_history(v1.run_id, "train_loss"), key=lambda m: m.step)]
    loss2 = [m.value for m in sorted(client.get_metric_history(v2.run_id, "train_loss"), key=lambda m: m.step)]
    assert loss2[0] < loss1[0] - 0.05 and loss2[0] == pytest.approx(loss1[-1], abs=0.3)


def test_an_experiment_with_local_artifacts_on_a_server_is_reported(remote, tmp_path, caplog):
    from tasks.models import tracking

    remote.client.create_experiment("forja-local-artifacts", artifact_location=(tmp_path / "a").as_uri())
    with caplog.at_level("WARNING", logger="forja.tracking"):
        tracking.setup(tmp_path, "forja-local-artifacts")
    assert "forja-local-artifacts" in caplog.text and "new experiment name" in caplog.text


def test_make_serve_serves_the_champion_from_the_tracking_server(remote, tmp_path):
    """`make serve` (mlflow models serve) honours MLFLOW_TRACKING_URI: the champion comes from the server."""
    from model.train import free_port
    from tests.fixtures.serving import invoke, serving

    port = free_port()
    env = other_env(remote, tmp_path) | {"MODEL": "forja-test", "SERVE_PORT": str(port)}
    with serving(["make", "--no-print-directory", "serve"], port, env, tmp_path / "serve.log") as url:
        answer = invoke(url, ["O Linux"], max_new_tokens=3)
        assert answer.status_code == 200 and len(answer.json()["predictions"]) == 1, answer.text
