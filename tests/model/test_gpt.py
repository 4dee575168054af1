import math

import pytest
import torch

from model.config import PRESETS, ModelConfig, from_preset
from model.generate import generate_ids
from model.gpt import GPT


def tiny(**kw):
    return ModelConfig(**({"vocab_size": 512, "block_size": 32, "n_layer": 2, "n_head": 4, "n_kv_head": 2,
                           "n_embd": 64} | kw))


def test_first_loss_is_close_to_log_vocab():
    torch.manual_seed(0)
    model = GPT(tiny())
    x, y = torch.randint(0, 512, (4, 32)), torch.randint(0, 512, (4, 32))
    with torch.no_grad():
        _, loss = model(x, y)
    assert abs(float(loss) - math.log(512)) < 0.15


def test_causal_future_tokens_do_not_change_past_logits():
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    x = torch.randint(0, 512, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 7) % 512
    assert torch.allclose(model(x)[0, :10], model(y)[0, :10], atol=1e-5)


def test_kv_cache_greedy_equals_full_recompute():
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    prompt = [5, 17, 42, 7]
    cached = generate_ids(model, prompt, 12, temperature=0)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert cached == seq[len(prompt):]


def test_too_long_prompt_is_truncated_from_the_left_not_a_crash():
    model = GPT(tiny()).eval()
    out = generate_ids(model, list(range(100)), 8, temperature=0)
    assert len(out) == 8


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_are_valid(name):
    cfg = from_preset(name, vocab_size=1000, block_size=64)
    assert cfg.n_embd % cfg.n_head == 0


def test_bad_shape_says_what_to_change():
    with pytest.raises(ValueError, match="divisible by n_kv_head"):
        tiny(n_kv_head=3)
    with pytest.raises(ValueError, match="unknown model preset"):
        from_preset("huge", 10, 10)
