"""Token sequences for training: packed rows read from the tokenize stage's shards."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

_SUFFIXES = (".mask.npy", ".npy", ".parquet")


def _stems(files: list[Path]) -> list[Path]:
    """The shards named by files (train-00003.parquet and train-00003.npy are one shard), in shard order."""
    stems = set()
    for f in files:
        suffix = next((s for s in _SUFFIXES if f.name.endswith(s)), "")
        stems.add(f.with_name(f.name[: len(f.name) - len(suffix)]))
    return sorted(stems, key=lambda p: (str(p.parent), p.name))


def _split_file(files: list[Path], suffix: str) -> Path:
    """The one-file-per-split copy beside the shards (train.npy, train.mask.npy): fine-tuning data and
    tokenize folders written before the stage was sharded."""
    return files[0].parent / (files[0].name.split("-")[0].split(".")[0] + suffix)


def open_rows(files: list[Path]):
    """The packed rows of a split as one 2-D (rows, seq_len + 1) array-like, memory-mapped.

    files name the split's shards (their .parquet and/or .npy files, in any order). Each shard's
    uncompressed .npy copy is memory-mapped and the shards are chained in shard order
    (ShardedRows), so nothing is read up front and memory stays flat whatever the corpus. Random
    batches from the memory maps are many times faster than decoding Parquet row groups. A
    single <split>.npy beside them (fine-tuning data, older tokenize folders) is used as it is;
    a shard with only Parquet is decoded once into an anonymous temporary memory map.
    """
    files = [Path(f) for f in files]
    if not files:
        raise ValueError("no token shards given")
    stems = _stems(files)
    npys = [s.with_name(s.name + ".npy") for s in stems]
    single = _split_file(files, ".npy")
    if not all(p.exists() for p in npys) and single.exists():
        return np.load(single, mmap_mode="r")
    parts = [np.load(p, mmap_mode="r") if p.exists() else parquet_rows(s.with_name(s.name + ".parquet"))
             for s, p in zip(stems, npys)]
    return parts[0] if len(parts) == 1 else ShardedRows(parts)


def open_mask(files: list[Path]):
    """The loss mask beside a split's rows (fine-tuning data: <split>.mask.npy, or one
    <shard>.mask.npy per shard), or None.

    True marks tokens to learn; the targets of the others are ignored by the loss."""
    files = [Path(f) for f in files]
    if not files:
        return None
    stems = _stems(files)
    masks = [s.with_name(s.name + ".mask.npy") for s in stems]
    if all(p.exists() for p in masks):
        parts = [np.load(p, mmap_mode="r") for p in masks]
        return parts[0] if len(parts) == 1 else ShardedRows(parts)
    mask = _split_file(files, ".mask.npy")
    return np.load(mask, mmap_mode="r") if mask.exists() else None


def targets(chunk: torch.Tensor, mask: np.ndarray | None) -> torch.Tensor:
    """Next-token targets of rows; -100 (ignored by the loss) where the mask says not to learn."""
    y = chunk[:, 1:].clone()
    if mask is not None:
        y[~torch.from_numpy(np.asarray(mask, dtype=bool)[:, 1:])] = -100
    return y


def parquet_rows(path: Path) -> np.ndarray:
    """A Parquet-only shard's rows, decoded batch by batch into a memory map of an anonymous temp
    file (deleted when the map goes), so even this path keeps memory flat."""
    if not path.exists():
        raise FileNotFoundError(f"token shard {path} does not exist (nor its .npy copy)")
    pf = pq.ParquetFile(path)
    field = pf.schema_arrow.field("tokens").type
    width, n = field.list_size, pf.metadata.num_rows
    dtype = field.value_type.to_pandas_dtype()
    if n == 0:
        return np.zeros((0, width), dtype)
    with tempfile.TemporaryFile() as f:  # the map keeps its own handle
        rows = np.memmap(f, dtype=dtype, mode="w+", shape=(n, width))
    at = 0
    for batch in pf.iter_batches(columns=["tokens"], batch_size=4096):
        flat = batch.column(0).values.to_numpy(zero_copy_only=False).reshape(-1, width)
        rows[at : at + len(flat)] = flat
        at += len(flat)
    return rows


def read_rows(files: list[Path]) -> np.ndarray:
    """All packed rows of the given Parquet shards as one (rows, seq_len + 1) array, in RAM
    (small splits, tests; training uses open_rows)."""
    parts = []
    for f in files:
        col = pq.read_table(f, columns=["tokens"]).column("tokens").combine_chunks()
        width = col.type.list_size
        parts.append(col.values.to_numpy(zero_copy_only=False).reshape(-1, width))
    if not parts:
        raise ValueError("no token shards given")
    return np.concatenate(parts)


class ShardedRows:
    """Several shards' rows read as one array, in shard order, without copying them together.

    Supports what the loader and its callers use on a rows array: len(), .shape, .dtype, an
    integer, a slice, an index array (fancy indexing: each shard's rows gathered from its own
    memory map) and np.asarray (which does build the whole array: only for small splits)."""

    ndim = 2

    def __init__(self, parts: list[np.ndarray]):
        widths = {p.shape[1] for p in parts}
        if len(widths) != 1 or len({p.dtype for p in parts}) != 1:
            raise ValueError(f"token shards disagree on row width or dtype ({sorted(widths)}): "
                             "they come from different tokenize runs")
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        self.dtype = parts[0].dtype
        self.shape = (int(self.offsets[-1]), widths.pop())

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None):
        out = np.concatenate([np.asarray(p) for p in self.parts])
        return out if dtype is None else out.astype(dtype, copy=False)

    def __getitem__(self, key):
        if isinstance(key, tuple):  # rows[idx, 1:] and the like: rows first, then the rest
            rows = self[key[0]]
            return rows[key[1:]] if isinstance(key[0], (int, np.integer)) else rows[(slice(None), *key[1:])]
        if isinstance(key, (int, np.integer)):
            i = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"row {key} out of range for {len(self)} rows")
            s = int(np.searchsorted(self.offsets, i, side="right")) - 1
            return self.parts[s][i - self.offsets[s]]
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                return self[np.arange(start, stop, step)]
            pieces = []
            for s, p in enumerate(self.parts):
                lo, hi = max(start, self.offsets[s]), min(stop, self.offsets[s + 1])
                if lo < hi:
                    pieces.append(p[lo - self.offsets[s] : hi - self.offsets[s]])
            return np.concatenate(pieces) if pieces else np.zeros((0, self.shape[1]), self.dtype)
        idx = np.asarray(key)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = np.where(idx < 0, idx + len(self), idx).astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        flat = idx.ravel()
        shard = np.searchsorted(self.offsets, flat, side="right") - 1
        out = np.empty((len(flat), self.shape[1]), self.dtype)
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = self.parts[s][flat[sel] - self.offsets[s]]
        return out.reshape(*idx.shape, self.shape[1])


class Batches:
    """Batches in a seeded shuffled order; batch k is a pure function of (seed, k).

    Each epoch visits every row once in the order of a permutation seeded by (seed, epoch);
    global batch k takes the next batch_size * world rows and each data-parallel rank a
    disjoint slice of them. The position is just k = step * grad_accum + micro, which the
    checkpoint holds, so a resumed run draws exactly the batches the uninterrupted run would.
    A whole optimizer step takes the permutation's next batch_size * world * accum rows, however
    they are split over ranks and micro-batches, so a run resumed on another number of ranks with
    the same global batch draws the same rows at every step (model/reshard.py).
    """

    def __init__(self, rows: np.ndarray, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 mask: np.ndarray | None = None, accum: int = 1):
        if len(rows) < batch_size * world * accum:
            raise ValueError(
                f"only {len(rows)} training sequences for a global batch of {batch_size * world * accum} "
                f"(micro-batch {batch_size} x {world} rank(s) x {accum} accumulation step(s)): lower "
                "pretrain.micro_batch_size or grad_accum_steps, or add data"
            )
        self.rows, self.batch_size, self.seed, self.rank, self.world = rows, batch_size, seed, rank, world
        self.mask = mask
        # Positions per epoch, in whole optimizer steps (accum micro-batches each): an epoch ends where it
        # would with one accum-times-larger micro-batch, so accumulating draws the same rows per step. The
        # ragged tail of an epoch is skipped.
        self.per_epoch = len(rows) // (batch_size * world * accum) * accum
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
