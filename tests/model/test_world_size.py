"""Resume on another number of ranks: the same global batch draws the same rows at every step, and
a ZeRO checkpoint partitioned over the old ranks loads through DeepSpeed's universal format.

The training tests start real DeepSpeed runs (CPU, gloo, fp32) like tests/model/test_resume.py,
whose helpers they use: two ranks as two processes, one rank alone.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model import checkpoint, reshard
from model.data import Batches
from model.generate import load_folder
from model.train import free_port
from tests.model.test_resume import ROOT, make_spec, run, run_env

SPLITS = [(4, 2, 1), (4, 1, 2), (2, 2, 2), (8, 1, 1), (2, 4, 1), (1, 2, 4)]  # (micro, ranks, accum): 8 a step


def step_rows(rows: int, micro: int, world: int, accum: int, step: int, seed: int = 5) -> list[int]:
    """Every row a whole optimizer step draws, over all ranks and micro-batches (sorted, repeats kept)."""
    data = np.zeros((rows, 3))
    drawn = [Batches(data, micro, seed, rank, world, accum=accum).indices(step * accum + m)
             for rank in range(world) for m in range(accum)]
    return sorted(np.concatenate(drawn).tolist())


def test_every_split_of_a_global_batch_draws_the_same_rows_each_step():
    """68 rows, 8 a step: an epoch is 8 steps (4 rows left over) for every split; across epochs too."""
    for step in range(20):
        expected = step_rows(68, 8, 1, 1, step)
        assert len(set(expected)) == 8
        for split in SPLITS:
            assert step_rows(68, *split, step) == expected, (split, step)


def test_switching_the_split_mid_epoch_neither_repeats_nor_skips_a_row():
    for before, after in [((4, 2, 1), (4, 1, 2)), ((4, 1, 2), (2, 4, 1)), ((1, 2, 4), (8, 1, 1))]:
        for switch in (1, 3, 7):
            seen = [r for s in range(8) for r in step_rows(68, *(before if s < switch else after), s)]
            assert len(seen) == len(set(seen)) == 64, (before, after, switch)  # one epoch: each row once


def fingerprint(micro: int, accum: int, world: int, **kw) -> dict:
    return {"model": {"n_embd": 32}, "tokenizer_sha256": "t", "data_key": "d", "seed": 1, "zero_stage": 1,
            "batch": {"micro_batch_size": micro, "grad_accum_steps": accum, "seq_len": 32, "world_size": world}} | kw


def committed_tag(tmp_path: Path, fp: dict) -> Path:
    tag = tmp_path / "step-3"
    tag.mkdir(exist_ok=True)
    (tag / checkpoint.MARKER).write_text(json.dumps({"step": 3, "files": {}, "fingerprint": fp}))
    return tag


def test_another_world_size_with_the_same_global_batch_resumes_another_global_batch_is_refused(tmp_path):
    tag = committed_tag(tmp_path, fingerprint(4, 1, 2))
    for same in (fingerprint(4, 2, 1), fingerprint(2, 1, 4), fingerprint(1, 8, 1)):
        checkpoint.refuse_mismatch(tag, same)  # 8 a step either way: no error
    with pytest.raises(checkpoint.CheckpointMismatch) as bad:
        checkpoint.refuse_mismatch(tag, fingerprint(4, 1, 1))
    msg = str(bad.value)
    assert "batch.world_size: checkpoint 2, now 1" in msg and "global batch changed from 8" in msg
    assert "set pretrain.global_batch_size = 8" in msg
    with pytest.raises(checkpoint.CheckpointMismatch, match="seed: checkpoint 1, now 2"):  # the rest still counts
        checkpoint.refuse_mismatch(tag, fingerprint(4, 2, 1, seed=2))
    assert reshard.needs_universal(fingerprint(4, 1, 2), fingerprint(4, 2, 1))
    assert not reshard.needs_universal(fingerprint(4, 1, 2, zero_stage=0), fingerprint(4, 2, 1, zero_stage=0))
    assert not reshard.needs_universal(fingerprint(4, 1, 2), fingerprint(8, 1, 2))


def drawn(folder: Path) -> dict:
    """Each rank's first rows after its resume (ranks/rank-N.json)."""
    return {p.name: json.loads(p.read_text())["first_batch_rows"] for p in sorted((folder / "out" / "ranks").glob("*"))}


def metrics(folder: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (folder / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}


def run_two(spec: Path) -> subprocess.CompletedProcess:
    """Two ranks as two processes given the variables the deepspeed launcher sets: the same
    torch.distributed world without the launcher's start-up, about 6-10 s a run here (the launcher
    itself runs in tests/model/test_resume.py and test_multinode.py)."""
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "model.train", str(spec)], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=run_env() | {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
             for r in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    return subprocess.CompletedProcess(procs[0].args, max(p.returncode for p in procs), outs[0] + outs[1], "")


@pytest.mark.parametrize("zero_stage", [1, 0])
def test_one_rank_to_two_and_back_continues_the_run(tmp_path, zero_stage):
    """Global batch 8: one rank x micro-batch 4 x 2 accumulation steps, or two ranks x micro-batch 4.
    A one-rank run (checkpoints at 2 and 4) is resumed from step 2 on two ranks, which checkpoint at
    4; that is resumed on one rank again. ZeRO 1 converts each partitioned checkpoint to the universal
    format once; ZeRO 0's state is whole. The switched runs must train like the uninterrupted one: the
    same rows each step, so the same loss at every step on either layout and the same validation
    loss and weights at the end (fp32 sums of the same rows, possibly in another order: rel 1e-5;
    observed here: bit-identical)."""
    kw = dict(zero_stage=zero_stage, max_steps=6, checkpoint_every=2, keep_checkpoints=2, micro_batch_size=4)
    ref = run(make_spec(tmp_path, "one", grad_accum_steps=2, **kw))
    assert ref.returncode == 0, ref.stdout[-3000:]
    shutil.copytree(tmp_path / "one" / "ckpt", tmp_path / "up" / "ckpt", ignore=shutil.ignore_patterns("step-4"))
    up = run_two(make_spec(tmp_path, "up", **kw))
    assert up.returncode == 0 and "at step 2" in up.stdout, up.stdout[-3000:] + up.stderr[-3000:]
    shutil.copytree(tmp_path / "up" / "ckpt", tmp_path / "down" / "ckpt")
    if zero_stage:  # what a conversion killed mid-way leaves
        killed = tmp_path / "down" / "ckpt" / "step-4" / f".{reshard.UNIVERSAL}.tmp"
        (killed / "zero").mkdir(parents=True)
        (killed / "zero" / "optimizer_state.pt").write_bytes(b"half")
    down = run(make_spec(tmp_path, "down", grad_accum_steps=2, **kw))
    assert down.returncode == 0 and "at step 4" in down.stdout, down.stdout[-3000:] + down.stderr[-3000:]
    for name, tag in (("up", "step-2"), ("down", "step-4")):  # converted once, in place, nothing half-made
        folder = tmp_path / name / "ckpt" / tag
        assert (folder / reshard.UNIVERSAL).is_dir() == bool(zero_stage)
        assert not list(folder.glob(".*tmp")) and checkpoint.problem(folder) is None  # the half one redone
    # no row repeated or skipped: after each switch, the rows of the resumed step as the new layout splits them
    rows = np.zeros((64, 3))
    assert drawn(tmp_path / "up") == {f"rank-{r}.json": Batches(rows, 4, 1337, r, 2).indices(2).tolist()
                                      for r in (0, 1)}
    assert drawn(tmp_path / "down") == {"rank-0.json": Batches(rows, 4, 1337, accum=2).indices(4 * 2).tolist()}
    expected = metrics(tmp_path / "one")
    for name in ("up", "down"):  # up: steps 3-6 on two ranks (the mean loss over them); down: 5-6 on one again
        got = metrics(tmp_path / name)
        assert list(got) == list(expected) == list(range(1, 7)), name
        assert [got[s]["train_loss"] for s in got] == pytest.approx([expected[s]["train_loss"] for s in expected],
                                                                    rel=1e-5), name
        assert got[6]["val_loss"] == pytest.approx(expected[6]["val_loss"], rel=1e-5), name
    want = load_folder(tmp_path / "one" / "out")[0].state_dict()
    for name in ("up", "down"):
        got = load_folder(tmp_path / name / "out")[0].state_dict()
        assert all(torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-6) for k in want), name


def test_the_pretrain_stage_is_named_by_its_global_batch_not_by_where_its_ranks_run(tmp_path):
    """The stage key (and so the checkpoint folder a rerun looks in) is the same for one rank x
    accumulation 2 and two ranks, and for a hostfile's ranks with global_batch_size kept; another
    global batch is another run. A hostfile's slots decide grad_accum_steps."""
    from tasks.config import PretrainConfig
    from tasks.pretrain import stage_key_config

    hosts = tmp_path / "hostfile"
    hosts.write_text("gpu1 slots=2\n# a comment\ngpu2 slots=2\n")
    one = PretrainConfig(micro_batch_size=4, grad_accum_steps=2)
    assert stage_key_config(one) == stage_key_config(PretrainConfig(micro_batch_size=4, num_gpus=2))
    keep = PretrainConfig(micro_batch_size=4, global_batch_size=16, hostfile=str(hosts), ssh_port=2222)
    assert stage_key_config(keep) == stage_key_config(PretrainConfig(micro_batch_size=4, grad_accum_steps=4))
    assert stage_key_config(keep)["global_batch"] == 16  # 4 slots x micro 4, accumulation 1
    lost = PretrainConfig(micro_batch_size=4, global_batch_size=16, hostfile=str(hosts), exclude="gpu2")
    assert stage_key_config(lost) == stage_key_config(keep)  # a node lost: two ranks accumulate 2
    assert stage_key_config(PretrainConfig(micro_batch_size=4)) != stage_key_config(one)  # 4 rows a step, not 8
    with pytest.raises(ValueError, match="slots of pretrain.hostfile"):
        stage_key_config(PretrainConfig(micro_batch_size=4, global_batch_size=12, hostfile=str(hosts)))
