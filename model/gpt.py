"""The decoder: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

One file on purpose, in the spirit of nanoGPT: read it top to bottom.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused kernel
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Normalise in fp32 so bf16 activations do not lose the tiny variances.
        return F.rms_norm(x.float(), self.weight.shape, None, self.eps).type_as(x) * self.weight


def rope_tables(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of each position's angles, (length, head_dim): both halves share a frequency."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (i, i + D/2) pair of x (B, H, T, D) by its position's angle (the Llama layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # q, k and v in one matmul: rows [0, n_head) are q heads, then n_kv_head k, then v.
        self.qkv = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin, cache=None):
        B, T, C = x.shape
        cfg = self.cfg
        heads = self.qkv(x).view(B, T, cfg.n_head + 2 * cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
        qk = apply_rope(heads[:, : cfg.n_head + cfg.n_kv_head], cos, sin)  # q and k rotated together
        q, k = qk.split((cfg.n_head, cfg.n_kv_head), dim=1)
        v = heads[:, cfg.n_head + cfg.n_kv_head :]
        if cache is not None:  # (k, v) of earlier positions, for incremental decoding
            if cache[0] is not None:
                k = torch.cat((cache[0], k), dim=2)
                v = torch.cat((cache[1], v), dim=2)
            cache[0], cache[1] = k, v
        if cfg.n_kv_head != cfg.n_head:
            rep = cfg.n_head // cfg.n_kv_head
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        # With a cache the new queries sit at the end: causal only when T > 1.
        causal = T > 1
        if causal and k.shape[2] != T:
            raise ValueError("a multi-token step with a non-empty cache is not supported")
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=causal, dropout_p=cfg.dropout if self.training else 0.0
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up = nn.Linear(cfg.n_embd, 2 * cfg.mlp_hidden, bias=False)  # gate rows, then up rows
        self.down = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.block_size, cfg.rope_theta)
        # Not persistent: recomputed from the config, so checkpoints hold weights only.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # Residual output projections scaled down with depth (GPT-2 style) so the
        # residual stream's variance does not grow with the number of layers.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6N for the weights plus attention (PaLM appendix B)."""
        cfg = self.cfg
        n = self.num_params() - (0 if cfg.tie_embeddings else self.embed.weight.numel())
        return 6 * n + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, caches=None, start: int = 0):
        """Logits for idx (B, T); with targets, also the mean cross-entropy loss."""
        T = idx.shape[1]
        if start + T > self.cfg.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context ({self.cfg.block_size})")
        cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]
        x = self.embed(idx)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, None if caches is None else caches[i])
        logits = self.lm_head(self.norm(x))
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss
