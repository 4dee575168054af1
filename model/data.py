"""Token sequences for training: packed rows read from the tokenize stage's shards."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch


def read_rows(files: list[Path]) -> np.ndarray:
    """All packed rows of the given Parquet shards as one (rows, seq_len + 1) array."""
    parts = []
    for f in files:
        col = pq.read_table(f, columns=["tokens"]).column("tokens").combine_chunks()
        width = col.type.list_size
        parts.append(col.values.to_numpy(zero_copy_only=False).reshape(-1, width))
    if not parts:
        raise ValueError("no token shards given")
    return np.concatenate(parts)


class Batches:
    """Random batches drawn as a pure function of (seed, step, micro-step).

    Because no iterator state exists, a run resumed at step s draws exactly the batches
    the uninterrupted run would have; each data-parallel rank takes a disjoint slice.
    """

    def __init__(self, rows: np.ndarray, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if len(rows) < batch_size * world:
            raise ValueError(
                f"only {len(rows)} training sequences for a global batch of {batch_size * world}: "
                "lower pretrain.micro_batch_size or add data"
            )
        self.rows, self.batch_size, self.seed, self.rank, self.world = rows, batch_size, seed, rank, world

    def get(self, step: int, micro: int = 0, device: str | torch.device = "cpu"):
        rng = np.random.default_rng([self.seed, step, micro])
        idx = rng.choice(len(self.rows), size=self.batch_size * self.world, replace=False)
        idx = np.sort(idx[self.rank * self.batch_size : (self.rank + 1) * self.batch_size])
        chunk = torch.from_numpy(self.rows[idx].astype(np.int64))
        return chunk[:, :-1].to(device), chunk[:, 1:].to(device)


def eval_batches(rows: np.ndarray, batch_size: int, max_batches: int, device="cpu"):
    """The first max_batches fixed batches of a held-out split, in order."""
    for i in range(0, min(len(rows), batch_size * max_batches), batch_size):
        chunk = torch.from_numpy(rows[i : i + batch_size].astype(np.int64))
        yield chunk[:, :-1].to(device), chunk[:, 1:].to(device)
