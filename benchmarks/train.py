"""Training throughput: forja's DeepSpeed loop against a plain-torch nanoGPT-style loop.

    .venv/bin/python benchmarks/train.py [--preset tiny] [--steps 60] [--batch 8] [--seq 256] [--rounds 3]

Both train on the same random tokens, with the same batch, context, thread count and
device, for --steps steps after --warmup untimed ones:
  forja     model.train launched as the pretrain task launches it (tasks.pretrain.launch_command:
            one rank runs alone, more under the deepspeed launcher), in the environment it
            gives its ranks (tasks.pretrain.child_env): DeepSpeed engine (ZeRO 0, gloo or
            nccl), fused CPU kernels (model/kernels.py), gradient-norm check, metrics
  baseline  the nanoGPT-architecture model in benchmarks/nanogpt.py with the parameter count
            closest to forja's, torch AdamW, a bare forward/backward/step loop, run as a
            plain script runs (torch AdamW unfused on a CPU, as nanoGPT chooses); also in
            forja's environment (on a CPU the allocator setting of
            model.train.cpu_allocator_env), printed beside it so the share of the model and
            loop and the share of the environment are both visible
Each of --rounds rounds runs all three, one after another in a rotated order, each in its
own process; the medians over rounds are compared (a shared machine's speed drifts by
10-20% from minute to minute, which one run of each would read as a difference).
MFU is FLOPs per token (6N + attention) x tokens/s over one peak measured here (a matmul
in the training dtype on the CPU; the datasheet bf16 peak on known GPUs). On a GPU, run it with
--preset gpt2-124m --seq 1024 --batch 16 --precision bf16 (benchmarks/gpu.sh does). The last
line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from model import monitor, train as forja_train  # noqa: E402
from model.config import from_preset  # noqa: E402
from model.gpt import GPT  # noqa: E402
from nanogpt import NanoGPT, optimizer, width_for  # noqa: E402
from tasks.config import PretrainConfig  # noqa: E402
from tasks.pretrain import child_env, launch_command  # noqa: E402


def baseline_rate(cfg, rows: np.ndarray, batch: int, steps: int, warmup: int, device: str, dtype) -> float:
    torch.manual_seed(0)
    model = baseline_model(cfg).to(device)
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
    return batch * cfg.block_size * steps / (time.perf_counter() - t0)


def baseline_model(cfg) -> NanoGPT:
    d = width_for(GPT(cfg).num_params(), cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head)
    return NanoGPT(cfg.vocab_size, cfg.block_size, cfg.n_layer, d, cfg.n_head)


def forja_rate(launch: PretrainConfig, tmp: Path, env: dict, warmup: int) -> float:
    """forja exactly as the pretrain task runs it: its launch command for one rank, its environment."""
    shutil.rmtree(tmp / "out", ignore_errors=True)
    shutil.rmtree(tmp / "ckpt", ignore_errors=True)
    done = subprocess.run(launch_command(launch, tmp / "spec.json"), env=env, cwd=ROOT, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"forja's training failed:\n{done.stdout[-3000:]}")
    print("\n".join("  " + x for x in done.stdout.splitlines() if x.startswith("model:")))
    logged = [json.loads(x) for x in (tmp / "out" / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in logged if r["step"] > warmup]
    return len(timed) / sum(1 / r["tokens_per_s"] for r in timed)  # per interval, weighted by its length


def baseline_in(env: dict) -> float:
    """The baseline in its own process with the given environment (glibc reads it at start)."""
    done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--baseline-only"], env=env, cwd=ROOT,
                          text=True, capture_output=True)
    if done.returncode:
        raise SystemExit(f"the baseline failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])["tokens_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are compared")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="pretrain.precision for forja; the baseline autocasts to the same dtype")
    ap.add_argument("--baseline-only", action="store_true", help=argparse.SUPPRESS)  # one baseline round
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = forja_train.device_and_dtype(args.precision)
    cfg = from_preset(args.preset, args.vocab, args.seq)
    rows = np.random.default_rng(0).integers(0, args.vocab, size=(4096, args.seq + 1)).astype(np.uint16)
    if args.baseline_only:
        print(json.dumps({"tokens_per_s": baseline_rate(cfg, rows, args.batch, args.steps, args.warmup, device, dtype)}))
        return
    peak, source = monitor.peak_flops(device, dtype)
    print(f"device {device} ({dtype}), {args.threads} threads; peak {peak / 1e9:.0f} GFLOP/s ({source})")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        np.save(tmp / "train.npy", rows)
        np.save(tmp / "val.npy", rows[:64])
        from tokenizers import Tokenizer, models

        Tokenizer(models.BPE()).save(str(tmp / "tok.json"))
        every = max(1, args.steps // 6)
        if args.warmup % every:
            raise SystemExit(f"--warmup ({args.warmup}) must be a multiple of the log interval ({every})")
        spec = forja_train.TrainSpec(
            model=asdict(cfg), train_files=[str(tmp / "train-00000.parquet")], val_files=[str(tmp / "val-00000.parquet")],
            tokenizer=str(tmp / "tok.json"), out_dir=str(tmp / "out"), checkpoint_dir=str(tmp / "ckpt"),
            max_steps=args.warmup + args.steps, micro_batch_size=args.batch, warmup_steps=min(10, args.warmup),
            log_every=every, eval_every=10**9, eval_batches=1, checkpoint_every=10**9, threads=args.threads,
            precision=args.precision)
        (tmp / "spec.json").write_text(json.dumps(asdict(spec)))
        launch = PretrainConfig(threads=args.threads)
        forja_env = child_env(None, launch) | {"OMP_NUM_THREADS": str(args.threads)}
        plain_env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        # The baseline runs as a plain script runs (default allocator) and, to show what the model
        # and loop alone account for, in forja's environment as well (on a CPU: the allocator
        # setting of model.train.cpu_allocator_env). Each round runs the three in a rotated order
        # so that a slow minute on a shared machine does not fall on one of them every time.
        runs = {"forja": lambda: forja_rate(launch, tmp, forja_env, args.warmup),
                "baseline": lambda: baseline_in(plain_env),
                "baseline_same_env": lambda: baseline_in(forja_env)}
        rates: dict[str, list[float]] = {k: [] for k in runs}
        for r in range(args.rounds):
            order = list(runs)[r % len(runs):] + list(runs)[: r % len(runs)]
            for name in order:
                rates[name].append(runs[name]())
            print(f"round {r + 1}: " + ", ".join(f"{k} {rates[k][-1]:.0f}" for k in runs) + " tokens/s"
                  f"; ratio {rates['forja'][-1] / rates['baseline'][-1]:.3f}", flush=True)

    forja_model, base_model = GPT(cfg), baseline_model(cfg)
    forja_tps, base_tps, same_tps = (float(np.median(rates[k])) for k in runs)
    forja_mfu = forja_model.flops_per_token() * forja_tps / peak
    base_mfu, same_mfu = (base_model.flops_per_token() * tps / peak for tps in (base_tps, same_tps))
    print(f"medians of {args.rounds} rounds:")
    print(f"forja:    {forja_model.num_params() / 1e6:.2f}M params, {forja_tps:8.0f} tokens/s, MFU {forja_mfu:.3f}")
    print(f"baseline: {base_model.num_params() / 1e6:.2f}M params, {base_tps:8.0f} tokens/s, MFU {base_mfu:.3f}")
    print(f"baseline in forja's environment ({', '.join(k for k in forja_env if k.startswith('MALLOC'))}): "
          f"{same_tps:8.0f} tokens/s, MFU {same_mfu:.3f}")
    print(json.dumps({"preset": args.preset, "device": device, "dtype": str(dtype).removeprefix("torch."),
                      "peak_flops": peak, "peak_source": source, "rounds": args.rounds,
                      "tokens_per_s": round(forja_tps, 1), "mfu": round(forja_mfu, 4),
                      "baseline_tokens_per_s": round(base_tps, 1), "baseline_mfu": round(base_mfu, 4),
                      "mfu_ratio": round(forja_mfu / base_mfu, 3),
                      "baseline_same_env_mfu": round(same_mfu, 4), "mfu_ratio_same_env": round(forja_mfu / same_mfu, 3),
                      "round_tokens_per_s": {k: [round(x) for x in v] for k, v in rates.items()}}))


if __name__ == "__main__":
    main()
