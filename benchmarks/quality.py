"""Model quality: forja's `tiny` preset against a nanoGPT-architecture model, same tokens and steps.

    .venv/bin/python benchmarks/quality.py [--config configs/demo.yaml] [--steps N]
        [--optimizer adamw|muon] [--muon-lr LR] [--muon-momentum M]

Runs the demo's data stages (crawl the bundled site, dedupe, normalize, tokenize) into a
temporary folder, then trains, in one run, on the same packed rows drawn in the same
seeded order, with the same AdamW settings, schedule, batch and number of steps:
  forja     the pretrain settings of the config, through model.train (DeepSpeed); with
            --optimizer muon, Muon on its blocks' matrices and AdamW on the rest (model/optim.py)
  baseline  benchmarks/nanogpt.py (learned positions, LayerNorm, GELU) with the parameter
            count closest to forja's, in a plain torch loop
and reports validation bits per byte of both on the whole validation split
(loss / ln 2 / bytes per token). The last line is one JSON object; ratio = bpb / baseline_bpb.
The baseline is the same AdamW nanoGPT whichever optimizer forja trains with.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from model import train as forja_train  # noqa: E402
from model.data import Batches, eval_batches, open_rows  # noqa: E402
from nanogpt import NanoGPT, optimizer, width_for  # noqa: E402
from tasks import crawl, dedupe, normalize, tokenization  # noqa: E402
from tasks.config import load_config  # noqa: E402
from tasks.pretrain import model_config  # noqa: E402


def data_stages(cfg, tmp: Path):
    """The demo's crawl → dedupe → normalize → tokenize, without Prefect; returns the tokenize folder and stats."""
    folders = {s: tmp / s for s in ("crawl", "dedupe", "normalize", "tokenize")}
    for f in folders.values():
        f.mkdir()
    os.chdir(ROOT)  # the config's paths are relative to the repository
    crawl.build(cfg.crawl, folders["crawl"])
    dedupe.build(cfg.dedupe, sorted(folders["crawl"].glob("documents-*.parquet")), folders["dedupe"], str(tmp))
    normalize.build(cfg.normalize, sorted(folders["dedupe"].glob("documents-*.parquet")), folders["normalize"])
    stats = tokenization.build(cfg.tokenize, sorted(folders["normalize"].glob("documents-*.parquet")), folders["tokenize"])
    return folders["tokenize"], stats


@torch.no_grad()
def val_loss(model, rows: np.ndarray, batch: int) -> float:
    model.eval()
    losses = [float(model(x, y)[1]) * len(x) for x, y in eval_batches(rows, batch, len(rows) // batch + 1)]
    return sum(losses) / len(rows)


def train_baseline(mcfg, rows: np.ndarray, pcfg, steps: int) -> NanoGPT:
    d = width_for(forja_train.GPT(mcfg).num_params(), mcfg.vocab_size, mcfg.block_size, mcfg.n_layer, mcfg.n_head)
    torch.manual_seed(pcfg.seed)
    model = NanoGPT(mcfg.vocab_size, mcfg.block_size, mcfg.n_layer, d, mcfg.n_head)
    opt = optimizer(model, pcfg.lr, pcfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: forja_train.lr_factor(
        s, pcfg.warmup_steps, steps, pcfg.min_lr_ratio, pcfg.schedule, pcfg.decay_fraction))
    batches = Batches(rows, pcfg.micro_batch_size, pcfg.seed)  # the same rows in the same order as forja
    model.train()
    for step in range(steps):
        x, y = batches.get(step)
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), pcfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 50 == 0:
            print(f"baseline step {step + 1} loss {float(loss):.4f}", flush=True)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--steps", type=int, default=None, help="default: the config's pretrain.max_steps")
    ap.add_argument("--optimizer", choices=("adamw", "muon"), default="adamw", help="forja's optimizer (default adamw)")
    ap.add_argument("--muon-lr", type=float, default=None, help="default: the config's pretrain.muon_lr")
    ap.add_argument("--muon-momentum", type=float, default=None, help="default: the config's pretrain.muon_momentum")
    args = ap.parse_args()
    cfg = load_config(args.config)
    pcfg = cfg.pretrain
    muon_lr = pcfg.muon_lr if args.muon_lr is None else args.muon_lr
    muon_momentum = pcfg.muon_momentum if args.muon_momentum is None else args.muon_momentum
    steps = args.steps or pcfg.max_steps
    torch.set_num_threads(pcfg.threads or os.cpu_count())
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok_dir, stats = data_stages(cfg, tmp)
        mcfg = model_config(pcfg, type("Tokens", (), {"stats": stats})())
        train_files = [str(p) for p in sorted(tok_dir.glob("train-*.parquet"))]
        val_files = [str(p) for p in sorted(tok_dir.glob("val-*.parquet"))]
        spec = forja_train.TrainSpec(
            model=asdict(mcfg), train_files=train_files, val_files=val_files, tokenizer=str(tok_dir / "tokenizer.json"),
            out_dir=str(tmp / "out"), checkpoint_dir=str(tmp / "ckpt"), max_steps=steps,
            micro_batch_size=pcfg.micro_batch_size, lr=pcfg.lr, min_lr_ratio=pcfg.min_lr_ratio,
            warmup_steps=pcfg.warmup_steps, weight_decay=pcfg.weight_decay, grad_clip=pcfg.grad_clip,
            schedule=pcfg.schedule, decay_fraction=pcfg.decay_fraction, log_every=50, eval_every=10**9,
            eval_batches=1, checkpoint_every=10**9, seed=pcfg.seed, threads=pcfg.threads,
            optimizer=args.optimizer, muon_lr=muon_lr, muon_momentum=muon_momentum)
        forja_train.train(spec)
        from model.generate import load_folder

        forja_model, _ = load_folder(tmp / "out")
        val_rows, train_rows = open_rows(val_files), open_rows(train_files)
        bpt = stats["val_bytes_per_token"]
        forja_bpb = val_loss(forja_model, val_rows, pcfg.micro_batch_size) / math.log(2) / bpt
        n_forja = forja_model.num_params()
        print(f"forja ({pcfg.preset}, {args.optimizer}, {n_forja / 1e6:.2f}M params): {forja_bpb:.4f} bits/byte",
              flush=True)  # known before the baseline's training starts
        base = train_baseline(mcfg, train_rows, pcfg, steps)
        base_bpb = val_loss(base, val_rows, pcfg.micro_batch_size) / math.log(2) / bpt
        n_base = base.num_params()
    muon = {"optimizer": "muon", "muon_lr": muon_lr, "muon_momentum": muon_momentum} if args.optimizer == "muon" else {}
    print(f"baseline (nanoGPT architecture, AdamW, {n_base / 1e6:.2f}M params): {base_bpb:.4f} bits/byte")
    print(json.dumps({"steps": steps, **muon, "params": n_forja, "baseline_params": n_base, "bpb": round(forja_bpb, 4),
                      "baseline_bpb": round(base_bpb, 4), "ratio": round(forja_bpb / base_bpb, 4)}))


if __name__ == "__main__":
    main()
