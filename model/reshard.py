"""Resuming a checkpoint on another number of ranks (a lost node, a bigger allocation).

Which rows a step draws depends on the global batch (micro_batch_size x grad_accum_steps x
ranks), the sequence length and the seed, not on how the batch is split (model/data.py,
Batches): with the global batch unchanged, every step draws the same rows on 1 rank or 8, so
a resume on another world size neither repeats nor skips a sample. pretrain.global_batch_size
keeps it fixed across rank counts (grad_accum_steps is derived from it).

The checkpoint's layout may still need converting. ZeRO 0 keeps the whole optimizer state in
one file that any number of ranks loads. ZeRO 1 and 2 (and 3) partition it over the ranks
that saved it, so it is converted once into DeepSpeed's universal checkpoint format
(deepspeed.checkpoint.ds_to_universal: every parameter's weights and optimizer moments whole,
under step-N/universal/), which the engine loads at any world size with
{"checkpoint": {"load_universal": true}}. The conversion runs on rank 0 into a temporary folder
renamed into place when complete, so a kill mid-way never leaves a half-converted checkpoint:
the next resume converts again. Both the conversion and the universal load read only tensors
and DeepSpeed's own state classes (torch.load with weights_only=True), as every other load does.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
from pathlib import Path

UNIVERSAL = "universal"  # the converted copy, inside the step-N folder it was made from (pruned with it)
LAYOUT = ("micro_batch_size", "grad_accum_steps", "world_size")  # how a global batch is split


def global_batch(fingerprint: dict) -> int | None:
    """Sequences per optimizer step over every rank, from a fingerprint's batch (None if not recorded)."""
    batch = fingerprint.get("batch")
    if not isinstance(batch, dict) or any(not isinstance(batch.get(k), int) for k in LAYOUT):
        return None
    return batch["micro_batch_size"] * batch["grad_accum_steps"] * batch["world_size"]


def world_size(fingerprint: dict) -> int | None:
    batch = fingerprint.get("batch")
    return batch.get("world_size") if isinstance(batch, dict) else None


def without_layout(fingerprint: dict) -> dict:
    """The fingerprint with the split of the batch replaced by the global batch: what a resume on
    another world size must still share with its checkpoint."""
    batch = fingerprint.get("batch")
    if not isinstance(batch, dict):
        return fingerprint
    kept = {k: v for k, v in batch.items() if k not in LAYOUT}
    return fingerprint | {"batch": kept | {"global_batch_size": global_batch(fingerprint)}}


def relayout_only(saved: dict, current: dict) -> bool:
    """Whether the checkpoint's run differs from this one only in how the same global batch is split
    (ranks, micro-batch, accumulation): such a resume draws the same rows at every step."""
    return global_batch(saved) is not None and without_layout(saved) == without_layout(current)


def batch_advice(saved: dict, current: dict) -> str:
    """What to set when the global batch changed, or '' when it did not (or was not recorded)."""
    old, new = global_batch(saved), global_batch(current)
    if old is None or new is None or old == new:
        return ""
    b = saved["batch"]
    return (f" The global batch changed from {old} sequences per step (micro_batch_size {b['micro_batch_size']} x "
            f"grad_accum_steps {b['grad_accum_steps']} x {b['world_size']} rank(s)) to {new}: steps would draw other "
            f"rows than the checkpoint's run did. To resume on another number of ranks, set "
            f"pretrain.global_batch_size = {old} (grad_accum_steps is then derived for the ranks at hand).")


def needs_universal(saved: dict, current: dict) -> bool:
    """Whether loading needs the universal format: the world size changed and ZeRO partitioned the
    optimizer state over the old ranks (stages 1-3). ZeRO 0's state is whole in every checkpoint."""
    old, new = world_size(saved), world_size(current)
    return old is not None and new is not None and old != new and bool(current.get("zero_stage"))


@contextlib.contextmanager
def safe_torch_load():
    """Within it, torch.load reads with weights_only=True and DeepSpeed's own state classes allowed,
    whatever its caller asks: DeepSpeed's converter and universal loader ask to unpickle anything."""
    import torch

    from model.checkpoint import _deepspeed_state_classes

    real, allowed = torch.load, _deepspeed_state_classes()

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(allowed):
            return real(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = real


def _fsync_tree(folder: Path) -> None:
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            with open(p, "rb+") as f:
                os.fsync(f.fileno())


def convert(tag_dir: Path) -> Path:
    """step-N/universal/, made once from the DeepSpeed checkpoint in tag_dir: written to a temporary
    folder and renamed when complete (a leftover temporary folder from a killed conversion is redone)."""
    from deepspeed.checkpoint import ds_to_universal

    out = tag_dir / UNIVERSAL
    if out.is_dir():
        return out
    tmp = tag_dir / f".{UNIVERSAL}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(tag_dir), output_folder=str(tmp), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    try:
        with safe_torch_load():
            ds_to_universal.main(args)
        (tag_dir / "latest_universal").unlink(missing_ok=True)  # the converter's pointer: tags are always named
        _fsync_tree(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fd = os.open(tag_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return out


def load(engine, ckpt_dir: Path, tag_dir: Path, saved: dict, current: dict):
    """engine.load_checkpoint of tag_dir, through its universal copy when the world size changed
    under ZeRO 1-3 (rank 0 converts, every rank waits for it). Returns (path, client state)."""
    if not needs_universal(saved, current):
        return engine.load_checkpoint(str(ckpt_dir), tag=tag_dir.name)
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    failure = None
    if rank == 0:
        print(f"{tag_dir.name} was saved by {world_size(saved)} rank(s), resuming on {world_size(current)}: "
              f"loading it through DeepSpeed's universal checkpoint ({tag_dir / UNIVERSAL})", flush=True)
        try:
            convert(tag_dir)
        except Exception as e:  # the other ranks must not wait for it forever: they pass the barrier too
            failure = e
    if dist.is_initialized():
        dist.barrier()
    if failure is not None:
        raise RuntimeError(f"converting {tag_dir} to a universal checkpoint failed: {type(failure).__name__}: "
                           f"{failure}") from failure
    if not (tag_dir / UNIVERSAL).is_dir():
        raise RuntimeError(f"rank 0 could not convert {tag_dir} to a universal checkpoint (see its log)")
    engine._config.load_universal_checkpoint = True  # read at load time only; the engine was built without it
    try:
        with safe_torch_load():
            return engine.load_checkpoint(str(tag_dir), tag=UNIVERSAL)
    finally:
        engine._config.load_universal_checkpoint = False
