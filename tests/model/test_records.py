"""End-of-run bookkeeping (model/records.py): rank 0 reads the weights once, the other ranks a
few samples, and identical ranks still agree."""
import json

import numpy as np
import torch

from model import records
from model.config import from_preset
from model.data import Batches
from model.gpt import GPT


class Counted(records.Digest):
    """Counts the bytes a digest is given without hashing them (a 1b state is ~5 GB)."""

    def update(self, data) -> None:
        self.bytes_read += memoryview(data).nbytes


def state_of(preset: str, vocab: int = 50304, block: int = 2048) -> dict[str, torch.Tensor]:
    """The preset's state dict as torch.empty tensors: shapes from a model built on the meta device;
    untouched memory costs nothing, and Counted never reads it."""
    with torch.device("meta"):
        model = GPT(from_preset(preset, vocab, block))
    shared: dict = {}
    return {k: shared.setdefault(id(v), torch.empty(v.shape, dtype=v.dtype))  # tied weights: one tensor
            for k, v in model.state_dict(keep_vars=True).items()}


def test_the_1b_end_of_run_record_reads_the_weights_at_most_once():
    state = state_of("1b")
    one_copy = sum(t.nbytes for t in state.values())
    assert one_copy > 3.5e9  # ~0.9B fp32 parameters at GPT-2's vocabulary: 3.6 GB
    _, rank0 = records.rank_record(state, [], 0, digest=Counted)
    _, rank1 = records.rank_record(state, [], 1, digest=Counted)
    samples = records.SAMPLES * 4 * len(state)  # the sampled digest: at most SAMPLES fp32 elements a tensor
    assert rank0 <= one_copy + samples  # once, plus the samples it shares with the other ranks (< 0.001 %)
    assert rank1 <= samples < 1e6  # before: every rank read one_copy
    print(f"1b: {one_copy / 1e9:.2f} GB of weights; rank 0 reads {rank0 / 1e9:.4f} GB, rank 1 {rank1 / 1e3:.1f} KB")


def test_tied_weights_are_read_once():
    state = state_of("gpt2-124m", vocab=4096, block=256)  # tie_embeddings: one tensor, two names
    assert len({t.data_ptr() for t in state.values()}) < len(state)
    distinct = sum(t.nbytes for t in {t.data_ptr(): t for t in state.values()}.values())
    assert records.full_digest(state, digest=Counted()).bytes_read == distinct


def test_identical_ranks_agree_and_a_changed_weight_is_seen(tmp_path):
    torch.manual_seed(0)
    model = GPT(from_preset("micro", 300, 32))
    batches = [Batches(np.zeros((64, 3)), 4, 1, rank, 2) for rank in (0, 1)]
    for rank in (0, 1):
        records.write_rank_record(model, batches[rank], 0, tmp_path, rank)
    r0, r1 = (json.loads((tmp_path / "ranks" / f"rank-{r}.json").read_text()) for r in (0, 1))
    assert r0["weights_sha256"] == r1["weights_sha256"] and "weights_full_sha256" not in r1
    assert len(r0["weights_full_sha256"]) == 64 and not set(r0["first_batch_rows"]) & set(r1["first_batch_rows"])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = (records.sampled_digest(state).hexdigest(), records.full_digest(state).hexdigest())
    kept = state["lm_head.weight"].view(-1)[0].item()
    state["lm_head.weight"].view(-1)[0] += 1  # the first element is always sampled
    assert records.sampled_digest(state).hexdigest() != before[0]
    state["lm_head.weight"].view(-1)[0] = kept
    assert records.sampled_digest(state).hexdigest() == before[0]
    state["blocks.0.attn.qkv.weight"].view(-1)[7] += 1  # not sampled: only the full digest sees it
    assert records.full_digest(state).hexdigest() != before[1]
