import math

import pytest
import torch

from model.config import PRESETS, ModelConfig, from_preset
from model.generate import Sampling, generate
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
    cached = generate(model, [prompt], Sampling(12, temperature=0))[0]
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert cached == seq[len(prompt):]


def test_batched_left_padded_generation_equals_one_prompt_at_a_time():
    torch.manual_seed(0)
    model = GPT(tiny(tie_embeddings=False)).eval()  # untied: a random tied model repeats its input
    prompts = [[5, 17, 42, 7, 9, 11, 3], [8], [100, 200, 300]]  # three lengths: two rows are padded
    greedy = Sampling(10, temperature=0)
    alone = [generate(model, [p], greedy)[0] for p in prompts]
    assert generate(model, prompts, greedy) == alone
    assert generate(model, prompts, greedy, use_cache=False) == alone
    # a row that stops early does not stop the others, and nothing after its stop token is kept
    stop = next(t for r in alone for t in r if t != r[0])  # a token some row makes after others
    stopped = generate(model, prompts, greedy, stop_id=stop)
    assert stopped == [r[: r.index(stop)] if stop in r else r for r in alone]
    assert any(0 < len(r) < 10 for r in stopped)


def test_sampling_is_reproducible_with_a_seed_and_top_p_restricts_the_choice():
    torch.manual_seed(0)
    model = GPT(tiny(tie_embeddings=False)).eval()  # untied: a random tied model repeats its input
    s = Sampling(16, temperature=1.0, top_k=None, top_p=0.9, seed=3)
    assert generate(model, [[1, 2, 3]], s) == generate(model, [[1, 2, 3]], s)
    assert generate(model, [[1, 2, 3]], Sampling(16, 1.0, None, None, seed=3)) != \
        generate(model, [[1, 2, 3]], Sampling(16, 1.0, None, None, seed=4))
    # one generator a row: a prompt's sample does not depend on the rest of its batch
    assert generate(model, [[1, 2, 3], [9, 8]], s)[0] == generate(model, [[1, 2, 3]], s)[0]
    # top_p so small that only the most likely token survives: sampling becomes greedy
    assert generate(model, [[1, 2, 3]], Sampling(16, 1.0, None, 1e-6, seed=5)) == \
        generate(model, [[1, 2, 3]], Sampling(16, temperature=0))


@pytest.mark.parametrize("field, value", [("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.5),
                                          ("max_new_tokens", 0), ("top_k", -2)])
def test_invalid_sampling_parameters_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        Sampling(**{field: value})


def test_too_long_prompt_is_truncated_from_the_left_with_a_warning(caplog):
    model = GPT(tiny()).eval()  # context 32
    with caplog.at_level("WARNING"):
        out = generate(model, [list(range(100))], Sampling(8, temperature=0))[0]
    assert len(out) == 8
    assert "kept its last 24 tokens" in caplog.text


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_are_valid(name):
    cfg = from_preset(name, vocab_size=1000, block_size=64)
    assert cfg.n_embd % cfg.n_head == 0


def test_bad_shape_says_what_to_change():
    with pytest.raises(ValueError, match="divisible by n_kv_head"):
        tiny(n_kv_head=3)
    with pytest.raises(ValueError, match="unknown model preset"):
        from_preset("huge", 10, 10)
