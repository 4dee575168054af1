"""Where a trained model runs after training: CUDA in bf16 when a GPU is there, else the CPU in fp32.

Evaluation, batch inference, the registry gate's re-scoring, fine-tuning's before/after
comparison and serving all ask `resolve(setting)` with the `device` setting (`auto` by default,
or `cpu`, `cuda`, `cuda:N`) and load the model with the Placement it returns.
"""
from __future__ import annotations

from dataclasses import dataclass

CHOICES = "auto (CUDA when present, else the CPU), cpu, cuda or cuda:N"


@dataclass(frozen=True)
class Placement:
    device: str  # a torch device string: "cpu", "cuda", "cuda:1"
    dtype: str  # "float32" or "bfloat16": the weights' and activations' dtype there

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    def __str__(self) -> str:
        return f"{self.device} ({self.dtype})"


def resolve(setting: str | None = "auto", *, cuda_available: bool | None = None,
            cuda_count: int | None = None, bf16_supported: bool | None = None) -> Placement:
    """The Placement for a `device` setting. The keyword arguments stand in for what torch reports
    (tests pass them to check the rules on a machine without a GPU).

    auto: the first GPU in bf16 where it supports bf16 (else fp16 is not tried: fp32), the CPU in
    fp32 otherwise. cuda / cuda:N asked for on a machine without that GPU is an error naming it,
    not a silent fall back to the CPU."""
    setting = (setting or "auto").strip().lower()
    if cuda_available is None or cuda_count is None or bf16_supported is None:
        import torch

        cuda_available = torch.cuda.is_available() if cuda_available is None else cuda_available
        cuda_count = (torch.cuda.device_count() if cuda_available else 0) if cuda_count is None else cuda_count
        if bf16_supported is None:
            bf16_supported = bool(cuda_available and torch.cuda.is_bf16_supported())
    if setting == "cpu":
        return Placement("cpu", "float32")
    if setting == "auto":
        if cuda_available and cuda_count > 0:
            return Placement("cuda", "bfloat16" if bf16_supported else "float32")
        return Placement("cpu", "float32")
    if setting == "cuda" or setting.startswith("cuda:"):
        index = 0
        if setting != "cuda":
            try:
                index = int(setting.split(":", 1)[1])
            except ValueError:
                raise ValueError(f"device {setting!r}: write cuda:N with N a number, or use {CHOICES}") from None
        if not cuda_available or index >= cuda_count:
            have = f"{cuda_count} GPU(s)" if cuda_available else "no CUDA GPU"
            raise ValueError(f"device {setting!r} was asked for but this machine has {have}; "
                             f"use device: auto or cpu")
        return Placement(setting, "bfloat16" if bf16_supported else "float32")
    raise ValueError(f"device {setting!r} is not one forja knows: use {CHOICES}")


def from_option(setting: str) -> Placement:
    """resolve() for a command's --device option: a value this machine cannot honour ends the
    command with the reason (benchmarks/generate.py and benchmarks/serve.py)."""
    try:
        return resolve(setting)
    except ValueError as e:
        raise SystemExit(f"--device: {e}") from None
