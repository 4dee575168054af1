"""Real DeepSpeed on the CPU (gloo, fp32)."""
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, models

from model import train as tr
from model.config import ModelConfig
from model.gpt import GPT

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@pytest.fixture
def dist_env(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")


def spec(tmp_path, **kw):
    rows = np.random.default_rng(0).integers(0, 300, size=(40, 33)).astype(np.uint16)
    col = pa.FixedSizeListArray.from_arrays(pa.array(rows.ravel()), 33)
    pq.write_table(pa.table({"tokens": col}), tmp_path / "train.parquet")
    Tokenizer(models.BPE()).save(str(tmp_path / "tok.json"))
    base = dict(model=dict(vocab_size=300, block_size=32, n_layer=2, n_head=2, n_kv_head=2, n_embd=32),
                train_files=[str(tmp_path / "train.parquet")], val_files=[str(tmp_path / "train.parquet")],
                tokenizer=str(tmp_path / "tok.json"), out_dir=str(tmp_path / "out"),
                checkpoint_dir=str(tmp_path / "ckpt"), micro_batch_size=4, warmup_steps=1, lr=1e-2,
                log_every=2, eval_every=4, eval_batches=2, checkpoint_every=4, threads=1)
    return tr.TrainSpec(**(base | kw))


def test_deepspeed_steps_lower_the_loss_on_a_repeated_batch(tmp_path, dist_env):
    s = spec(tmp_path, max_steps=10)
    torch.manual_seed(0)
    model = GPT(ModelConfig(**s.model))
    engine, device = tr.build_engine(model, s)
    assert type(engine).__name__ == "DeepSpeedEngine" and device == "cpu"
    x = torch.randint(0, 300, (4, 32))
    losses = []
    for _ in range(8):
        _, loss = engine(x, x)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.5


def test_train_writes_a_self_describing_folder_and_resumes(tmp_path, dist_env):
    s = spec(tmp_path, max_steps=6)
    summary = tr.train(s)
    out = tmp_path / "out"
    assert {"model.safetensors", "config.json", "tokenizer.json", "metrics.jsonl"} <= {p.name for p in out.iterdir()}
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4, 6]
    assert all(math.isfinite(m["train_loss"]) and m["tokens_per_s"] > 0 for m in metrics)
    assert "val_loss" in metrics[1] and summary["resumed_from"] == 0
    # a checkpoint was taken at step 4; a longer run picks up from there
    again = tr.train(spec(tmp_path, max_steps=8))
    assert again["resumed_from"] == 4


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    f = [tr.lr_factor(s, 10, 100, 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[-1] == pytest.approx(0.1, abs=1e-3)


def test_nonfinite_gradient_stops_cleanly_naming_the_layer(tmp_path, dist_env, monkeypatch):
    s = spec(tmp_path, max_steps=4)
    real_init = GPT.__init__

    def poisoned(self, cfg):
        real_init(self, cfg)
        with torch.no_grad():
            self.blocks[1].mlp.down.weight[0, 0] = float("inf")  # poisons the forward from block 1 on

    monkeypatch.setattr(tr.GPT, "__init__", poisoned)
    with pytest.raises(FloatingPointError) as e:
        tr.train(s)
    assert "step 0" in str(e.value) and "non-finite output in blocks.1.mlp.down" in str(e.value)
    assert (tmp_path / "ckpt" / "nonfinite-step-0").is_dir()


def test_gradient_overflow_names_the_first_parameter_in_backward_order():
    model = GPT(ModelConfig(vocab_size=50, block_size=8, n_layer=2, n_head=2, n_kv_head=2, n_embd=16))
    x = torch.randint(0, 50, (2, 8))
    _, loss = model(x, x)
    loss.backward()
    assert tr.first_nonfinite_grad(model) is None
    model.blocks[0].mlp.down.weight.grad[1, 2] = float("nan")
    assert tr.first_nonfinite_grad(model) == "blocks.0.mlp.down.weight"
    model.blocks[1].attn.qkv.weight.grad[0, 0] = float("inf")  # later in the forward: met first going back
    assert tr.first_nonfinite_grad(model) == "blocks.1.attn.qkv.weight"


def test_wsd_schedule_holds_the_peak_then_decays_linearly():
    f = [tr.lr_factor(s, 10, 100, 0.1, "wsd", 0.2) for s in range(100)]
    assert f[9] == 1.0 and all(x == 1.0 for x in f[10:80])
    assert f[80] == 1.0 and f[90] == pytest.approx(0.55) and f[99] == pytest.approx(0.1 + 0.9 / 20)
    assert all(a >= b for a, b in zip(f[80:], f[81:]))


def test_deepspeed_config_follows_the_settings(tmp_path):
    s = spec(tmp_path, zero_stage=2, grad_accum_steps=4, grad_clip=0.5)
    cfg = tr.deepspeed_config(s, torch.float32)
    assert cfg["zero_optimization"]["stage"] == 2 and cfg["gradient_accumulation_steps"] == 4
    assert cfg["gradient_clipping"] == 0.5 and not cfg["bf16"]["enabled"]
    assert tr.deepspeed_config(s, torch.bfloat16)["bf16"]["enabled"]


def test_a_preset_too_big_for_the_device_fails_before_training_with_a_suggestion(tmp_path, monkeypatch):
    from model import monitor
    from model.config import from_preset

    monkeypatch.setattr(monitor, "device_memory", lambda device: 16 * 2**30)
    cfg = from_preset("1b", 32000, 2048)
    s = spec(tmp_path, micro_batch_size=8)
    with pytest.raises(MemoryError) as e:
        tr.check_memory(cfg, s, "cpu", torch.float32, 1, "1b")
    msg = str(e.value)
    assert "1b" in msg and "GiB" in msg and "16.0 GiB is available" in msg
    assert "smaller pretrain.preset" in msg and "zero_stage" in msg and "micro_batch_size" in msg
    tr.check_memory(from_preset("tiny", 4096, 256), s, "cpu", torch.float32, 1, "tiny")  # fits: no error
    # ZeRO-3 over 8 ranks divides the states: the estimate per rank falls
    one = monitor.memory_estimate(cfg, 1, 0, 1, True)["states_bytes"]
    eight = monitor.memory_estimate(cfg, 1, 3, 8, True)["states_bytes"]
    assert eight == pytest.approx(one / 8)


def test_the_peak_mfu_is_measured_against_is_fixed_by_the_environment_or_measured(monkeypatch):
    """FORJA_PEAK_FLOPS fixes the per-rank peak (a measured one reads low on a busy machine, so MFU
    reads high); unset, a matmul is measured; a value that is not a positive number is refused naming it."""
    import torch

    from model import monitor

    monkeypatch.setenv("FORJA_PEAK_FLOPS", "3.5e11")
    assert monitor.peak_flops("cpu", torch.float32) == (3.5e11, "FORJA_PEAK_FLOPS")
    for bad in ("fast", "-1", "0", "inf"):
        monkeypatch.setenv("FORJA_PEAK_FLOPS", bad)
        with pytest.raises(ValueError, match=f"FORJA_PEAK_FLOPS='{bad}'.*unset it"):
            monitor.peak_flops("cpu", torch.float32)
    monkeypatch.delenv("FORJA_PEAK_FLOPS")
    peak, source = monitor.peak_flops("cpu", torch.float32)
    assert peak > 1e8 and source.startswith("CPU measured fp32 matmul")


def test_a_rank_that_logs_nothing_to_mlflow_imports_deepspeed_without_it_and_can_still_import_it():
    """model.train.import_deepspeed keeps DeepSpeed's autotuner from importing mlflow (1.6 s a
    process) in a rank without an MLflow run, and leaves mlflow importable afterwards (rank 0 of a
    run with MLFLOW_RUN_ID imports it as usual: the pipeline tests log through it)."""
    code = ("import sys; from model.train import import_deepspeed; import_deepspeed(); "
            "from deepspeed.autotuning import autotuner; print('mlflow' in sys.modules, autotuner.has_mlflow); "
            "import mlflow; print(mlflow.__name__)")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "RANK")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env | {"DS_ACCELERATOR": "cpu"},
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "False", "mlflow"], out.stderr[-2000:]


def test_a_training_run_builds_no_shared_memory_comm_op(tmp_path):
    """DeepSpeed's shm all-reduce op serves its inference only; building it cost a fresh machine a
    minute at its first run and left buffers in /dev/shm. A real one-rank run, with its own empty
    extensions folder (forja's kernels off, so nothing else compiles), trains and builds nothing."""
    s = spec(tmp_path, max_steps=2, log_every=1, eval_every=2, checkpoint_every=2)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(dataclasses.asdict(s)))
    port = tr.free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MLFLOW_RUN_ID")}
    env |= {"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "FORJA_FUSED_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-m", "model.train", "--master_port", str(port), str(spec_file)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "out" / "model.safetensors").exists()
    built = sorted(p.name for p in (tmp_path / "ext").rglob("*") if p.is_dir()) if (tmp_path / "ext").exists() else []
    assert not any(tr.SHM_COMM in name for name in built), built
    assert "shm_comm" not in out.stdout + out.stderr
