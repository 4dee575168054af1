"""Token sequences for training: packed rows read from the tokenize stage's shards."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch


def open_rows(files: list[Path]) -> np.ndarray:
    """The packed rows of a split, memory-mapped from its .npy copy when there is one.

    The tokenize stage writes each split both as Parquet (zstd, the exchanged form) and as
    an uncompressed .npy beside it; random batches from the memory map are many times
    faster than decoding Parquet row groups, and cost no RAM up front.
    """
    files = [Path(f) for f in files]
    npy = files[0].parent / (files[0].name.split("-")[0] + ".npy") if files else None
    if npy is not None and npy.exists():
        return np.load(npy, mmap_mode="r")
    return read_rows(files)


def open_mask(files: list[Path]) -> np.ndarray | None:
    """The loss mask beside a split's rows (fine-tuning data: <split>.mask.npy), or None.

    True marks tokens to learn; the targets of the others are ignored by the loss."""
    files = [Path(f) for f in files]
    if not files:
        return None
    mask = files[0].parent / (files[0].name.split("-")[0] + ".mask.npy")
    return np.load(mask, mmap_mode="r") if mask.exists() else None


def targets(chunk: torch.Tensor, mask: np.ndarray | None) -> torch.Tensor:
    """Next-token targets of rows; -100 (ignored by the loss) where the mask says not to learn."""
    y = chunk[:, 1:].clone()
    if mask is not None:
        y[~torch.from_numpy(np.asarray(mask, dtype=bool)[:, 1:])] = -100
    return y


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
    """Batches in a seeded shuffled order; batch k is a pure function of (seed, k).

    Each epoch visits every row once in the order of a permutation seeded by (seed, epoch);
    global batch k takes the next batch_size * world rows and each data-parallel rank a
    disjoint slice of them. The position is just k = step * grad_accum + micro, which the
    checkpoint holds, so a resumed run draws exactly the batches the uninterrupted run would.
    """

    def __init__(self, rows: np.ndarray, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 mask: np.ndarray | None = None):
        if len(rows) < batch_size * world:
            raise ValueError(
                f"only {len(rows)} training sequences for a global batch of {batch_size * world}: "
                "lower pretrain.micro_batch_size or add data"
            )
        self.rows, self.batch_size, self.seed, self.rank, self.world = rows, batch_size, seed, rank, world
        self.mask = mask
        self.per_epoch = len(rows) // (batch_size * world)  # the ragged tail of an epoch is skipped
        self._perm_epoch, self._perm = -1, None

    def indices(self, position: int) -> np.ndarray:
        """Row indices of this rank's slice of global batch number position."""
        epoch, k = divmod(position, self.per_epoch)
        if epoch != self._perm_epoch:
            self._perm, self._perm_epoch = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows)), epoch
        g = self.batch_size * self.world
        start = k * g + self.rank * self.batch_size
        return np.sort(self._perm[start : start + self.batch_size])  # sorted: friendlier to the memory map

    def get(self, position: int, device: str | torch.device = "cpu"):
        """(inputs, targets) of global batch number position, this rank's slice."""
        idx = self.indices(position)
        chunk = torch.from_numpy(np.asarray(self.rows[idx], dtype=np.int64))
        y = targets(chunk, None if self.mask is None else self.mask[idx])
        return chunk[:, :-1].to(device), y.to(device)


def eval_batches(rows: np.ndarray, batch_size: int, max_batches: int, device="cpu", mask: np.ndarray | None = None):
    """The first max_batches fixed batches of a held-out split, in order."""
    for i in range(0, min(len(rows), batch_size * max_batches), batch_size):
        chunk = torch.from_numpy(np.asarray(rows[i : i + batch_size], dtype=np.int64))
        y = targets(chunk, None if mask is None else mask[i : i + batch_size])
        yield chunk[:, :-1].to(device), y.to(device)
