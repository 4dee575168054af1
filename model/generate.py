"""Text generation with a KV cache, and loading a self-describing model folder."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_model, save_file
from tokenizers import Tokenizer

from model.config import ModelConfig
from model.gpt import GPT

log = logging.getLogger(__name__)

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"
EOT = "<|endoftext|>"


def save_folder(model: GPT, tokenizer_path: Path, out: Path) -> None:
    """Write weights (safetensors), config and tokenizer: a folder that describes itself."""
    out.mkdir(parents=True, exist_ok=True)
    # Own contiguous copies: under ZeRO, DeepSpeed's parameters are views into flat buffers,
    # which safetensors refuses. A tied head is stored once, as the embedding.
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / WEIGHTS))
    model.cfg.save(out / CONFIG)
    (out / TOKENIZER).write_bytes(Path(tokenizer_path).read_bytes())


def load_folder(folder: Path, device: str = "cpu") -> tuple[GPT, Tokenizer]:
    """Load a model folder written by save_folder. Nothing is unpickled."""
    folder = Path(folder)
    cfg = ModelConfig.load(folder / CONFIG)
    model = GPT(cfg)
    load_model(model, str(folder / WEIGHTS), device=device)
    return model.to(device).eval(), Tokenizer.from_file(str(folder / TOKENIZER))


@torch.no_grad()
def generate_ids(
    model: GPT,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = 50,
    generator: torch.Generator | None = None,
    stop_id: int | None = None,
) -> list[int]:
    """Sample up to max_new_tokens after prompt_ids, reusing keys/values of past tokens."""
    cfg = model.cfg
    device = next(model.parameters()).device
    room = cfg.block_size - max_new_tokens
    if room < 1:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) must be < the context ({cfg.block_size})")
    if len(prompt_ids) > room:
        log.warning("prompt of %d tokens truncated from the left to %d", len(prompt_ids), room)
        prompt_ids = prompt_ids[-room:]
    if not prompt_ids:
        prompt_ids = [stop_id if stop_id is not None else 0]
    caches = [[None, None] for _ in range(cfg.n_layer)]
    x = torch.tensor([prompt_ids], device=device)
    pos, out = 0, []
    for _ in range(max_new_tokens):
        logits = model(x, caches=caches, start=pos)[:, -1, :].float()
        pos += x.shape[1]
        if temperature <= 0:
            nxt = int(logits.argmax(-1))
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            nxt = int(torch.multinomial(probs, 1, generator=generator))
        if stop_id is not None and nxt == stop_id:
            break
        out.append(nxt)
        x = torch.tensor([[nxt]], device=device)
    return out


def generate_text(
    model: GPT,
    tokenizer: Tokenizer,
    prompts: list[str],
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int | None = 50,
    seed: int = 0,
) -> list[str]:
    """Generate a continuation for each prompt; a fixed seed gives the same text."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    stop = tokenizer.token_to_id(EOT)
    model.eval()
    texts = []
    for p in prompts:
        ids = generate_ids(model, tokenizer.encode(p).ids, max_new_tokens, temperature, top_k, gen, stop)
        texts.append(tokenizer.decode(ids))
    return texts
