"""The model diagram (issue 15, a picture of the model): its counts are the real model's."""
import pytest

from model.config import ModelConfig, from_preset
from model.diagram import block_counts, draw, parameter_counts
from model.gpt import GPT

CONFIGS = [
    ModelConfig(vocab_size=300, block_size=16, n_layer=2, n_head=2, n_kv_head=2, n_embd=32),  # tied, plain heads
    ModelConfig(vocab_size=301, block_size=16, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, tie_embeddings=False),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["tied", "untied-gqa"])
def test_part_counts_add_up_to_the_real_models_parameters(cfg):
    model = GPT(cfg)
    parts = parameter_counts(cfg)
    assert sum(parts.values()) == sum(p.numel() for p in model.parameters())
    block = model.blocks[0]
    inner = block_counts(cfg)
    assert inner["attention"] == sum(p.numel() for p in block.attn.parameters())
    assert inner["MLP"] == sum(p.numel() for p in block.mlp.parameters())
    assert parts["output head"] == (0 if cfg.tie_embeddings else model.lm_head.weight.numel())


def test_the_png_is_written_and_not_empty(tmp_path):
    path = draw(from_preset("small", 4096, 256), tmp_path / "model.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
