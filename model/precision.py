"""The training dtype: pretrain.precision (auto, fp32 or bf16) on this machine's device.

auto is bf16 on a GPU that supports it and fp32 elsewhere (a CPU trains in fp32 unless asked);
bf16 where the device lacks it is refused before training with what to change. A checkpoint
records its dtype (in its fingerprint, only when not fp32, so older fp32 checkpoints keep
theirs) and resuming it in the other dtype is refused: its optimizer state differs (bf16 keeps
fp32 master weights, fp32 none).
"""
from __future__ import annotations

from pathlib import Path

import torch

from model import checkpoint


PRECISIONS = ("auto", "fp32", "bf16")


def bf16_support(device: str) -> tuple[bool, str]:
    """(whether this device trains in bf16, why not). A GPU says so itself; on a CPU a small
    bf16 matmul must run and agree with fp32 (CPUs without bf16 instructions fail or emulate)."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
        return (True, "") if torch.cuda.is_bf16_supported() else (False, f"{name} has no bf16 support")
    try:
        a = torch.arange(64, dtype=torch.float32).reshape(8, 8) / 64
        ok = torch.allclose((a.bfloat16() @ a.bfloat16()).float(), a @ a, rtol=2e-2, atol=1e-2)
    except RuntimeError as e:
        return False, f"torch cannot multiply bf16 matrices on this CPU ({e})"
    return (True, "") if ok else (False, "bf16 matrix products on this CPU are wrong")


def resolve_dtype(precision: str, device: str, bf16: tuple[bool, str]) -> torch.dtype:
    """The training dtype for pretrain.precision on device, given bf16_support(device): "auto" is
    bf16 on a GPU that has it and fp32 elsewhere; "bf16" where the device lacks it is refused."""
    if precision not in PRECISIONS:
        raise ValueError(f"pretrain.precision is {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "fp32" or (precision == "auto" and (device != "cuda" or not bf16[0])):
        return torch.float32
    if not bf16[0]:
        raise ValueError(f"pretrain.precision is bf16 but {bf16[1]}: set pretrain.precision to fp32 (or auto), "
                         "or train on a device with bf16 (a GPU from NVIDIA Ampere on, a CPU with AVX512-BF16 or AMX)")
    return torch.bfloat16


def device_and_dtype(precision: str = "auto") -> tuple[str, torch.dtype]:
    """(device, training dtype) for pretrain.precision (auto, fp32 or bf16) on this machine."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if precision == "fp32" or (precision == "auto" and device == "cpu"):
        return device, torch.float32  # no probe needed
    return device, resolve_dtype(precision, device, bf16_support(device))


def precision_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]


def check_precision(ckpt_dir: Path, dtype: torch.dtype) -> None:
    """Refuse to resume the newest complete checkpoint in another dtype than it was trained in
    (its optimizer holds fp32 master weights in bf16, none in fp32): say which to set."""
    for tag in checkpoint.step_folders(ckpt_dir):
        if checkpoint.problem(tag) is None:
            saved, now = checkpoint.fingerprint_of(tag).get("precision", "fp32"), precision_name(dtype)
            if saved != now:
                raise checkpoint.CheckpointMismatch(
                    f"{tag} was trained in {saved} and this run would train in {now}: set pretrain.precision to "
                    f"{saved} to resume it, or set pretrain.run_name to start a new run in {now} beside it")
            return
