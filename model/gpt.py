"""The decoder: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

One file on purpose, in the spirit of nanoGPT: read it top to bottom.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import kernels
from model.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.fused = False  # GPT.use_fused_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and kernels.usable(x):
            return kernels.RMSNorm.apply(x, self.weight, self.eps)
        # The statistics are taken in fp32 so that bf16 activations keep their tiny variances.
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        return (wide * torch.rsqrt(wide.square().mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of each position's angles, (length, head_dim): both halves share a frequency."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (i, i + D/2) pair of x (B, H, T, D) by its position's angle (the Llama layout)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # q, k and v in one matmul: rows [0, n_head) are q heads, then n_kv_head k, then v.
        self.qkv = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.fused = False  # GPT.use_fused_kernels

    def forward(self, x, cos, sin, cache=None, mask=None):
        B, T, C = x.shape
        cfg = self.cfg
        heads = self.qkv(x).view(B, T, cfg.n_head + 2 * cfg.n_kv_head, cfg.head_dim)
        if self.fused and cache is None and cos.dim() == 2 and kernels.usable(heads):
            q, k, v = kernels.QKVRotary.apply(heads, cos, sin, cfg.n_head, cfg.n_kv_head)
        else:
            qk, v = heads.transpose(1, 2).split((cfg.n_head + cfg.n_kv_head, cfg.n_kv_head), dim=1)
            q, k = apply_rope(qk, cos, sin).split((cfg.n_head, cfg.n_kv_head), dim=1)  # q and k rotated together
        if cache is not None:  # keys and values of earlier positions, for incremental decoding
            k, v = cache.append(k, v)
        if cfg.n_kv_head != cfg.n_head:
            rep = cfg.n_head // cfg.n_kv_head
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
            dropout_p=cfg.dropout if self.training else 0.0,
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up = nn.Linear(cfg.n_embd, 2 * cfg.mlp_hidden, bias=False)  # gate rows, then up rows
        self.down = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=False)
        self.fused = False  # GPT.use_fused_kernels

    def forward(self, x):
        gate_up = self.gate_up(x)
        if self.fused and kernels.usable(gate_up):
            return self.down(kernels.SwiGLU.apply(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, cos, sin, cache=None, mask=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, mask)
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
        self.fused = False
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

    def use_fused_kernels(self, on: bool = True) -> bool:
        """Train with model/kernels.py's fused CPU kernels (fp32 on a CPU; elsewhere, and in
        inference, the plain code below runs anyway). Builds them on first use; False if they
        cannot be built."""
        on = on and kernels.load() is not None
        for m in self.modules():
            if hasattr(m, "fused"):
                m.fused = on
        return on

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6N for the weights plus attention (PaLM appendix B)."""
        cfg = self.cfg
        n = self.num_params() - (0 if cfg.tie_embeddings else self.embed.weight.numel())
        return 6 * n + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache=None,
                pad: torch.Tensor | None = None):
        """Logits for idx (B, T); with targets, also the mean cross-entropy loss.

        For generation: cache (a model.generate.KVCache) holds the keys and values of the
        positions before idx; pad (B,) counts the left-padding tokens of each row, which
        no position attends to and which do not count as positions.
        """
        B, T = idx.shape
        past = cache.length if cache is not None else 0
        if past + T > self.cfg.block_size:
            raise ValueError(f"sequence of {past + T} tokens exceeds the context ({self.cfg.block_size})")
        mask = None
        if pad is None:
            cos, sin = self.rope_cos[past : past + T], self.rope_sin[past : past + T]
            if past and T > 1:
                raise ValueError("a multi-token step after earlier positions needs pad (a mask)")
        else:
            slots = torch.arange(past, past + T, device=idx.device)
            positions = (slots[None, :] - pad[:, None]).clamp_(min=0)  # (B, T)
            cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]
            keys = torch.arange(past + T, device=idx.device)
            real = keys[None, :] >= pad[:, None]  # (B, S): the key is not padding
            causal = keys[None, :] <= slots[:, None]  # (T, S)
            # A padding query may see anything causal (its output is never used) so no row is empty.
            mask = (causal[None] & (real[:, None, :] | ~real[:, past:, None]))[:, None]  # (B, 1, T, S)
        x = self.embed(idx)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, None if cache is None else cache.layer(i), mask)
        if cache is not None:
            cache.length += T
        logits = self.lm_head(self.norm(x))
        if targets is None:
            return logits
        flat = logits.float().view(-1, logits.size(-1))
        if self.fused and kernels.usable(flat):
            return logits, kernels.CrossEntropy.apply(flat, targets.reshape(-1), -100)
        loss = F.cross_entropy(flat, targets.reshape(-1), ignore_index=-100)
        return logits, loss
