"""pretrain.optimizer: muon, on real DeepSpeed on the CPU (gloo, fp32): which weights Muon moves,
that its steps are orthogonalised, that the schedule drives both halves, that a killed run
resumes bit for bit, and the combinations refused before training."""
import json
from dataclasses import replace

import pytest
import torch

from model import optim
from model import train as tr
from model.config import ModelConfig, from_preset
from model.gpt import GPT
from tests.model.test_resume import losses, make_spec, run
from tests.model.test_train import dist_env, spec  # noqa: F401  (dist_env is a fixture)

pytestmark = pytest.mark.slow
SHAPE = dict(vocab_size=300, block_size=32, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)


def test_muon_moves_the_block_matrices_only_and_adamw_the_rest():
    model = GPT(ModelConfig(**SHAPE))
    muon = {n for n, p in model.named_parameters() if optim.is_muon_matrix(n, p)}
    assert muon == {f"blocks.{i}.{m}.weight" for i in range(2)
                    for m in ("attn.qkv", "attn.o_proj", "mlp.gate_up", "mlp.down")}
    groups = optim.param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    adam_2d, adam_1d, muon_group = ({names[id(p)] for p in g["params"]} for g in groups)
    assert adam_2d == {"embed.weight"} and groups[0]["weight_decay"] == 0.1  # the tied embedding and head
    assert adam_1d == {"norm.weight"} | {f"blocks.{i}.{k}_norm.weight" for i in range(2) for k in ("attn", "mlp")}
    assert groups[1]["weight_decay"] == 0.0 and muon_group == muon
    untied = GPT(ModelConfig(**SHAPE | {"tie_embeddings": False}))
    assert not any(optim.is_muon_matrix(n, p) for n, p in untied.named_parameters() if "lm_head" in n)


@pytest.mark.parametrize("stage, clip", [(0, 1.0), (1, 0.0)])  # ZeRO 1 clips Muon's update: refused with a clip
def test_deepspeed_muon_orthogonalises_the_matrices_and_the_schedule_scales_both_halves(tmp_path, dist_env, stage,
                                                                                        clip):
    s = spec(tmp_path, max_steps=20, warmup_steps=4, lr=1e-3, muon_lr=0.02, optimizer="muon", zero_stage=stage,
             grad_clip=clip)
    torch.manual_seed(0)
    model = GPT(ModelConfig(**s.model))
    engine, _ = tr.build_engine(model, s)
    opt = engine.basic_optimizer
    assert type(opt).__name__ == "MuonWithAuxAdam" and optim.check_halves(engine.module) == 8
    muon_groups = [g for g in opt.param_groups if g["use_muon"]]
    assert len(muon_groups) == 1 and muon_groups[0]["momentum"] == 0.95
    x = torch.randint(0, 300, (4, 32))
    down = engine.module.blocks[0].mlp.down.weight
    lrs = []
    for i in range(3):
        before = down.detach().clone()
        _, loss = engine(x, x)
        engine.backward(loss)
        lrs.append((engine.get_lr()[0], muon_groups[0]["lr"]))
        engine.step()
    step = (down.detach() - before) / lrs[-1][1]  # no weight decay on Muon's half: the update itself
    sv = torch.linalg.svdvals(step)
    # Newton-Schulz leaves every singular value near 1 (its quintic lands them in about [0.6, 1.2]);
    # a raw momentum or Adam step of a (32, 64) gradient spreads over orders of magnitude.
    assert 0.5 < float(sv.min()) and float(sv.max()) < 1.3, sv
    for i, (adam_lr, muon_lr) in enumerate(lrs):  # warmup: (i + 1) / 4 of each half's peak
        assert adam_lr == pytest.approx(1e-3 * (i + 1) / 4) and muon_lr == pytest.approx(0.02 * (i + 1) / 4)
    states = opt.state.values()
    assert any("momentum_buffer" in st for st in states) and any("exp_avg_sq" in st for st in states)
    if stage == 0:  # whole tensors: Muon holds one buffer per matrix, AdamW two moments elsewhere
        assert set(opt.state[down]) == {"momentum_buffer"}
        assert {"exp_avg", "exp_avg_sq"} <= set(opt.state[engine.module.embed.weight])


def test_a_killed_muon_run_resumes_bit_for_bit(tmp_path, dist_env):
    kw = dict(optimizer="muon", muon_lr=0.02, max_steps=6, checkpoint_every=2, lr=3e-3)
    # The uninterrupted run in a child process like the others: in this process torch's thread count is
    # pytest's (make test: 2), whose matmuls round differently from the children's one thread.
    ref = run(make_spec(tmp_path, "ref", **kw))
    assert ref.returncode == 0, ref.stdout[-3000:]
    killed = run(make_spec(tmp_path, "kill", **kw), fault="step:5")
    assert killed.returncode == -9, killed.stdout[-2000:]
    resumed = run(make_spec(tmp_path, "kill", **kw))
    assert resumed.returncode == 0 and "at step 4" in resumed.stdout, resumed.stdout[-3000:]
    assert losses(tmp_path / "kill") == losses(tmp_path / "ref")  # every step, floats compared exactly
    digest = [json.loads((tmp_path / n / "out" / "ranks" / "rank-0.json").read_text())["weights_sha256"]
              for n in ("ref", "kill")]
    assert digest[0] == digest[1]
    saved = torch.load(next((tmp_path / "kill" / "ckpt" / "step-4").glob("*model_states.pt")), weights_only=False)
    assert sum("momentum_buffer" in st for st in saved["optimizer"]["state"].values()) == 8  # Muon's state resumed
    metrics = [json.loads(x) for x in (tmp_path / "ref" / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["muon_lr"] == pytest.approx(0.02 * 1 / 2) and metrics[0]["lr"] == pytest.approx(3e-3 / 2)


def test_muon_with_lora_is_refused_before_training(tmp_path, dist_env):
    s = spec(tmp_path, max_steps=2, optimizer="muon", lora_rank=4)
    with pytest.raises(ValueError, match="Muon does not train LoRA adapters.*optimizer adamw"):
        tr.train(s)
    assert not (tmp_path / "ckpt").exists()
    with pytest.raises(ValueError, match="pretrain.optimizer muon with pretrain.zero_stage 1 .*pretrain.grad_clip: 0"):
        tr.train(replace(s, lora_rank=0, zero_stage=1, grad_clip=1.0))
    with pytest.raises(ValueError, match="pretrain.optimizer 'sgd'"):
        tr.train(replace(s, optimizer="sgd", lora_rank=0))


def test_a_muon_checkpoint_does_not_resume_as_adamw(tmp_path):
    adamw = tr.run_fingerprint(spec(tmp_path), 1)
    assert "optimizer" not in adamw  # today's checkpoints keep their fingerprint
    assert tr.run_fingerprint(spec(tmp_path, optimizer="muon"), 1)["optimizer"] == "muon"


def test_the_memory_estimate_counts_one_muon_buffer_instead_of_two_adam_moments(tmp_path):
    cfg = from_preset("small", 32000, 1024)
    for stage, world in ((0, 1), (1, 4)):
        adamw = tr.memory_estimate(cfg, spec(tmp_path, zero_stage=stage), torch.float32, world)
        muon = tr.memory_estimate(cfg, spec(tmp_path, zero_stage=stage, optimizer="muon"), torch.float32, world)
        assert adamw["states_bytes"] - muon["states_bytes"] == pytest.approx(4 * optim.muon_params(cfg) / world)
    real = GPT(ModelConfig(**SHAPE))
    counted = sum(p.numel() for n, p in real.named_parameters() if optim.is_muon_matrix(n, p))
    assert optim.muon_params(real.cfg) == counted
