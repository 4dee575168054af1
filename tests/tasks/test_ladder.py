"""The scaling ladder's pure part: the power-law fit, its error, the next size's plan, the report and plot."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model.config import PRESETS, ModelConfig, from_preset
from model.diagram import parameter_counts
from model.gpt import GPT
from tasks.ladder import LadderError, Rung, fit, next_rung, plot, report_markdown, training_flops

SIZES = [("micro", 1e5), ("tiny", 5e6), ("small", 2e7), ("gpt2-124m", 1.2e8), ("350m", 3.5e8)]


def ladder(a: float, alpha: float, noise: float = 0.0, seed: int = 0, n: int = 5, ratio: int = 20) -> list[Rung]:
    """Rungs on bpb = a * C^-alpha at C = 6 * params * tokens, ln(bpb) perturbed by N(0, noise)."""
    rng = np.random.default_rng(seed)
    rungs = []
    for name, p in SIZES[:n]:
        flops = 6.0 * p * ratio * p
        rungs.append(Rung(name, int(p), int(ratio * p), flops, a * flops ** -alpha * math.exp(rng.normal(0, noise))))
    return rungs


@pytest.mark.parametrize("a,alpha", [(3.0, 0.05), (12.5, 0.12), (0.9, 0.3)])
def test_fit_recovers_exact_power_laws(a, alpha):
    law = fit(ladder(a, alpha))
    assert law.alpha == pytest.approx(alpha, rel=1e-9)
    assert law.a == pytest.approx(a, rel=1e-9)
    assert law.r2 == pytest.approx(1.0)
    assert max(map(abs, law.residuals)) < 1e-9 and law.se_alpha < 1e-9
    p = law.predict(1e22)
    assert p.bpb == pytest.approx(a * 1e22 ** -alpha, rel=1e-9) and p.high - p.low < 1e-9


def test_fit_recovers_noisy_power_laws_within_their_stated_error():
    for seed in range(5):
        law = fit(ladder(4.0, 0.08, noise=0.02, seed=seed))
        assert abs(law.alpha - 0.08) < 3 * law.se_alpha
        assert abs(math.log(law.a) - math.log(4.0)) < 3 * law.se_log_a
        assert 0.9 < law.r2 < 1.0 and len(law.residuals) == 5
        assert law.se_alpha > 0 and law.s > 0


def test_prediction_interval_covers_the_next_size_in_most_seeds():
    """The 95% interval (t, n - 2 dof) at the next size's compute covers a fresh noisy run there in
    about 95% of ladders; a normal quantile or a missing extrapolation term would cover far fewer."""
    a, alpha, noise, trials = 5.0, 0.1, 0.05, 300
    target = 6.0 * 1e9 * 20 * 1e9  # a 1B model at the same tokens per parameter, beyond the ladder
    rng = np.random.default_rng(123)
    new_run = true_value = 0
    for seed in range(trials):
        p = fit(ladder(a, alpha, noise=noise, seed=seed, n=4)).predict(target)
        truth = a * target ** -alpha
        true_value += p.low <= truth <= p.high
        new_run += p.low <= truth * math.exp(rng.normal(0, noise)) <= p.high
    assert 0.90 <= new_run / trials <= 0.99
    assert true_value / trials >= 0.93


def test_too_few_sizes_explain_why_and_what_to_add():
    rungs = ladder(3.0, 0.1, n=2)
    with pytest.raises(LadderError, match=r"2 size\(s\).*two parameters.*no error to estimate.*--presets micro,tiny,small"):
        fit(rungs)
    same_size = rungs + [Rung("tiny", rungs[1].params, rungs[1].tokens * 2, rungs[1].flops * 2, 0.5)]
    with pytest.raises(LadderError, match="2 size"):  # three points, two sizes
        fit(same_size)
    with pytest.raises(LadderError, match="0 size"):
        fit([])
    assert issubclass(LadderError, ValueError)


@pytest.mark.parametrize("field,value", [("bpb", -1.0), ("bpb", 0.0), ("flops", float("nan")),
                                         ("tokens", 0), ("bpb", float("inf"))])
def test_bad_values_name_the_rung_and_field(field, value):
    rungs = ladder(3.0, 0.1, n=3)
    setattr(rungs[1], field, value)
    with pytest.raises(LadderError, match=rf"rung 'tiny' has {field}="):
        fit(rungs)


def test_same_compute_everywhere_cannot_give_a_slope():
    rungs = [Rung(n, int(p), int(1e9 / p), 1e15, 1.0 + i) for i, (n, p) in enumerate(SIZES[:3])]
    with pytest.raises(LadderError, match="same training compute"):
        fit(rungs)


def test_training_flops_is_the_models_training_count_times_tokens():
    cfg = from_preset("micro", vocab_size=128, block_size=32)
    model = GPT(cfg)  # a real model, not the meta one training_flops builds
    assert training_flops(cfg, 1000) == model.flops_per_token() * 1000
    # flops_per_token is already 3 x the forward pass (2 FLOPs per weight, 4 per attention score element).
    n = model.num_params()  # tied head: the embedding counts once, as the head's matmul
    forward = 2 * n + 4 * cfg.n_layer * cfg.n_embd * cfg.block_size
    assert training_flops(cfg, 1000) == 3 * forward * 1000
    # A 1b preset costs no memory: built on the meta device; untied, the input lookup is free.
    big = from_preset("1b", vocab_size=32000, block_size=2048)
    n_big = sum(parameter_counts(big).values()) - big.vocab_size * big.n_embd
    assert training_flops(big, 10**9) == (6 * n_big + 12 * big.n_layer * big.n_embd * 2048) * 10**9


def test_next_rung_picks_the_following_preset_and_keeps_tokens_per_parameter():
    rungs = ladder(3.0, 0.1, noise=0.01, n=3)[::-1]  # order of the rungs does not matter
    rungs[0].tokens = 40 * rungs[0].params  # the largest rung sets the ratio: 40 tokens per parameter
    plan = next_rung(rungs, vocab_size=512, seq_len=64)
    assert plan.name == "gpt2-124m"
    cfg = ModelConfig(vocab_size=512, block_size=64, **PRESETS["gpt2-124m"])
    assert plan.params == sum(parameter_counts(cfg).values())
    assert plan.tokens == round(40 * plan.params)
    assert plan.flops == training_flops(cfg, plan.tokens)
    assert plan.prediction == fit(rungs).predict(plan.flops)
    assert plan.prediction.low < plan.prediction.bpb < plan.prediction.high
    # A ladder topped by the last preset has no next size; a custom order is followed.
    top = [Rung(n, p, 20 * p, 6.0 * 20 * p * p, 2.0 - i / 10) for i, (n, p) in enumerate(
        [("small", 10**7), ("350m", 10**8), ("1b", 10**9)])]
    assert next_rung(top, vocab_size=512, seq_len=64) is None
    custom = {"micro": PRESETS["micro"], "tiny": PRESETS["tiny"], "small": PRESETS["small"], "wide": PRESETS["small"]}
    assert next_rung(rungs, custom, vocab_size=512, seq_len=64).name == "wide"
    with pytest.raises(LadderError, match="'tiny'.*not presets"):
        next_rung(rungs, {"micro": PRESETS["micro"], "small": PRESETS["small"]}, vocab_size=512, seq_len=64)


def test_report_lists_every_rung_and_the_plot_is_a_png(tmp_path):
    rungs = ladder(3.0, 0.1, noise=0.02, n=3)
    law = fit(rungs)
    plan = next_rung(rungs, vocab_size=512, seq_len=64)
    md = report_markdown(rungs, law, plan)
    for r in rungs:
        assert f"| {r.name} |" in md and f"{r.bpb:.4f}" in md
    assert "gpt2-124m" in md and f"{plan.prediction.low:.4f}" in md and f"{law.alpha:.4f}" in md
    assert "none" in report_markdown(rungs, law, None)
    png = plot(rungs, law, plan, tmp_path / "ladder.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    plot(rungs, law, None, tmp_path / "alone.png")
    assert (tmp_path / "alone.png").read_bytes()[:4] == b"\x89PNG"
