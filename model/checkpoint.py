"""Checkpoints that a kill at any moment cannot corrupt, and resume that refuses a mismatch.

A checkpoint is DeepSpeed's own folder `step-N/` (module, optimizer, scheduler, ZeRO
partitions) plus `COMMIT.json`, written last by rank 0 once every rank has finished its
files. COMMIT.json lists each file's size, and the run's fingerprint: the model config,
the tokenizer's sha256 and the data key. A folder without it was interrupted mid-save
and is ignored; one whose files do not match it (truncated, missing) is skipped with a
message, and the previous checkpoint is used. Loading goes through `torch.load(...,
weights_only=True)` with only DeepSpeed's own state classes allowed: nothing else is
unpickled.

Resume never starts over silently: when checkpoints were committed but none of them loads,
it stops with the reason for each. The fingerprint holds everything that decides which rows
a step draws and the checkpoint's layout (batch shape, world size, seed, ZeRO stage), so a
resume with other settings is refused, naming them; except another number of ranks with the
same global batch, which draws the same rows and loads through DeepSpeed's universal
checkpoint format (model/reshard.py). A save that fills the disk removes its
partial folder and says so; the previous checkpoint stays the one a rerun resumes from.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

MARKER = "COMMIT.json"
# Fingerprint fields that checkpoints written before them lack: not compared when absent there.
LATER_FIELDS = ("batch", "seed", "zero_stage")
FULL_BELOW = 1 << 20  # bytes free under which a failed write is taken for a full disk


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (also the stage manifests' file digest)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _step(tag: Path) -> int:
    try:
        return int(tag.name.removeprefix("step-"))
    except ValueError:
        return -1


def step_folders(ckpt_dir: Path) -> list[Path]:
    """step-N folders, newest first (committed or not)."""
    found = [p for p in Path(ckpt_dir).glob("step-*") if p.is_dir() and _step(p) >= 0]
    return sorted(found, key=_step, reverse=True)


def commit(tag_dir: Path, step: int, fingerprint: dict) -> None:
    """Write the commit marker after all files of the checkpoint are complete (rank 0 only)."""
    files = {str(p.relative_to(tag_dir)): p.stat().st_size
             for p in sorted(tag_dir.rglob("*")) if p.is_file() and p.name != MARKER}
    for name in files:  # the data must be on disk before the marker that vouches for it
        with open(tag_dir / name, "rb+") as f:
            os.fsync(f.fileno())
    tmp = tag_dir / f".{MARKER}.tmp"
    tmp.write_text(json.dumps({"step": step, "files": files, "fingerprint": fingerprint}, indent=2))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, tag_dir / MARKER)


def problem(tag_dir: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from, or None if it is complete."""
    marker = tag_dir / MARKER
    if not marker.exists():
        return "no commit marker (the save was interrupted)"
    try:
        info = json.loads(marker.read_text())
    except ValueError:
        return "unreadable commit marker"
    for name, size in info["files"].items():
        f = tag_dir / name
        if not f.exists():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} is {f.stat().st_size} bytes, {size} were written"
    return None


def fingerprint_of(tag_dir: Path) -> dict:
    return json.loads((tag_dir / MARKER).read_text())["fingerprint"]


def committed(tag_dir: Path) -> bool:
    """Whether the save of this folder reached its commit marker (complete or not since)."""
    return (tag_dir / MARKER).exists()


def mismatch(saved: dict, current: dict) -> list[str]:
    """Human-readable differences between a checkpoint's fingerprint and this run's."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{k}: checkpoint {a.get(k)!r}, now {b.get(k)!r}"
                    for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            out.append(f"{key}: checkpoint {a!r}, now {b!r}")
    return out


class CheckpointMismatch(RuntimeError):
    """The checkpoint folder belongs to a run with another model, tokenizer, data or batch shape."""


class NoCheckpointLoads(RuntimeError):
    """Checkpoints were committed in the folder but none of them can be loaded."""


class CheckpointDiskFull(OSError):
    """A checkpoint could not be written because its filesystem is full."""


def refuse_mismatch(tag_dir: Path, fingerprint: dict) -> None:
    """Raise CheckpointMismatch naming each field where the checkpoint's run differs from this one.

    Another split of the same global batch (ranks, micro-batch, accumulation) is no mismatch: its
    steps draw the same rows (model/reshard.py); a changed global batch says what to set."""
    from model import reshard

    saved = fingerprint_of(tag_dir)
    current = {k: v for k, v in fingerprint.items() if k in saved or k not in LATER_FIELDS}
    diffs = mismatch(saved, current)
    if not diffs or reshard.relayout_only(saved, current):
        return
    raise CheckpointMismatch(
        f"{tag_dir} belongs to another run: " + "; ".join(diffs) + ". Train with the same model, tokenizer, "
        "data, global batch (micro_batch_size x grad_accum_steps x processes), seq_len, seed and ZeRO stage to "
        "resume it, or set pretrain.run_name to start a new run beside it." + reshard.batch_advice(saved, current))


def check_newest(ckpt_dir: Path, fingerprint: dict) -> None:
    """Refuse a mismatched run before any engine is built: the newest complete checkpoint decides."""
    for tag in step_folders(ckpt_dir):
        if problem(tag) is None:
            refuse_mismatch(tag, fingerprint)
            return


def resume(engine, ckpt_dir: Path, fingerprint: dict) -> int:
    """Load the newest checkpoint that loads and return its step; 0 when none was ever committed.

    An incomplete or unreadable checkpoint is skipped, saying why, for the one before it; when
    checkpoints were committed but none loads, NoCheckpointLoads names each and why (starting
    over would overwrite the run's metrics and waste its training). A checkpoint of another
    run is CheckpointMismatch.
    """
    import torch

    from model import reshard

    failed: list[tuple[Path, str]] = []
    for tag in step_folders(ckpt_dir):
        if (why := problem(tag)) is None:
            refuse_mismatch(tag, fingerprint)
            try:  # through DeepSpeed's universal format when ZeRO state was partitioned over other ranks
                path, client = reshard.load(engine, ckpt_dir, tag, fingerprint_of(tag), fingerprint)
                why = None if path is not None else "DeepSpeed found nothing to load"
            except Exception as e:  # a corrupt file that kept its size, another ZeRO layout
                why = f"{type(e).__name__}: {e}"
        if why is not None:
            print(f"checkpoint {tag} skipped: {why}; falling back to the previous one", flush=True)
            failed.append((tag, why))
            continue
        torch.set_rng_state(client["rng_cpu"])
        if "rng_cuda" in client and torch.cuda.is_available():
            torch.cuda.set_rng_state(client["rng_cuda"])
        print(f"resumed from {tag} at step {client['step']}", flush=True)
        return int(client["step"])
    if any(committed(tag) for tag, _ in failed):
        reasons = "".join(f"\n  {tag.name}: {why}" for tag, why in failed)
        raise NoCheckpointLoads(
            f"none of the checkpoints in {ckpt_dir} can be loaded:{reasons}\nTraining does not start over on its "
            "own (that would discard this run's progress and overwrite its metrics). Restore a good checkpoint "
            f"there to resume; or, to train from scratch, set pretrain.run_name to a new name, or delete "
            f"{ckpt_dir}/step-* (the old metrics are then kept as metrics-before-restart-*.jsonl)")
    return 0


def disk_full(exc: BaseException, folder: Path) -> bool:
    """Whether a failed write was the disk filling up: ENOSPC (or a quota) in the exception chain,
    or, since torch's writer reports it as a bare RuntimeError, next to nothing free on folder's
    filesystem."""
    e: BaseException | None = exc
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    try:
        return shutil.disk_usage(folder).free < FULL_BELOW
    except OSError:
        return False


@contextlib.contextmanager
def saving(tag_dir: Path):
    """Around the writing and commit of one checkpoint: on failure the uncommitted folder is removed
    (freeing its space; never a half checkpoint) and a full disk is a CheckpointDiskFull that says
    where and what to do."""
    try:
        yield
    except Exception as e:
        full = disk_full(e, tag_dir.parent)
        free = shutil.disk_usage(tag_dir.parent).free if full else 0
        if not committed(tag_dir):
            shutil.rmtree(tag_dir, ignore_errors=True)
        if not full:
            raise
        good = next((t.name for t in step_folders(tag_dir.parent) if problem(t) is None), None)
        raise CheckpointDiskFull(
            errno.ENOSPC, f"the disk is full: checkpoint {tag_dir} could not be written ({free} bytes left on its "
            f"filesystem; {type(e).__name__}: {e}). The partial folder was removed; the last complete checkpoint is "
            f"{good or 'none'}. Free space under {tag_dir.parent} (or lower pretrain.keep_checkpoints) and run "
            "again: training resumes from it") from e


def prune(ckpt_dir: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; remove the rest, interrupted saves included.

    Called by rank 0 right after a commit, when no save is in progress.
    """
    kept = 0
    for tag in step_folders(ckpt_dir):
        if kept < keep and problem(tag) is None:
            kept += 1
        else:
            shutil.rmtree(tag, ignore_errors=True)


def _deepspeed_state_classes() -> list:
    """The non-tensor classes DeepSpeed writes into its optimizer checkpoints."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def use_safe_loading(engine) -> None:
    """Make the engine read checkpoints with weights_only=True (DeepSpeed's default unpickles)."""
    import torch

    allowed = _deepspeed_state_classes()

    def load(path: str, map_location=None):
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    engine.checkpoint_engine.load = load
