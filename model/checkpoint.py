"""Checkpoints that a kill at any moment cannot corrupt, and resume that refuses a mismatch.

A checkpoint is DeepSpeed's own folder `step-N/` (module, optimizer, scheduler, ZeRO
partitions) plus `COMMIT.json`, written last by rank 0 once every rank has finished its
files. COMMIT.json lists each file's size, and the run's fingerprint: the model config,
the tokenizer's sha256 and the data key. A folder without it was interrupted mid-save
and is ignored; one whose files do not match it (truncated, missing) is skipped with a
message, and the previous checkpoint is used. Loading goes through `torch.load(...,
weights_only=True)` with only DeepSpeed's own state classes allowed: nothing else is
unpickled.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

MARKER = "COMMIT.json"


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
    """The checkpoint folder belongs to a run with another model, tokenizer or data."""


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
