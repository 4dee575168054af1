"""The fused CPU training kernels (model/kernels.cpp) against the model's plain PyTorch code."""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import kernels
from model.config import ModelConfig
from model.gpt import GPT

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ops():
    built = kernels.load()
    assert built is not None, "the fused kernels should build here (C++ compiler and ninja are installed)"
    return built


def pair(n_kv_head: int, tie: bool = True) -> tuple[GPT, GPT]:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=300, block_size=32, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=64,
                      tie_embeddings=tie)
    plain = GPT(cfg)
    fused = copy.deepcopy(plain)
    assert fused.use_fused_kernels()
    return plain, fused


@pytest.mark.parametrize("n_kv_head,tie", [(4, True), (2, False), (1, True)])
def test_fused_training_step_matches_the_plain_model(ops, n_kv_head, tie):
    plain, fused = pair(n_kv_head, tie)
    x = torch.randint(0, 300, (3, 32))
    y = x.roll(-1, dims=1)
    y[0, :7] = -100  # ignored positions (fine-tuning masks) count in neither loss nor gradient
    losses = []
    for model in (plain, fused):
        _, loss = model(x, y)
        (loss * 3).backward()  # a scale on the loss (gradient accumulation) reaches the gradients
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for (name, a), b in zip(plain.named_parameters(), fused.parameters()):
        assert b.grad is not None, name
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_kernels_are_deterministic(ops):
    _, fused = pair(2)
    x = torch.randint(0, 300, (4, 32))
    grads = []
    for _ in range(2):
        fused.zero_grad(set_to_none=True)
        fused(x, x)[1].backward()
        grads.append([p.grad.clone() for p in fused.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))  # bit for bit: exact resume relies on it


def test_inference_and_generation_stay_on_the_plain_path(ops):
    plain, fused = pair(2)
    x = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        assert torch.equal(plain(x), fused(x))


def test_cross_entropy_edge_cases(ops):
    logits = torch.randn(4, 10, requires_grad=True)
    targets = torch.full((4,), -100)
    loss = kernels.CrossEntropy.apply(logits, targets, -100)
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(logits, targets))  # nothing to average: nan, as torch
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    with pytest.raises(RuntimeError, match="target 10 at row 2 is out of range for 10 classes"):
        kernels.CrossEntropy.apply(logits, torch.tensor([1, 2, 10, 3]), -100)


def test_swiglu_and_rmsnorm_match_their_definitions(ops):
    gate_up = torch.randn(3, 5, 2 * 24, dtype=torch.float32, requires_grad=True)
    ref_in = gate_up.detach().clone().requires_grad_()
    out = kernels.SwiGLU.apply(gate_up)
    gate, up = ref_in.chunk(2, dim=-1)
    ref = F.silu(gate) * up
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(gate_up.grad, ref_in.grad)

    x = torch.randn(2, 7, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y = kernels.RMSNorm.apply(x, w, 1e-5)
    yr = F.rms_norm(xr, (16,), wr, 1e-5)
    torch.testing.assert_close(y, yr)
    g = torch.randn_like(y)
    y.backward(g)
    yr.backward(g)
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(w.grad, wr.grad)


def test_switch_turns_them_off():
    code = "from model.gpt import GPT; from model.config import ModelConfig; print(GPT(ModelConfig()).use_fused_kernels())"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env=os.environ | {"FORJA_FUSED_KERNELS": "0"}, check=True)
    assert out.stdout.strip() == "False"


def test_a_lock_left_by_a_killed_build_is_cleared_and_a_live_one_kept(tmp_path):
    import os
    import time

    from model.kernels import clear_stale_build_locks

    stale, live = tmp_path / "forja_kernels_avx2" / "lock", tmp_path / "deepspeed_shm_comm" / "lock"
    for lock in (stale, live):
        lock.parent.mkdir()
        lock.touch()
    old = time.time() - 3600
    os.utime(stale, (old, old))  # a build killed an hour ago: torch would wait on it forever
    assert clear_stale_build_locks(tmp_path) == [stale]
    assert not stale.exists() and live.exists()  # a build running now keeps its lock
