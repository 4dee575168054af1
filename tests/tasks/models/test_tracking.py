"""How runs land in MLflow (the embedded SQLite store here; a real server in
tests/flows/test_remote_mlflow.py): where artifacts go, what is a metric and what is a param,
the data as dataset inputs, run names, and the checks of pretrain.init_from."""
import hashlib
import json
from dataclasses import asdict

import mlflow
import pytest

from tasks import evaluate, pretrain, stage
from tasks.models import tracking
from tasks import tokenization as t
from tasks.config import PretrainConfig, TokenizeConfig
from tests.tasks.test_tokenization import CFG, corpus_file


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One SQLite store for the module (creating one costs seconds); each test its own experiment."""
    return tmp_path_factory.mktemp("tracking") / "work"


@pytest.fixture
def tokens(tmp_path):
    src, _ = corpus_file(tmp_path)
    return stage.run_stage("tokenize", CFG, [], tmp_path, lambda out, key: t.build(CFG, [src], out), [t])


def test_a_local_store_keeps_artifacts_in_the_work_directory_and_a_server_is_remote(workdir):
    exp = mlflow.MlflowClient(tracking.tracking_uri(workdir)).get_experiment(tracking.setup(workdir, "local"))
    assert exp.artifact_location == (workdir.resolve() / "mlartifacts").as_uri()
    assert tracking.setup(workdir, "local") == exp.experiment_id
    assert tracking.is_remote("http://127.0.0.1:5000") and tracking.is_remote("HTTPS://mlflow.internal")
    assert not tracking.is_remote("sqlite:///x.db") and not tracking.is_remote("postgresql://u@h/db")


def test_data_counts_are_params_and_a_table_and_token_rows_are_dataset_inputs(workdir, tokens):
    exp = tracking.setup(workdir, "counts")
    with mlflow.start_run(experiment_id=exp) as run:
        pretrain.log_data_counts([tokens])
        tracking.log_token_inputs(tokens)
    client = mlflow.MlflowClient()
    got = client.get_run(run.info.run_id)
    assert got.data.metrics == {}
    assert got.data.params["data.tokenize.rows.train"] == str(tokens.stats["rows"]["train"])
    table = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/data_counts.json"))
    assert ["tokenize", "rows.train", tokens.stats["rows"]["train"]] in table["data"]

    inputs = {next(x.value for x in d.tags if x.key == "mlflow.data.context"): d.dataset
              for d in got.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation"}
    for split, context in (("train", "training"), ("val", "validation")):
        ds = inputs[context]
        shards = [f for f in tokens.files if f.path.startswith(f"{split}-") and f.path.endswith(".npy")]
        assert shards and shards == tracking.data_files(tokens, split)
        digest = shards[0].sha256 if len(shards) == 1 else \
            hashlib.sha256("".join(f.sha256 for f in shards).encode()).hexdigest()
        assert ds.name == f"tokenize-{tokens.key}-{split}" and ds.digest == digest[:12]
        profile = json.loads(ds.profile)
        assert profile["rows"] == tokens.stats["rows"][split] and profile["tokens"] == tokens.stats["tokens"][split]
        spec = json.loads(json.loads(ds.schema)["mlflow_tensorspec"]["features"])[0]["tensor-spec"]
        assert spec["shape"] == [-1, CFG.seq_len + 1] and spec["dtype"] == "uint16"


def test_evaluation_scores_are_metrics_at_the_last_step_and_counts_are_tags(workdir):
    exp = tracking.setup(workdir, "evaluate")
    run_id = mlflow.MlflowClient().create_run(exp).info.run_id
    metrics = {"val_loss": 3.0, "val_perplexity": 20.1, "val_tokens": 640, "qa.chrf": 12.5, "qa.items": 2.0,
               "mc.accuracy": 0.5, "mc.chance": 0.5, "txt.tokens": 40.0}
    evaluate.log_to_run(str(workdir), run_id, metrics, [], step=300)
    run = mlflow.MlflowClient().get_run(run_id)
    assert set(run.data.metrics) == {"eval_val_loss", "eval_val_perplexity", "qa.chrf", "mc.accuracy"}
    assert run.data.tags["eval.mc.chance"] == "0.5" and run.data.tags["eval.txt.tokens"] == "40.0"
    assert [m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "qa.chrf")] == [300]
    assert run.data.tags["eval.val_tokens"] == "640" and run.data.tags["eval.qa.items"] == "2.0"
    evaluate.log_to_run(str(workdir), run_id, {**metrics, "qa.items": 3.0}, [], step=300)  # re-evaluated: no error
    assert mlflow.MlflowClient().get_run(run_id).data.tags["eval.qa.items"] == "3.0"


def test_outside_a_flow_run_the_name_falls_back_and_no_prefect_link_is_made():
    assert tracking.run_name("pretrain-1a2b3c4d", "forja-demo") == "pretrain-1a2b3c4d · forja-demo"
    assert tracking.run_name("pretrain-1a2b3c4d") == "pretrain-1a2b3c4d"
    assert tracking.prefect_tags() == {"prefect.flow_run_id": ""}


BASE = {"uri": "models:/forja-test@champion", "version": "forja-test/1", "weights_sha256": "0" * 64}


def test_init_from_another_shape_or_tokenizer_fails_naming_what_differs(tmp_path, tokens):
    import model.config

    cfg = PretrainConfig(preset="micro", max_steps=4, warmup_steps=1)
    spec = pretrain.train_spec(cfg, tokens, tmp_path / "out", tmp_path / "ckpt")
    folder = tmp_path / "base"
    folder.mkdir()
    base_shape = model.config.from_preset("tiny", tokens.stats["vocab_size"], 64)
    base_shape.save(folder / "config.json")
    with pytest.raises(ValueError) as e:
        pretrain.check_init(BASE, folder, spec)
    message = str(e.value)
    for field in ("n_layer 4 there, 2 here (from pretrain.n_layer)", "n_embd 256 there, 64 here",
                  "block_size 64 there, 16 here (from tokenize.seq_len)", "forja-test/1"):
        assert field in message
    model.config.ModelConfig(**spec.model).save(folder / "config.json")
    (folder / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="tokenizer .* is not the base's"):
        pretrain.check_init(BASE, folder, spec)
    (folder / "tokenizer.json").write_bytes(tokens.path("tokenizer.json").read_bytes())
    pretrain.check_init(BASE, folder, spec)  # same shape, same tokenizer
    assert asdict(spec)["init_from"] == ""  # the URI never reaches the training loop as a folder


def test_init_from_needs_the_flow_to_resolve_it_and_agree_with_tokenizer_from(tmp_path, tokens):
    cfg = PretrainConfig(preset="micro", max_steps=4, warmup_steps=1, init_from="models:/a@champion")
    with pytest.raises(ValueError, match="differ"):
        pretrain.init_base(cfg, TokenizeConfig(tokenizer_from="models:/b@champion"), str(tmp_path))
    with pytest.raises(ValueError, match="pass base="):
        pretrain.pretrain.fn(cfg, tokens, str(tmp_path), "e")
    with pytest.raises(ValueError, match="pass base="):
        t.tokenize.fn(TokenizeConfig(tokenizer_from="models:/a@champion"), tokens, str(tmp_path))
    from tasks.config import ConfigError, load_config

    bad = tmp_path / "c.yaml"
    bad.write_text("crawl: {folders: [x]}\npretrain: {init_from: forja-test@champion}\n")
    with pytest.raises(ConfigError, match="pretrain.init_from"):
        load_config(bad)


def test_one_work_directorys_store_does_not_leak_into_the_next(tmp_path, monkeypatch):
    """tracking.client(A) must not make A's store the answer for work directory B (mlflow's own
    set_tracking_uri exports MLFLOW_TRACKING_URI, which forja reads as the user's choice)."""
    from tasks.models import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking.client(tmp_path / "a")
    assert tracking.tracking_uri(tmp_path / "b") == f"sqlite:///{(tmp_path / 'b').resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")  # the user's choice wins
    tracking.client(tmp_path / "a")
    assert tracking.tracking_uri(tmp_path / "b") == "http://127.0.0.1:5000"
