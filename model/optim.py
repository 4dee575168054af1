"""The Muon half of training: which weights Muon moves and how DeepSpeed is asked to build it.

`pretrain.optimizer: muon` trains the transformer blocks' hidden 2-D matrices with Muon
(momentum, then Newton-Schulz orthogonalisation of the update) and everything else, the token
embedding, the norms and the output head, with AdamW, as modded-nanoGPT and nanochat do.

The optimizer is DeepSpeed's own (`"optimizer": {"type": "Muon"}` in its config, built by the
engine as `MuonWithAuxAdam`), not torch.optim.Muon: torch's takes 2-D parameters only, so the
AdamW half would need a second optimizer that DeepSpeed's single client optimizer cannot hold,
and it knows nothing of ZeRO's flat partitions. DeepSpeed's orthogonalises whole matrices
before ZeRO 1/2/3 partition them, keeps the momentum in the optimizer state (so it is in every
checkpoint), and runs its AdamW half with torch.optim.AdamW here (`torch_adam`), as today's path.

DeepSpeed decides the halves itself, by name: a parameter is Muon's when it is 2-D and its name
holds neither "embed" nor "lm_head". forja's own rule below says the same for model.gpt.GPT;
`check_halves` proves it after the engine is built, so a renamed layer cannot silently move a
weight to the wrong half.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from model.config import ModelConfig

if TYPE_CHECKING:  # annotations only: the config's validator imports this module without torch
    import torch

ADAM_EPS = 1e-8  # torch.optim.AdamW's, today's path; DeepSpeed's Muon would default to 1e-10


def is_muon_matrix(name: str, p: torch.Tensor) -> bool:
    """A hidden weight matrix of a transformer block: Muon's. The embedding (tied to the head),
    the head and every norm gain stay with AdamW."""
    return name.startswith("blocks.") and p.dim() == 2


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's groups first (2-D weights decayed, norms not, as today), then Muon's matrices
    (no weight decay, as modded-nanoGPT). The AdamW groups lead so `engine.get_lr()[0]` stays
    pretrain.lr, the rate the metrics have always logged as `lr`."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    adam_2d = [p for n, p in named if not is_muon_matrix(n, p) and p.dim() >= 2]
    adam_1d = [p for n, p in named if p.dim() < 2]
    muon = [p for n, p in named if is_muon_matrix(n, p)]
    groups = [{"params": adam_2d, "weight_decay": weight_decay}, {"params": adam_1d, "weight_decay": 0.0},
              {"params": muon, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def optimizer_config(lr: float, betas, muon_lr: float, momentum: float) -> dict:
    """DeepSpeed's `optimizer` entry: Muon at muon_lr and momentum, its AdamW half at lr and betas."""
    return {"type": "Muon", "params": {"lr": lr, "betas": list(betas), "eps": ADAM_EPS, "muon_lr": muon_lr,
                                       "momentum": momentum, "torch_adam": True}}


def check_halves(model: torch.nn.Module) -> int:
    """After deepspeed.initialize: DeepSpeed's use_muon tags must match is_muon_matrix. Returns
    the number of Muon matrices; raises naming the parameters that landed in the wrong half."""
    wrong = [n for n, p in model.named_parameters()
             if p.requires_grad and bool(getattr(p, "use_muon", False)) != is_muon_matrix(n, p)]
    if wrong:
        raise RuntimeError(f"DeepSpeed's Muon split the parameters differently from forja's rule (hidden block "
                           f"matrices only): {', '.join(wrong)}. Rename them or use pretrain.optimizer: adamw")
    return sum(is_muon_matrix(n, p) for n, p in model.named_parameters())


def refusal(optimizer: str, zero_stage: int, lora_rank: int, grad_clip: float) -> str | None:
    """Why this run cannot train with the optimizer asked for, or None when it can.

    ZeRO stages 1-3 run DeepSpeed's Muon inside the ZeRO optimizer, which orthogonalises the
    gradients before its global-norm clip, so the clip then scales Muon's update itself: at
    grad_clip 1 a `tiny` model's Muon steps shrink about 60-fold (the orthogonal updates of 16
    matrices have a norm of about 64), and the AdamW half's gradients with them. Stage 0 clips
    the raw gradients first, as modded-nanoGPT and nanochat do, which Muon's normalisation undoes.
    """
    if optimizer not in ("adamw", "muon"):
        return f"pretrain.optimizer {optimizer!r} is not one of adamw, muon"
    if optimizer != "muon":
        return None
    if zero_stage not in (0, 1, 2, 3):
        return f"pretrain.zero_stage {zero_stage} is not one of 0, 1, 2, 3"
    if zero_stage >= 1 and grad_clip > 0:
        return (f"pretrain.optimizer muon with pretrain.zero_stage {zero_stage} would clip Muon's orthogonalised "
                f"update by the global norm (pretrain.grad_clip {grad_clip}), shrinking its steps many times over: "
                "set pretrain.zero_stage: 0, or pretrain.grad_clip: 0 to train with ZeRO without clipping")
    if lora_rank:
        return ("Muon does not train LoRA adapters (they are low-rank on purpose; orthogonalising their update "
                "undoes that): fine-tune with optimizer adamw")
    return None


def muon_params(cfg: ModelConfig) -> int:
    """How many weights the blocks' matrices hold: Muon's half of the model."""
    attn = 2 * cfg.n_embd * cfg.n_embd + 2 * cfg.n_embd * cfg.n_kv_head * cfg.head_dim
    return cfg.n_layer * (attn + 3 * cfg.n_embd * cfg.mlp_hidden)


def muon_saving_bytes(cfg: ModelConfig, zero_stage: int, world: int) -> float:
    """Optimizer-state bytes per rank Muon saves against AdamW: one fp32 momentum buffer for its
    half instead of AdamW's two moments, partitioned over the ranks from ZeRO stage 1 on."""
    saved = 4.0 * muon_params(cfg)
    return saved / world if zero_stage >= 1 else saved
