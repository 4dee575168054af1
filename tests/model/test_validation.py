"""The validation loss (model.train.evaluate_loss): the mean over the targets of the same held-out
rows however many ranks share them, and ranks whose share runs out still run as many forward
passes as the others (ZeRO 3 gathers weights in each: a rank that stopped early would hang them)."""
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from model.config import ModelConfig
from model.data import targets
from model.gpt import GPT
from model.train import evaluate_loss, free_port

ASKED = (3, 3)  # batches of 3, 3 of them: 9 rows asked, 7 held out; two ranks share 4 + 3


def held_out() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 64, size=(7, 17))
    mask = rng.random((7, 17)) < 0.5  # a fine-tuning mask: rows count different numbers of targets
    return rows, mask


def tiny() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_kv_head=2, n_embd=16))


def one_rank(rank: int, world: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    model, passes = tiny(), []
    model.register_forward_hook(lambda *_: passes.append(1))
    rows, mask = held_out()
    loss = evaluate_loss(model, rows, *ASKED, "cpu", mask, rank, world)
    results.put((rank, loss, len(passes)))
    torch.distributed.destroy_process_group()


def test_two_ranks_give_the_mean_over_every_target_and_run_as_many_passes_each():
    rows, mask = held_out()
    chunk = torch.from_numpy(rows)
    with torch.no_grad():  # one pass over all 7 rows: the mean per target
        whole = float(tiny()(chunk[:, :-1], targets(chunk, mask))[1])
    assert evaluate_loss(tiny(), rows, *ASKED, "cpu", mask) == pytest.approx(whole, rel=1e-6)

    ctx = mp.get_context("spawn")
    results, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=one_rank, args=(r, 2, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = sorted(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert [p.exitcode for p in procs] == [0, 0]
    assert [loss for _, loss, _ in got] == pytest.approx([whole, whole], rel=1e-6)
    # rank 0: rows 0-3 in batches of 3 and 1; rank 1: rows 4-6, then one pass that counts nothing
    assert [n for _, _, n in got] == [2, 2]
