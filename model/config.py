"""Model shape: a small config dataclass and the named size presets."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class ModelConfig:
    """Decoder shape. vocab_size and block_size come from the tokenize stage."""

    vocab_size: int = 4096
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4  # < n_head turns on grouped-query attention
    n_embd: int = 256
    mlp_ratio: float = 8 / 3  # SwiGLU hidden = ratio * n_embd, rounded to a multiple of 64
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    dropout: float = 0.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"model.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"model.n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError("model head size (n_embd / n_head) must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self) -> int:
        return int(64 * round(self.mlp_ratio * self.n_embd / 64))

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> "ModelConfig":
        return cls(**json.loads(Path(path).read_text()))


# Named sizes. Width, depth and heads only; vocabulary and context come from the data.
PRESETS: dict[str, dict] = {
    "micro": dict(n_layer=2, n_head=2, n_kv_head=2, n_embd=64),  # tests
    "tiny": dict(n_layer=4, n_head=4, n_kv_head=4, n_embd=256),  # CPU demo, ~5M params
    "small": dict(n_layer=6, n_head=6, n_kv_head=2, n_embd=384),
    "gpt2-124m": dict(n_layer=12, n_head=12, n_kv_head=12, n_embd=768, tie_embeddings=True),
    "350m": dict(n_layer=24, n_head=16, n_kv_head=8, n_embd=1024),
    "1b": dict(n_layer=16, n_head=32, n_kv_head=8, n_embd=2048, tie_embeddings=False),
}


def from_preset(name: str, vocab_size: int, block_size: int, **overrides) -> ModelConfig:
    """Build a ModelConfig from a named preset, the data's vocab/context and overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    fields = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
    return ModelConfig(vocab_size=vocab_size, block_size=block_size, **fields)


__all__ = ["ModelConfig", "PRESETS", "from_preset"]
