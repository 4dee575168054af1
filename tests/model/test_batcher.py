"""The batching engine on its own: sequences that join a running batch at different times and with
different prompt lengths decode the same tokens as `generate` gives each alone, in shared steps."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from model.batcher import Engine, Job
from model.config import ModelConfig
from model.generate import Sampling, generate
from model.gpt import GPT


class Served:
    def __init__(self, model):
        self.model = model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)).eval()
    with torch.no_grad():  # peaked logits: no near-ties for float noise to flip (random weights are near-uniform)
        m.embed.weight.normal_(0, 1.0)
    return m


def run(engine, served, prompt, s, stop_ids=frozenset(), delay=0.0):
    done, tokens, end = threading.Event(), [], []

    def emit(kind, value):
        if kind == "token":
            tokens.append(value)
        else:
            end.append((kind, value))
            done.set()

    time.sleep(delay)
    engine.submit(Job(served, prompt, s, frozenset(stop_ids), time.monotonic() + 30, emit))
    return done, tokens, end


def test_sequences_joining_a_running_batch_decode_what_each_alone_would(model):
    prompts = [[5, 6, 7], list(range(10, 30)), [1], list(range(40, 52)), [9, 9, 9, 9, 9, 9, 9]]
    greedy = Sampling(max_new_tokens=12, temperature=0)
    sampled = Sampling(max_new_tokens=12, temperature=1.0, top_k=None, top_p=0.9, seed=3)
    engine = Engine(max_batch=3, batch_wait_ms=1)
    engine.start()
    slow = model.register_forward_pre_hook(lambda *a: time.sleep(0.002))  # sequences outlast the arrivals
    try:
        served = Served(model)
        runs = []
        for i, p in enumerate(prompts):  # staggered: later ones join (or wait for) a batch mid-decoding
            runs.append(run(engine, served, p, sampled if i == 3 else greedy, delay=0.002 * i))
        for done, _, _ in runs:
            assert done.wait(30)
    finally:
        slow.remove()
        engine.stop()
    for i, (p, (_, tokens, end)) in enumerate(zip(prompts, runs)):
        alone = generate(model, [p], sampled if i == 3 else greedy)[0]
        assert tokens == alone and end == [("done", "length")], i
    stats = engine.stats.as_dict()
    assert stats["max_batch_seen"] == 3 and stats["steps"] < 5 * 11 and stats["sequences"] == 5


def test_a_stop_token_ends_one_sequence_and_the_others_go_on(model):
    s = Sampling(max_new_tokens=10, temperature=0)
    first = generate(model, [[5, 6, 7]], s)[0]
    engine = Engine(max_batch=4, batch_wait_ms=20)
    engine.start()
    try:
        served = Served(model)
        stopped = run(engine, served, [5, 6, 7], s, stop_ids={first[2]})
        other = run(engine, served, [40, 41], s)
        for done, _, _ in (stopped, other):
            assert done.wait(30)
    finally:
        engine.stop()
    assert stopped[1] == first[: first.index(first[2])] and stopped[2] == [("done", "stop")]
    assert other[1] == generate(model, [[40, 41]], s)[0]
