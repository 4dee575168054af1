"""Text generation with a KV cache, and loading a self-describing model folder."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_model, save_file
from tokenizers import Tokenizer

from model.chat import EOT, ChatTemplate, plain_tokenizer
from model.config import ModelConfig
from model.gpt import GPT

log = logging.getLogger(__name__)

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"


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


def load_folder(folder: Path, device: str = "cpu", dtype: torch.dtype | None = None) -> tuple[GPT, Tokenizer]:
    """Load a model folder written by save_folder (on `device`, cast to `dtype` if given: see
    model.device.resolve). Nothing is unpickled."""
    folder = Path(folder)
    cfg = ModelConfig.load(folder / CONFIG)
    model = GPT(cfg)
    load_model(model, str(folder / WEIGHTS), device=device)
    return model.to(device=device, dtype=dtype).eval(), Tokenizer.from_file(str(folder / TOKENIZER))


class KVCache:
    """Keys and values of every layer for a batch, preallocated to the longest sequence."""

    def __init__(self, cfg: ModelConfig, batch: int, length: int, device, dtype):
        shape = (cfg.n_layer, batch, cfg.n_kv_head, length, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions filled (GPT.forward advances it after all layers)

    def layer(self, i: int) -> "_LayerCache":
        return _LayerCache(self, i)


class _LayerCache:
    def __init__(self, cache: KVCache, i: int):
        self.cache, self.i = cache, i

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, end = self.cache, self.cache.length + k.shape[2]
        c.k[self.i, :, :, c.length : end] = k
        c.v[self.i, :, :, c.length : end] = v
        return c.k[self.i, :, :, :end], c.v[self.i, :, :, :end]


@dataclass
class Sampling:
    """How to pick each next token. temperature 0 is greedy (and ignores the rest)."""

    max_new_tokens: int = 48
    temperature: float = 0.8
    top_k: int | None = 50
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {"max_new_tokens": self.max_new_tokens >= 1, "temperature": self.temperature >= 0,
                  "top_k": self.top_k is None or self.top_k >= 0,
                  "top_p": self.top_p is None or 0 < self.top_p <= 1}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is out of range: max_new_tokens >= 1, "
                                 "temperature >= 0, top_k >= 0 (0: off), 0 < top_p <= 1")


def pick(logits: torch.Tensor, s: Sampling, generators: list[torch.Generator] | None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V); one generator a row, so that a
    prompt's sample does not depend on the other prompts of its batch."""
    if s.temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / s.temperature
    if s.top_k:
        kth = torch.topk(logits, min(s.top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p is not None and s.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, -1) >= s.top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = torch.softmax(logits, -1)
    return torch.cat([torch.multinomial(probs[b], 1, generator=g) for b, g in enumerate(generators)])


def fit_prompt(ids: list[int], room: int, where: str = "prompt") -> list[int]:
    """Keep the last `room` tokens of a prompt too long for the context, saying so."""
    if len(ids) > room:
        log.warning("%s of %d tokens is longer than the context allows (%d with the new tokens): "
                    "kept its last %d tokens", where, len(ids), room, room)
        return ids[-room:]
    return ids


class DeadlineExceeded(TimeoutError):
    """Generation stopped because the request's time ran out (checked before every step)."""

    def __init__(self, steps: int, max_new_tokens: int, over_s: float):
        super().__init__(f"generation passed its deadline by {over_s:.2f} s after {steps} of {max_new_tokens} "
                         "new tokens and was stopped")
        self.steps = steps


@torch.inference_mode()  # cheaper than no_grad for the many small views of decoding
def generate(model: GPT, prompts: list[list[int]], s: Sampling, stop_id: int | None = None,
             use_cache: bool = True, deadline: float | None = None) -> list[list[int]]:
    """New token ids for a batch of prompts, left-padded to one length.

    deadline (a time.monotonic() value) is checked before every forward pass: a request whose
    time has run out raises DeadlineExceeded instead of computing tokens nobody will read.

    With use_cache the keys and values of past positions are kept (one new position per
    step); without it every step recomputes the whole sequence, which gives the same
    tokens far more slowly (benchmarks/generate.py compares the two).
    """
    cfg = model.cfg
    device = next(model.parameters()).device
    room = cfg.block_size - s.max_new_tokens
    if room < 1:
        raise ValueError(f"max_new_tokens ({s.max_new_tokens}) must be < the model's context ({cfg.block_size})")
    filler = stop_id if stop_id is not None else 0
    prompts = [fit_prompt(p, room) or [filler] for p in prompts]
    width = max(len(p) for p in prompts)
    pad = torch.tensor([width - len(p) for p in prompts], device=device)
    pad = pad if bool(pad.any()) else None  # no padding: plain causal attention, no mask to build
    x = torch.tensor([[filler] * (width - len(p)) + p for p in prompts], device=device)
    generators = [torch.Generator(device=device).manual_seed(s.seed) for _ in prompts] if s.temperature > 0 else None
    cache = KVCache(cfg, len(prompts), width + s.max_new_tokens, device, next(model.parameters()).dtype) \
        if use_cache else None
    seq, steps = x, []
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for step in range(s.max_new_tokens):
        if deadline is not None and time.monotonic() > deadline:
            raise DeadlineExceeded(step, s.max_new_tokens, time.monotonic() - deadline)
        logits = model(x if use_cache else seq, cache=cache, pad=pad)[:, -1, :]
        nxt = pick(logits, s, generators)
        steps.append(nxt)
        x = nxt[:, None]
        if not use_cache:
            seq = torch.cat((seq, x), dim=1)
        if stop_id is not None:
            done |= nxt == stop_id
            if bool(done.all()):
                break
    result = []
    for row in torch.stack(steps, dim=1).tolist():
        result.append(row[: row.index(stop_id)] if stop_id is not None and stop_id in row else row)
    return result


class PromptEncoder:
    """Prompts (user text) to token ids: plain text, or a user message in the chat template.
    Special-token text in a prompt stays text, so no prompt can forge a document boundary or a
    chat marker. stop_id is the token that ends a reply."""

    def __init__(self, tokenizer: Tokenizer, chat: bool = False):
        self.template = ChatTemplate(tokenizer) if chat else None
        self.plain = self.template.plain if self.template else plain_tokenizer(tokenizer)
        self.stop_id = self.template.stop_id if self.template else tokenizer.token_to_id(EOT)

    def __call__(self, prompts: list[str]) -> list[list[int]]:
        if self.template:
            return [self.template.prompt([{"role": "user", "content": p}]) for p in prompts]
        return [e.ids for e in self.plain.encode_batch(prompts)]


def generate_text(model: GPT, tokenizer: Tokenizer, prompts: list[str], s: Sampling | None = None,
                  batch_size: int = 8, chat: bool = False, deadline: float | None = None) -> list[str]:
    """A continuation of each prompt, in batches; a fixed seed gives the same texts. With chat,
    each prompt is a user message in the chat template and the reply is the continuation."""
    s = s or Sampling()
    encode = PromptEncoder(tokenizer, chat)
    model.eval()
    texts = []
    for i in range(0, len(prompts), batch_size):
        ids = encode(prompts[i : i + batch_size])
        texts += [tokenizer.decode(t) for t in generate(model, ids, s, encode.stop_id, deadline=deadline)]
    return texts
