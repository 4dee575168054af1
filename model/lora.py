"""LoRA: low-rank adapters on the attention and MLP projections, merged back after training.

    y = x W^T + (alpha / r) * x A^T B^T      A: (r, in), B: (out, r), B starts at zero

Only A and B train (the base weights are frozen), so optimizer state shrinks to the
adapters; merge() folds them into W, so the saved model is an ordinary forja model folder.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

TARGETS = ("qkv", "o_proj", "gate_up", "down")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        base.weight.requires_grad_(False)

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            self.base.weight += (self.lora_b @ self.lora_a) * self.scale
        self.base.weight.requires_grad_(True)
        return self.base


def apply(model: nn.Module, rank: int, alpha: float, targets: tuple[str, ...] = TARGETS) -> int:
    """Freeze model and wrap each targeted Linear in an adapter; returns the trainable count."""
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise ValueError(f"lora targets {sorted(unknown)} are not projections of forja's model; choose from {TARGETS}")
    for p in model.parameters():
        p.requires_grad_(False)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, rank, alpha))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain Linear back."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().contiguous() for n, p in model.named_parameters() if "lora_" in n}
