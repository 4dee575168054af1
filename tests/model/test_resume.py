"""Resume that loses nothing, checked on real training processes (DeepSpeed, CPU, fp32).

Each test starts `python -m model.train` (or the deepspeed launcher) as a child process,
kills it with SIGKILL where FORJA_FAULT says, starts it again and compares with a run
that was never interrupted.
"""
import builtins
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models

from model import checkpoint
from model import train as tr

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def make_spec(tmp_path: Path, name: str, n_rows: int = 64, **kw) -> Path:
    data = tmp_path / "data"
    if not data.exists():
        data.mkdir()
        rows = np.random.default_rng(0).integers(0, 300, size=(n_rows, 33)).astype(np.uint16)
        np.save(data / "train.npy", rows)
        np.save(data / "val.npy", rows[:8])
        Tokenizer(models.BPE()).save(str(data / "tok.json"))
    base = dict(model=dict(vocab_size=300, block_size=32, n_layer=2, n_head=2, n_kv_head=2, n_embd=32),
                train_files=[str(data / "train-00000.parquet")], val_files=[str(data / "val-00000.parquet")],
                tokenizer=str(data / "tok.json"), out_dir=str(tmp_path / name / "out"),
                checkpoint_dir=str(tmp_path / name / "ckpt"), micro_batch_size=4, warmup_steps=2, lr=1e-2,
                max_steps=12, log_every=1, eval_every=100, eval_batches=1, checkpoint_every=3, threads=1,
                data_key="tokens-v1")
    spec = tr.TrainSpec(**(base | kw))
    path = tmp_path / f"{name}-spec-{len(list(tmp_path.glob(name + '-spec-*')))}.json"
    path.write_text(json.dumps(asdict(spec)))
    return path


def run_env() -> dict:
    """The environment of a training child: one CPU thread, no inherited rank variables."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return env | {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run(spec: Path, fault: str | None = None, launcher_procs: int = 0) -> subprocess.CompletedProcess:
    env = run_env()
    if fault:
        env["FORJA_FAULT"] = fault
    cmd = [sys.executable, "-m", "model.train", str(spec)]
    if launcher_procs:  # the command the pretrain task runs
        from tasks.config import PretrainConfig
        from tasks.pretrain import launch_command

        cmd = launch_command(PretrainConfig(num_gpus=launcher_procs), spec)
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def losses(folder: Path, name: str = "train_loss") -> dict[int, float]:
    rows = [json.loads(x) for x in (folder / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[name] for r in rows if name in r}


_REFERENCE: list = []


def reference_run(tmp_path_factory) -> tuple[Path, dict[int, float]]:
    """An uninterrupted 12-step run (checkpoints kept at 6 and 9; per-layer gradient norms every 3
    steps), made once per session and shared with tests/model/test_train_faults.py: (its folder's
    parent, its losses)."""
    if not _REFERENCE:
        tmp = tmp_path_factory.mktemp("resume")
        done = run(make_spec(tmp, "ref", grad_norms_every=3))
        assert done.returncode == 0, done.stdout[-3000:]
        _REFERENCE.append((tmp, losses(tmp / "ref")))
    return _REFERENCE[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_run(tmp_path_factory)


@pytest.mark.parametrize("fault", ["step:5", "step:10", "checkpoint-files-written:6"])
def test_sigkill_then_rerun_gives_bit_identical_losses(reference, fault):
    tmp, expected = reference
    name = "kill-" + fault.replace(":", "-")
    killed = run(make_spec(tmp, name), fault=fault)
    assert killed.returncode == -9, killed.stdout[-2000:]
    resumed = run(make_spec(tmp, name))
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    kill_step = int(fault.split(":")[1])
    last_complete = (kill_step - 1) // 3 * 3 if fault.startswith("checkpoint") else kill_step // 3 * 3
    assert "resumed from" in resumed.stdout and f"at step {last_complete}" in resumed.stdout
    if fault.startswith("checkpoint"):  # killed between DeepSpeed's files and the commit marker
        assert f"step-{kill_step} skipped: no commit marker" in resumed.stdout
    assert losses(tmp / name) == expected  # every step 1..12, exactly (floats compared bit for bit)
    assert len(list((tmp / name / "ckpt").glob("step-*"))) == 2  # two kept, the interrupted one pruned


def test_truncated_newest_checkpoint_falls_back_to_the_previous(reference):
    tmp, expected = reference
    first = run(make_spec(tmp, "trunc"), fault="step:8")  # complete checkpoints at 3 and 6
    assert first.returncode == -9, first.stdout[-2000:]
    newest = tmp / "trunc" / "ckpt" / "step-6"
    victim = max((p for p in newest.rglob("*.pt")), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    metrics = tmp / "trunc" / "ckpt" / "metrics.jsonl"
    with open(metrics, "a") as f:  # what a crash in the middle of writing step 8's line leaves
        f.write('{"step": 8, "train_loss": 5.7')
    again = run(make_spec(tmp, "trunc"))
    assert again.returncode == 0, again.stdout[-3000:]
    assert "step-6 skipped" in again.stdout and "bytes" in again.stdout and "at step 3" in again.stdout
    assert f"{metrics} line 8 is torn" in again.stdout + again.stderr  # dropped with a warning
    assert losses(tmp / "trunc") == expected
    # a corrupt line in the middle is no crash artefact: an error naming the file and the line
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines[:4] + ['{"step": 5, "train_lo'] + lines[5:]) + "\n")
    corrupt = run(make_spec(tmp, "trunc"))
    assert corrupt.returncode != 0 and f"{metrics} line 5 is not JSON" in corrupt.stderr, corrupt.stderr[-3000:]


class Planted:
    """Unpickling this creates the marker file: what an attacker's payload would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


@pytest.mark.fault
def test_when_no_checkpoint_loads_training_stops_and_keeps_the_metrics(reference):
    """Every checkpoint corrupt (one truncated, one a planted pickle): an error naming each one and why,
    never a silent restart at step 0, never the pickle run."""
    tmp, _ = reference
    spec = make_spec(tmp, "allbad")
    ckpt = tmp / "allbad" / "ckpt"
    shutil.copytree(tmp / "ref" / "ckpt", ckpt)
    (newest,) = (ckpt / "step-9").glob("*.pt")
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated: caught by the sizes in COMMIT.json
    # A pickle planted in the older one, its size recorded in COMMIT.json as an attacker who can write
    # the folder would: caught only when loading, and it must never run (torch.load weights_only).
    (older,) = (ckpt / "step-6").glob("*.pt")
    marker = tmp / "allbad" / "planted-pickle-ran"
    torch.save({"module": Planted(marker)}, older)
    commit = json.loads((ckpt / "step-6" / checkpoint.MARKER).read_text())
    commit["files"][older.name] = older.stat().st_size
    (ckpt / "step-6" / checkpoint.MARKER).write_text(json.dumps(commit))
    before = (ckpt / "metrics.jsonl").read_bytes()
    failed = run(spec)
    assert not marker.exists(), "the pickle planted in a checkpoint was executed"
    assert failed.returncode != 0, failed.stdout[-3000:]
    err = failed.stderr
    assert "NoCheckpointLoads" in err and str(ckpt) in err, err[-3000:]
    assert "step-9: mp_rank_00_model_states.pt is 1000 bytes" in err and "step-6: " in err
    assert "Weights only load failed" in err, err[-3000:]
    assert "pretrain.run_name" in err and "delete" in err
    assert "resumed" not in failed.stdout and "step      1" not in failed.stdout  # no training at all
    assert (ckpt / "metrics.jsonl").read_bytes() == before


def test_changed_model_or_data_against_the_checkpoint_is_a_hard_error(reference):
    tmp, _ = reference
    assert run(make_spec(tmp, "change", max_steps=3, checkpoint_every=2)).returncode == 0
    wider = run(make_spec(tmp, "change", max_steps=6, checkpoint_every=2,
                          model=dict(vocab_size=300, block_size=32, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)))
    assert wider.returncode != 0 and "CheckpointMismatch" in wider.stdout + wider.stderr
    assert "model.n_embd: checkpoint 32, now 64" in wider.stdout + wider.stderr
    other_data = run(make_spec(tmp, "change", max_steps=6, checkpoint_every=2, data_key="tokens-v2"))
    assert other_data.returncode != 0 and "data_key: checkpoint 'tokens-v1', now 'tokens-v2'" in other_data.stderr
    # the batch shape, seed and ZeRO stage decide which rows each step draws and the layout of
    # the checkpoint: a resume with other ones would silently train on other data (or start over)
    reshaped = run(make_spec(tmp, "change", max_steps=6, checkpoint_every=2, micro_batch_size=2, grad_accum_steps=2,
                             seed=7, zero_stage=1))
    out = reshaped.stdout + reshaped.stderr
    assert reshaped.returncode != 0 and "CheckpointMismatch" in out, out[-3000:]
    for field in ("batch.micro_batch_size: checkpoint 4, now 2", "batch.grad_accum_steps: checkpoint 1, now 2",
                  "seed: checkpoint 1337, now 7", "zero_stage: checkpoint 0, now 1"):
        assert field in out
    assert "step      3" not in reshaped.stdout  # refused before any step


def test_the_fingerprint_holds_the_batch_shape_world_size_and_seed(tmp_path):
    """What a resume must share with its checkpoint; the world size only varies under the launcher."""
    spec = tr.TrainSpec(**json.loads(make_spec(tmp_path, "fp").read_text()))
    one, two = tr.run_fingerprint(spec, world=1), tr.run_fingerprint(spec, world=2)
    assert one["batch"] == {"micro_batch_size": 4, "grad_accum_steps": 1, "seq_len": 32, "world_size": 1}
    assert one["seed"] == 1337 and one["zero_stage"] == 0 and one["data_key"] == "tokens-v1"
    assert checkpoint.mismatch(one, two) == ["batch.world_size: checkpoint 1, now 2"]


def test_two_ranks_under_the_launcher_draw_disjoint_data_end_identical_and_accumulate_exactly(tmp_path):
    """Two ranks at micro-batch 8 draw disjoint rows and end with identical weights; two ranks at
    micro-batch 4 x 2 accumulation steps draw the same 16 rows per step over both ranks (split
    otherwise between them) and log the same losses, the mean over both ranks' rows, over 6 steps
    past an epoch of 4: the same sums in another order (fp32, rel 1e-5)."""
    common = dict(max_steps=6, checkpoint_every=100)
    done = run(make_spec(tmp_path, "ddp", micro_batch_size=8, **common), launcher_procs=2)
    assert done.returncode == 0, done.stdout[-3000:]
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "ddp" / "out" / "ranks").glob("rank-*.json"))]
    assert [r["rank"] for r in records] == [0, 1]
    assert not set(records[0]["first_batch_rows"]) & set(records[1]["first_batch_rows"])
    assert records[0]["weights_sha256"] == records[1]["weights_sha256"]
    assert "world 2" in done.stdout
    accum = run(make_spec(tmp_path, "ddp-accum", micro_batch_size=4, grad_accum_steps=2, **common), launcher_procs=2)
    assert accum.returncode == 0, accum.stdout[-3000:]
    a, b = losses(tmp_path / "ddp"), losses(tmp_path / "ddp-accum")
    assert list(a) == list(range(1, 7)) and list(b) == list(a)
    assert [b[k] for k in a] == pytest.approx([a[k] for k in a], rel=1e-5)
    # validation: a global batch of the 8 held-out rows, shared out over the ranks on either split
    assert losses(tmp_path / "ddp-accum", "val_loss") == pytest.approx(losses(tmp_path / "ddp", "val_loss"), rel=1e-5)


def layer_norms(folder: Path, step: int) -> dict[str, float]:
    rows = [json.loads(x) for x in (folder / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    return {k: v for r in rows if r["step"] == step for k, v in r.items() if k.startswith("grad_norm.")}


@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_zero_stages_resume_exactly_and_write_whole_weights(reference, tmp_path, zero_stage):
    """ZeRO partitions optimizer state (1), gradients too (2) or parameters too (3): the same
    kill-and-resume holds, the saved model folder has the full weights, and the per-layer gradient
    norms, read from each rank's partitions, are ZeRO 0's (step 3: the weights after two warmup
    steps, the same in a 6- and a 12-step run; rel 1e-4, the sums run in another order)."""
    from model.generate import load_folder

    ref = run(make_spec(tmp_path, "ref", zero_stage=zero_stage, max_steps=6, grad_norms_every=3))
    assert ref.returncode == 0, ref.stdout[-3000:]
    zero0 = layer_norms(reference[0] / "ref", 3)
    assert sorted(zero0) == ["grad_norm.blocks.0", "grad_norm.blocks.1", "grad_norm.embed", "grad_norm.norm"]
    assert layer_norms(tmp_path / "ref", 3) == pytest.approx(zero0, rel=1e-4)
    assert run(make_spec(tmp_path, "z", zero_stage=zero_stage, max_steps=6), fault="step:5").returncode == -9
    again = run(make_spec(tmp_path, "z", zero_stage=zero_stage, max_steps=6))
    assert again.returncode == 0 and "at step 3" in again.stdout, again.stdout[-3000:]
    assert losses(tmp_path / "z") == losses(tmp_path / "ref")
    model, _ = load_folder(tmp_path / "z" / "out")
    assert model.embed.weight.shape == (300, 32) and model.embed.weight.abs().sum() > 0


def test_checkpoints_from_before_the_batch_fingerprint_still_resume(tmp_path):
    """A checkpoint committed before the batch shape, seed and ZeRO stage were recorded is not
    refused for lacking them; a field it does record is still compared."""
    spec = tr.TrainSpec(**json.loads(make_spec(tmp_path, "old").read_text()))
    now = tr.run_fingerprint(spec, world=1)
    tag = tmp_path / "step-3"
    tag.mkdir()
    old = {k: now[k] for k in ("model", "tokenizer_sha256", "data_key")}
    (tag / checkpoint.MARKER).write_text(json.dumps({"step": 3, "files": {}, "fingerprint": old}))
    checkpoint.refuse_mismatch(tag, now)  # no error
    (tag / checkpoint.MARKER).write_text(json.dumps({"step": 3, "files": {}, "fingerprint": old | {"seed": 1}}))
    with pytest.raises(checkpoint.CheckpointMismatch, match="seed: checkpoint 1, now 1337"):
        checkpoint.refuse_mismatch(tag, now)


def test_accumulating_two_micro_batches_of_4_trains_as_one_micro_batch_of_8(tmp_path):
    """grad_accum_steps 2 at micro-batch 4 draws the rows micro-batch 8 draws at every step, epochs
    included (68 rows: an epoch is 8 steps of 8 either way, not 17 micro-batches of 4), and gives the
    same losses and validation loss: the same mean over the same rows, summed in another order (fp32, rel 1e-5)."""
    common = dict(n_rows=68, max_steps=12, checkpoint_every=100, warmup_steps=2)  # 12 steps: past one epoch
    whole = run(make_spec(tmp_path, "whole", micro_batch_size=8, **common))
    accum = run(make_spec(tmp_path, "accum", micro_batch_size=4, grad_accum_steps=2, **common))
    assert whole.returncode == 0 and accum.returncode == 0, (whole.stdout + accum.stdout)[-3000:]
    a, b = losses(tmp_path / "whole"), losses(tmp_path / "accum")
    assert list(a) == list(range(1, 13)) and list(b) == list(a)
    assert [b[k] for k in a] == pytest.approx([a[k] for k in a], rel=1e-5)
    # validated on the same rows too (eval_batches counts global batches, not micro-batches)
    va, vb = losses(tmp_path / "whole", "val_loss"), losses(tmp_path / "accum", "val_loss")
    assert list(va) == list(vb) == [12] and vb[12] == pytest.approx(va[12], rel=1e-5)
