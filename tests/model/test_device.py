"""Where trained models run (model.device.resolve) and that the stages after training follow the
`device` setting: the selection rules through resolve's stand-ins for what torch reports (no GPU
needed), and evaluation, the gate's re-scoring and batch inference asked for the CPU giving
exactly today's results, with the device kept out of the stage key."""
from __future__ import annotations

import json
import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from model.device import Placement, resolve
from tests.model.test_serving_bounds import tiny_folder


# -- the selection rules ------------------------------------------------------------------------

def test_auto_picks_cuda_in_bf16_when_a_gpu_supports_it_else_fp32_else_the_cpu():
    assert resolve("auto", cuda_available=False, cuda_count=0, bf16_supported=False) == Placement("cpu", "float32")
    assert resolve("auto", cuda_available=True, cuda_count=2, bf16_supported=True) == Placement("cuda", "bfloat16")
    assert resolve("auto", cuda_available=True, cuda_count=1, bf16_supported=False) == Placement("cuda", "float32")
    assert resolve(None, cuda_available=False, cuda_count=0, bf16_supported=False).device == "cpu"
    assert resolve(" CPU ", cuda_available=True, cuda_count=1, bf16_supported=True) == Placement("cpu", "float32")
    assert resolve("cuda:1", cuda_available=True, cuda_count=2, bf16_supported=True) == Placement("cuda:1", "bfloat16")
    assert str(Placement("cuda", "bfloat16")) == "cuda (bfloat16)"
    assert Placement("cuda", "bfloat16").torch_dtype is torch.bfloat16


@pytest.mark.parametrize("setting, gpus, words", [
    ("cuda", 0, ["'cuda'", "no CUDA GPU", "auto or cpu"]),  # asked for, not there: never a silent CPU
    ("cuda:2", 2, ["'cuda:2'", "2 GPU(s)"]),  # beyond the count
    ("cuda:x", 1, ["'cuda:x'", "cuda:N"]),
    ("gpu", 1, ["'gpu'", "auto", "cpu", "cuda", "cuda:N"]),  # a bad spelling lists the choices
])
def test_a_device_that_cannot_be_had_is_an_error_naming_it(setting, gpus, words):
    with pytest.raises(ValueError) as e:
        resolve(setting, cuda_available=gpus > 0, cuda_count=gpus, bf16_supported=True)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_this_machine_without_a_gpu_runs_on_the_cpu_in_fp32():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert resolve("auto") == Placement("cpu", "float32")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        resolve("cuda")


# -- the stages follow the setting ----------------------------------------------------------------

@pytest.fixture(autouse=True)
def no_prefect_ui(monkeypatch):
    """Outside a flow run Prefect would start a temporary API just to hold the UI tables (seconds);
    what is measured here does not go through them."""
    import tasks.evaluate
    import tasks.finetune

    monkeypatch.setattr(tasks.evaluate, "publish_table", lambda *a, **k: None)
    monkeypatch.setattr(tasks.evaluate, "publish_counts", lambda *a, **k: None)
    monkeypatch.setattr(tasks.finetune, "publish_counts", lambda *a, **k: None)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A tiny random model as a pretrain stage folder, a tokenize folder with a validation split,
    and suites of each kind, in a work directory."""
    from tasks import stage
    from tasks.config import EvaluateConfig, SuiteConfig
    from tokenizers import Tokenizer

    wd = tmp_path_factory.mktemp("device")
    folder = tiny_folder(wd / "src", seed=3)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))

    def model_files(out, key):
        for f in folder.iterdir():
            (out / f.name).write_bytes(f.read_bytes())
        return {"steps": 0}

    trained = stage.run_stage("pretrain", {"t": 1}, [], wd, model_files, [])
    text = "O sistema de arquivos guarda os dados do usuário. A rede local liga as máquinas da casa."
    ids = tok.encode(text * 4).ids

    def token_files(out, key):
        rows = np.array([ids[i : i + 33] for i in range(0, 99, 33)], dtype=np.int64)
        np.save(out / "val-00000.npy", rows)
        return {"val_bytes_per_token": len(text.encode()) / len(tok.encode(text).ids)}

    tokens = stage.run_stage("tokenize", {"t": 1}, [], wd, token_files, [])
    suites = wd / "suites"
    suites.mkdir()
    (suites / "t.jsonl").write_text(json.dumps({"text": text}) + "\n")
    (suites / "c.jsonl").write_text(json.dumps({"question": "O comando ls", "choices": ["lista", "apaga"],
                                                "answer": 0}) + "\n")
    (suites / "g.jsonl").write_text(json.dumps({"prompt": "O Linux é", "reference": "um sistema"}) + "\n")
    cfg = EvaluateConfig(prompts=["O Linux"], max_new_tokens=4, batch_size=2, suites=[
        SuiteConfig(name="t", kind="text", path=str(suites / "t.jsonl")),
        SuiteConfig(name="c", kind="choice", path=str(suites / "c.jsonl")),
        SuiteConfig(name="g", kind="generation", path=str(suites / "g.jsonl"), max_new_tokens=4, chat=True)])
    return SimpleNamespace(wd=wd, trained=trained, tokens=tokens, cfg=cfg, folder=folder, tokens_ids=ids)


def todays_metrics(e) -> dict:
    """What evaluation computed before the device setting: the folder loaded as saved, on the CPU."""
    from model.generate import load_folder
    from tasks.evaluate import evaluate_model, heldout_loss

    model, tok = load_folder(e.folder)
    loss, n = heldout_loss(model, e.tokens.files_matching("val-"), e.cfg.batch_size)
    return {"val_loss": loss, "val_tokens": n, **evaluate_model(model, tok, e.cfg)[0]}


def test_evaluate_on_the_cpu_gives_todays_metrics_and_the_device_is_not_in_the_key(evaluated, caplog):
    from tasks.evaluate import evaluate

    e = evaluated
    with caplog.at_level(logging.INFO, logger="forja.evaluate"):
        on_cpu = evaluate.fn(e.cfg, e.trained, e.tokens, str(e.wd), device="cpu")
    assert "evaluate: model on cpu (float32)" in caplog.text
    expected = todays_metrics(e)
    assert {k: on_cpu.stats[k] for k in expected} == expected  # exactly, not approximately
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="forja"):
        again = evaluate.fn(e.cfg, e.trained, e.tokens, str(e.wd), device="auto")
    assert again.key == on_cpu.key and "cache hit" in caplog.text and "model on" not in caplog.text


def test_bf16_compute_scores_close_to_fp32_with_float32_metrics(evaluated, tmp_path):
    """The path CUDA takes (weights and activations in bf16), run on the CPU: every metric is a
    finite float near the fp32 one, so nothing in the stage assumes fp32 weights."""
    from tasks.evaluate import build

    e = evaluated
    (tmp_path / "fp32").mkdir()
    (tmp_path / "bf16").mkdir()
    fp32 = build(e.cfg, e.trained, e.tokens, str(e.wd), tmp_path / "fp32")
    bf16 = build(e.cfg, e.trained, e.tokens, str(e.wd), tmp_path / "bf16", Placement("cpu", "bfloat16"))
    for k in ("val_loss", "t.perplexity", "c.accuracy_per_byte"):
        assert isinstance(bf16[k], float) and math.isfinite(bf16[k])
    assert abs(bf16["val_loss"] - fp32["val_loss"]) < 0.05 * fp32["val_loss"]
    assert abs(bf16["t.bits_per_byte"] - fp32["t.bits_per_byte"]) < 0.05 * fp32["t.bits_per_byte"]
    assert len(bf16["samples"]) == 1


def test_finetunings_comparison_on_the_cpu_gives_todays_scores(evaluated, caplog):
    """Base and fine-tuned model scored side by side, asked for the CPU: the numbers the CPU gave
    before the device setting (models loaded as saved), and the placement said once."""
    from model.generate import load_folder
    from model.train import evaluate_loss
    from tasks import finetune, stage
    from tasks.config import FinetuneConfig
    from tasks.evaluate import evaluate_model

    e = evaluated
    ids = np.array([e.tokens_ids[i : i + 17] for i in range(0, 51, 17)], dtype=np.int64)
    mask = np.ones_like(ids, dtype=bool)

    def data_files(out, key):
        (out / "base").mkdir()
        for f in tiny_folder(e.wd / "base-src", seed=4).iterdir():
            (out / "base" / f.name).write_bytes(f.read_bytes())
        finetune.write_split(out, "val", ids, mask)
        return {"base_model": "tiny/1"}

    data = stage.run_stage("sft-data", {"t": 1}, [], e.wd, data_files, [])
    cfg = FinetuneConfig(base_model="models:/tiny/1", data="unused.jsonl", suites=e.cfg.suites[:2])
    with caplog.at_level(logging.INFO, logger="forja"):
        m = finetune.compare.fn(cfg, data, e.trained, str(e.wd), {}, device="cpu")
    assert caplog.text.count("finetune-compare: model on cpu (float32)") == 1
    for who, folder in (("base", data.path("base")), ("finetuned", e.folder)):
        model, tok = load_folder(folder)
        want = evaluate_model(model, tok, list(cfg.suites))[0]
        want["val_loss"] = evaluate_loss(model, ids, 8, 1, "cpu", mask)
        got = {r["metric"]: r[who] for r in m.stats["comparison"]}
        assert got == {k: round(v, 4) for k, v in want.items() if not k.endswith(".items")}
    assert m.stats["val_loss"] == want["val_loss"]


def test_the_gate_rescores_and_batch_generates_on_the_asked_device(evaluated, tmp_path):
    """The gate's re-scoring of a champion and batch inference, asked for the CPU, load there and
    give what the CPU gave before; asked for a GPU this machine lacks, they say so before any work."""
    import mlflow
    import pyarrow.parquet as pq

    from flows.batch import run_batch
    from model.generate import Sampling, generate_text
    from tasks import stage
    from tasks.evaluate import evaluate_model
    from tasks.models import registry, tracking
    from tasks.register import rescorer
    from tests.model.test_serving_bounds import register_tiny

    e = evaluated
    version = register_tiny(tmp_path, "tinyd", seed=0)
    client = mlflow.MlflowClient(tracking.tracking_uri(tmp_path))
    evaluated_manifest = stage.Manifest(stage="evaluate", key="k", folder=str(tmp_path), inputs={},
                                        config=e.cfg.model_dump(mode="json") | {"suites_sha256": {}},
                                        code_version="x", created_at=0, files=[], stats={})
    model, tok = registry.load_version(client, version)  # as saved, on the CPU: today's way
    assert next(model.parameters()).device.type == "cpu"
    want = evaluate_model(model, tok, e.cfg.suites[:1])[0]["t.bits_per_byte"]
    assert rescorer(evaluated_manifest, "t.bits_per_byte", str(e.wd), "cpu")(version) == want
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            rescorer(evaluated_manifest, "t.bits_per_byte", str(e.wd), "cuda")(version)

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("O Linux", "A rede")))
    sampling = {"max_new_tokens": 3, "temperature": 0}
    uri = tracking.tracking_uri(tmp_path)
    summary = run_batch(f"models:/tinyd/{version.version}", str(prompts), str(tmp_path / "out"), uri,
                        sampling=sampling, device="cpu")
    assert summary["device"] == "cpu (float32)"
    got = pq.read_table(tmp_path / "out" / "part-00000.parquet").column("output").to_pylist()
    assert got == generate_text(model, tok, ["O Linux", "A rede"], Sampling(**sampling))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'cuda:0'"):
            run_batch(f"models:/tinyd/{version.version}", str(prompts), str(tmp_path / "out2"), uri,
                      sampling=sampling, device="cuda:0")
        assert not (tmp_path / "out2" / "_JOB.json").exists()
