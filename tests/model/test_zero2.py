"""ZeRO stage 2 and the gradient bookkeeping at every stage, on real DeepSpeed training (CPU).

Under ZeRO 1 and 2 the optimizer keeps each rank's fragment of the reduced gradient and clears
p.grad; under ZeRO 3 every parameter is a partition. The per-layer norms and the non-finite
guard read those partitions (model/monitor.py GradNorms), so they hold at every stage.
"""
import json

import pytest
import torch

from model import monitor
from tests.model.test_resume import make_spec, run

pytestmark = pytest.mark.slow


def test_a_nan_gradient_with_a_finite_loss_stops_zero_2_before_the_step(tmp_path):
    """FORJA_FAULT=nan-grad:5 poisons step 5's gradient of one weight (the loss stays finite):
    the run stops naming that weight, and the weights it saved are the ones before step 5
    (equal to the committed step-4 checkpoint's), so the bad step was never applied."""
    spec = make_spec(tmp_path, "nan", zero_stage=2, max_steps=8, checkpoint_every=4)
    done = run(spec, fault="nan-grad:5")
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "FloatingPointError" in out, out[-3000:]
    assert "step 4: loss" in out and "first non-finite gradient in blocks.0.mlp.down.weight" in out, out[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "nan" / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    ckpt = tmp_path / "nan" / "ckpt"
    good = torch.load(ckpt / "step-4" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    kept = torch.load(ckpt / "nonfinite-step-4" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert good.keys() == kept.keys() and all(torch.equal(good[k], kept[k]) for k in good)


def test_grad_norms_of_a_plain_module_name_the_first_nonfinite_in_backward_order():
    """Without DeepSpeed, GradNorms reads p.grad: the total, per layer, and the NaN's parameter."""
    lin = torch.nn.ModuleDict({"embed": torch.nn.Linear(2, 2), "norm": torch.nn.Linear(2, 1)})
    for p in lin.parameters():
        p.grad = torch.full_like(p, 2.0)
    norms = monitor.GradNorms.of(lin)
    assert norms.total() == pytest.approx(2.0 * 9**0.5)
    assert norms.by_layer() == pytest.approx({"grad_norm.embed": 2.0 * 6**0.5, "grad_norm.norm": 2.0 * 3**0.5})
    assert norms.first_nonfinite() is None
    lin["embed"].bias.grad[0] = float("nan")
    lin["norm"].weight.grad[0, 1] = float("inf")
    assert monitor.GradNorms.of(lin).first_nonfinite() == "norm.weight"
