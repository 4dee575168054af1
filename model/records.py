"""End-of-run bookkeeping that reads the weights at most once, whatever the number of ranks.

Every rank writes ranks/rank-N.json: the rows of its first batch (data-parallel ranks draw
disjoint data) and a digest of its final weights (they must end identical). Hashing every weight
on every rank read the whole model once per rank (about 4 GB each for the `1b` preset). Now:

- weights_sha256, on every rank: a sampled digest, each tensor's name, dtype, shape and SAMPLES
  elements evenly spaced through it (a few hundred KB for `1b`): enough to tell ranks that diverged
  or runs that differ, cheap enough for every rank;
- weights_full_sha256, on rank 0 only: every byte of every tensor, tensors sharing storage (tied
  embeddings) read once.

The bytes are hashed where they lie (a view of each tensor's memory, no float copy), so a digest
reads each byte it covers once; Digest counts them, which the tests use to bound the reads.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

SAMPLES = 64  # elements per tensor in the sampled digest


class Digest:
    """sha256 that counts the bytes it is given (the reads a digest costs)."""

    def __init__(self):
        self.h, self.bytes_read = hashlib.sha256(), 0

    def update(self, data) -> None:
        view = memoryview(data)
        self.bytes_read += view.nbytes
        self.h.update(view)

    def header(self, name: str, t: torch.Tensor) -> None:
        self.h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())  # metadata: not the weights' bytes

    def alias(self, first: str) -> None:
        self.h.update(f"alias of {first}\n".encode())

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def _bytes(t: torch.Tensor) -> memoryview:
    """The tensor's elements as raw bytes, without a copy when it is contiguous on the CPU."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy())


def full_digest(state: dict[str, torch.Tensor], digest: Digest | None = None) -> Digest:
    """Every tensor's bytes in name order; a storage shared by several names (tied weights) is read
    once and the later names hash as aliases of the first."""
    d = digest or Digest()
    seen: dict[tuple, str] = {}
    for name, t in sorted(state.items()):
        d.header(name, t)
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            d.alias(seen[key])
            continue
        seen[key] = name
        d.update(_bytes(t))
    return d


def sampled_digest(state: dict[str, torch.Tensor], samples: int = SAMPLES, digest: Digest | None = None) -> Digest:
    """Each tensor's name, dtype, shape and `samples` elements evenly spaced through it (all of a
    smaller one): the same on data-parallel ranks that end identical, for a few bytes per tensor."""
    d = digest or Digest()
    for name, t in sorted(state.items()):
        d.header(name, t)
        flat = t.detach().reshape(-1)
        if flat.numel() > samples:
            flat = flat[torch.arange(samples, device=flat.device) * (flat.numel() - 1) // (samples - 1)]
        d.update(_bytes(flat))
    return d


def rank_record(state: dict[str, torch.Tensor], first_rows: list[int], rank: int,
                digest: type[Digest] = Digest) -> tuple[dict, int]:
    """(the record of this rank, the bytes of weights it read): the sampled digest everywhere, the
    full one on rank 0 only. digest: the hasher (a test's may count without hashing)."""
    sampled = sampled_digest(state, digest=digest())
    record = {"rank": rank, "weights_sha256": sampled.hexdigest(), "first_batch_rows": first_rows}
    read = sampled.bytes_read
    if rank == 0:
        full = full_digest(state, digest=digest())
        record["weights_full_sha256"] = full.hexdigest()
        read += full.bytes_read
    return record, read


def write_rank_record(model: torch.nn.Module, batches, position: int, out_dir: Path, rank: int) -> int:
    """ranks/rank-N.json for this rank (see the module docstring); returns the bytes of weights read."""
    record, read = rank_record(model.state_dict(), batches.indices(position).tolist(), rank)
    folder = Path(out_dir) / "ranks"
    folder.mkdir(exist_ok=True)
    (folder / f"rank-{rank}.json").write_text(json.dumps(record))
    return read
