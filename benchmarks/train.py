"""Training throughput: forja's DeepSpeed loop against a plain-torch nanoGPT-style loop.

    .venv/bin/python benchmarks/train.py [--preset tiny] [--steps 60] [--batch 8] [--seq 256]

Both train on the same random tokens, with the same batch, context, thread count and
device, for --steps steps after --warmup untimed ones:
  forja     model.train.train: DeepSpeed engine (ZeRO 0, gloo or nccl), grad watch, metrics
  baseline  the nanoGPT-architecture model in benchmarks/nanogpt.py with the parameter count
            closest to forja's, torch AdamW, a bare forward/backward/step loop
MFU is FLOPs per token (6N + attention) x tokens/s over one peak measured here (a fp32
matmul on the CPU; the datasheet bf16 peak on known GPUs). On a GPU, run it with
--preset gpt2-124m --seq 1024 --batch 16 (bf16). The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from model import monitor, train as forja_train  # noqa: E402
from model.config import from_preset  # noqa: E402
from model.gpt import GPT  # noqa: E402
from nanogpt import NanoGPT, optimizer, width_for  # noqa: E402


def baseline_rate(cfg, rows: np.ndarray, batch: int, steps: int, warmup: int, device: str, dtype) -> tuple[float, NanoGPT]:
    d = width_for(GPT(cfg).num_params(), cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head)
    torch.manual_seed(0)
    model = NanoGPT(cfg.vocab_size, cfg.block_size, cfg.n_layer, d, cfg.n_head).to(device)
    opt = optimizer(model, 3e-3)
    rng = np.random.default_rng(0)
    t0 = None
    for step in range(warmup + steps):
        if step == warmup:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        chunk = torch.from_numpy(rows[np.sort(rng.choice(len(rows), batch, replace=False))].astype(np.int64)).to(device)
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            _, loss = model(chunk[:, :-1], chunk[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss)  # the host reads the loss every step, as a logging loop does
    if device == "cuda":
        torch.cuda.synchronize()
    return batch * cfg.block_size * steps / (time.perf_counter() - t0), model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    device, dtype = forja_train.device_and_dtype()
    cfg = from_preset(args.preset, args.vocab, args.seq)
    peak, source = monitor.peak_flops(device, dtype)
    print(f"device {device} ({dtype}), {args.threads} threads; peak {peak / 1e9:.0f} GFLOP/s ({source})")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = np.random.default_rng(0).integers(0, args.vocab, size=(4096, args.seq + 1)).astype(np.uint16)
        np.save(tmp / "train.npy", rows)
        np.save(tmp / "val.npy", rows[:64])
        from tokenizers import Tokenizer, models

        Tokenizer(models.BPE()).save(str(tmp / "tok.json"))
        every = max(1, args.steps // 6)
        spec = forja_train.TrainSpec(
            model=asdict(cfg), train_files=[str(tmp / "train-00000.parquet")], val_files=[str(tmp / "val-00000.parquet")],
            tokenizer=str(tmp / "tok.json"), out_dir=str(tmp / "out"), checkpoint_dir=str(tmp / "ckpt"),
            max_steps=args.warmup + args.steps, micro_batch_size=args.batch, warmup_steps=min(10, args.warmup),
            log_every=every, eval_every=10**9, eval_batches=1, checkpoint_every=10**9, threads=args.threads)
        if args.warmup % every:
            raise SystemExit(f"--warmup ({args.warmup}) must be a multiple of the log interval ({every})")
        forja_train.train(spec)
        rows_logged = [json.loads(x) for x in (tmp / "out" / "metrics.jsonl").read_text().splitlines()]
        timed = [r for r in rows_logged if r["step"] > args.warmup]
        # tokens/s per interval, weighted by the interval's length in steps
        forja_tps = len(timed) / sum(1 / r["tokens_per_s"] for r in timed)
        forja_flops = GPT(cfg).flops_per_token()
        base_tps, base_model = baseline_rate(cfg, rows, args.batch, args.steps, args.warmup, device, dtype)

    forja_mfu = forja_flops * forja_tps / peak
    base_mfu = base_model.flops_per_token() * base_tps / peak
    print(f"forja:    {GPT(cfg).num_params() / 1e6:.2f}M params, {forja_tps:8.0f} tokens/s, MFU {forja_mfu:.3f}")
    print(f"baseline: {base_model.num_params() / 1e6:.2f}M params, {base_tps:8.0f} tokens/s, MFU {base_mfu:.3f}")
    print(json.dumps({"preset": args.preset, "device": device, "tokens_per_s": round(forja_tps, 1),
                      "mfu": round(forja_mfu, 4), "baseline_tokens_per_s": round(base_tps, 1),
                      "baseline_mfu": round(base_mfu, 4), "mfu_ratio": round(forja_mfu / base_mfu, 3)}))


if __name__ == "__main__":
    main()
