"""The baselines' model: a nanoGPT-architecture decoder written for these benchmarks.

Learned position embeddings, LayerNorm, GELU MLP (4x), fused QKV, causal
scaled_dot_product_attention, tied embeddings, N(0, 0.02) init with scaled residual
projections, AdamW over decayed 2-D weights: the GPT-2 recipe nanoGPT follows. Used by
benchmarks/train.py (throughput) and benchmarks/quality.py (bits per byte).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class NanoGPT(nn.Module):
    def __init__(self, vocab: int, block: int, layers: int, d: int, heads: int):
        super().__init__()
        self.block, self.layers, self.d = block, layers, d
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> float:
        """Same accounting as forja's GPT.flops_per_token: 6N (less position table) + attention."""
        return 6 * (self.num_params() - self.wpe.weight.numel()) + 12 * self.layers * self.d * self.block

    def forward(self, idx, targets=None):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for b in self.blocks:
            x = b(x)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95))


def width_for(params: int, vocab: int, block: int, layers: int, heads: int) -> int:
    """The width (a multiple of 2*heads) whose nanoGPT model has the parameter count closest to params."""
    best = None
    for d in range(2 * heads, 2048, 2 * heads):
        n = vocab * d + block * d + layers * (12 * d * d + 13 * d) + 2 * d
        if best is None or abs(n - params) < abs(best[1] - params):
            best = (d, n)
    return best[0]
