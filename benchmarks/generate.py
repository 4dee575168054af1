"""Generation speed: forja's KV cache against recomputing the whole prefix every step.

    .venv/bin/python benchmarks/generate.py [--model MODEL_FOLDER] [--new-tokens 256] [--batches 1 8]
                                            [--device auto|cpu|cuda|cuda:N]

Both decode greedily the same prompts (different lengths, left-padded into one batch) with
model.generate.generate, which only differs in use_cache:
  forja     keys and values of past positions kept in a preallocated cache: one new
            position through the model per step
  baseline  no cache: the whole sequence through the model at every step
Without --model a `tiny`-preset model with random weights and a 512-token context is
used (speed does not depend on the weights). tokens/s counts new tokens of the whole
batch. The last line is one JSON object (its figures are those of the largest batch;
per-batch figures are under "batches"). --device (default auto: CUDA in bf16 when present, else
the CPU in fp32; model.device.resolve) says where the model runs, printed first and in the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.config import from_preset  # noqa: E402
from model.device import from_option  # noqa: E402
from model.generate import Sampling, generate, load_folder  # noqa: E402
from model.gpt import GPT  # noqa: E402


def sync(model: GPT) -> None:
    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()


def timed(model: GPT, prompts: list[list[int]], s: Sampling, use_cache: bool) -> tuple[float, list[list[int]]]:
    sync(model)
    t0 = time.perf_counter()
    out = generate(model, prompts, s, use_cache=use_cache)
    sync(model)  # CUDA runs asynchronously: time the work, not its queueing
    seconds = time.perf_counter() - t0
    return sum(len(r) for r in out) / seconds, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a model folder (model.safetensors, config.json, tokenizer.json)")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--device", default="auto",
                    help="auto (CUDA in bf16 when present, else the CPU), cpu, cuda or cuda:N")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    where = from_option(args.device)
    device = str(where)
    print(f"device: {device}")
    if args.model:
        model = load_folder(Path(args.model), where.device, where.torch_dtype)[0]
    else:
        torch.manual_seed(0)
        model = GPT(from_preset("tiny", 4096, 512, tie_embeddings=False)).to(where.device, where.torch_dtype).eval()
    cfg = model.cfg
    if args.new_tokens >= cfg.block_size - 8:
        raise SystemExit(f"--new-tokens must leave room for the prompts in the context ({cfg.block_size})")
    s = Sampling(max_new_tokens=args.new_tokens, temperature=0)
    g = torch.Generator().manual_seed(1)
    results = {}
    generate(model, [[1, 2, 3]], Sampling(8, temperature=0))  # warm-up
    for b in args.batches:
        lengths = torch.randint(8, 33, (b,), generator=g).tolist()
        prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]
        cached, out_c = timed(model, prompts, s, True)
        uncached, out_u = timed(model, prompts, s, False)
        results[b] = {"cached_tokens_per_s": round(cached, 1), "uncached_tokens_per_s": round(uncached, 1),
                      "ratio": round(cached / uncached, 2), "identical_tokens": out_c == out_u}
        print(f"batch {b}: cached {cached:8.1f} tokens/s, uncached {uncached:8.1f} tokens/s, "
              f"{cached / uncached:.1f}x, identical greedy tokens: {out_c == out_u}")
    last = results[max(args.batches)]
    print(json.dumps({**last, "identical_tokens": all(r["identical_tokens"] for r in results.values()),
                      "new_tokens": args.new_tokens, "device": device,
                      "batches": {str(b): r for b, r in results.items()}}))


if __name__ == "__main__":
    main()
