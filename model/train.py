"""The DeepSpeed training loop. Run as `python -m model.train SPEC.json`.

The pretrain task writes a spec (model shape, data files, hyper-parameters, output
folders) and starts this module in its own process, so DeepSpeed owns a clean process
group and the same entry point works under the `deepspeed` launcher later.
"""
from __future__ import annotations

import json
import logging
import math
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from model.config import ModelConfig
from model.data import Batches, eval_batches, open_rows
from model.gpt import GPT

log = logging.getLogger("forja.train")


@dataclass
class TrainSpec:
    model: dict
    train_files: list[str]
    val_files: list[str]
    tokenizer: str
    out_dir: str
    checkpoint_dir: str
    max_steps: int = 200
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 8
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    seed: int = 1337
    threads: int = 0
    extra: dict = field(default_factory=dict)


def lr_factor(step: int, warmup: int, max_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to min_ratio at max_steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def device_and_dtype() -> tuple[str, torch.dtype]:
    if torch.cuda.is_available():
        bf16 = torch.cuda.is_bf16_supported()
        return "cuda", torch.bfloat16 if bf16 else torch.float32
    return "cpu", torch.float32


def ensure_dist_env() -> None:
    """DeepSpeed needs the torch.distributed variables even for a single process."""
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(k, v)


def build_engine(model: GPT, spec: TrainSpec):
    """Wrap model in a DeepSpeed engine with AdamW, warmup-cosine LR and clipping."""
    # DeepSpeed picks its accelerator at import; say it rather than let it guess.
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed

    ensure_dist_env()
    device, dtype = device_and_dtype()
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo", verbose=False)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=spec.lr, betas=tuple(spec.betas), fused=device == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, spec.warmup_steps, spec.max_steps, spec.min_lr_ratio)
    )
    ds_config = {
        "train_micro_batch_size_per_gpu": spec.micro_batch_size,
        "gradient_accumulation_steps": spec.grad_accum_steps,
        "gradient_clipping": spec.grad_clip,
        "zero_optimization": {"stage": 0},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    engine, opt, _, sched = deepspeed.initialize(
        model=model.to(device), optimizer=opt, lr_scheduler=sched, config=ds_config
    )
    return engine, device


class GradWatch:
    """Finds the first parameter, in backward order, whose gradient is NaN or inf.

    The hooks only queue a finiteness flag per gradient (no host sync on a GPU); the flags
    are read when the global gradient norm says something went wrong.
    """

    def __init__(self, model: torch.nn.Module):
        self.flags: list[tuple[str, torch.Tensor]] = []
        self.handles = [p.register_hook(self._hook(n)) for n, p in model.named_parameters() if p.requires_grad]

    def _hook(self, name: str):
        def record(grad: torch.Tensor) -> None:
            self.flags.append((name, torch.isfinite(grad).all()))
        return record

    @property
    def first(self) -> str | None:
        return next((name for name, ok in self.flags if not bool(ok)), None)

    def reset(self) -> None:
        self.flags.clear()


@torch.no_grad()
def first_nonfinite_module(model: torch.nn.Module, x: torch.Tensor) -> str | None:
    """Rerun the forward pass on x and name the first module whose output is NaN or inf."""
    found: list[str] = []

    def hook(name):
        def check(_mod, _inp, out):
            if not found and isinstance(out, torch.Tensor) and not torch.isfinite(out).all():
                found.append(name)
        return check

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n and not list(m.children())]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def grad_norm(model: torch.nn.Module) -> float:
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


@torch.no_grad()
def evaluate_loss(model: GPT, rows: np.ndarray, batch_size: int, max_batches: int, device) -> float:
    model.eval()
    losses = [float(model(x, y)[1]) for x, y in eval_batches(rows, batch_size, max_batches, device)]
    model.train()
    return sum(losses) / len(losses)


class MetricSink:
    """Metrics to stdout, to metrics.jsonl and, when a run id is set, to MLflow."""

    def __init__(self, path: Path):
        self.file = open(path, "a")
        self.mlflow = None
        if os.environ.get("MLFLOW_RUN_ID"):
            import mlflow

            self.mlflow = mlflow.MlflowClient()
            self.run_id = os.environ["MLFLOW_RUN_ID"]

    def log(self, step: int, metrics: dict) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        print(f"step {step:>6} " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)
        if self.mlflow is not None:
            from mlflow.entities import Metric

            ts = int(time.time() * 1000)
            self.mlflow.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])


def prune_checkpoints(ckpt_dir: Path, keep: int) -> None:
    tags = sorted((p for p in ckpt_dir.glob("step-*") if p.is_dir()), key=lambda p: int(p.name[5:]))
    for old in tags[:-keep]:
        for f in sorted(old.rglob("*"), reverse=True):
            f.unlink() if f.is_file() else f.rmdir()
        old.rmdir()


def train(spec: TrainSpec) -> dict:
    """Train to spec.max_steps, resuming from the newest checkpoint; returns a summary."""
    if spec.threads:
        torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    cfg = ModelConfig(**spec.model)
    model = GPT(cfg)
    engine, device = build_engine(model, spec)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    print(f"model: {model.num_params() / 1e6:.2f}M parameters, {model.flops_per_token() / 1e6:.1f} MFLOPs/token, "
          f"device {device}, world {world}", flush=True)

    train_rows, val_rows = open_rows(spec.train_files), open_rows(spec.val_files)
    batches = Batches(train_rows, spec.micro_batch_size, spec.seed, rank, world)
    ckpt_dir, out_dir = Path(spec.checkpoint_dir), Path(spec.out_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)

    start = 0
    if (ckpt_dir / "latest").exists():
        path, client = engine.load_checkpoint(str(ckpt_dir))
        if path is None:
            raise RuntimeError(f"checkpoint in {ckpt_dir} could not be loaded; delete it to start over")
        start = int(client["step"])
        print(f"resumed from {path} at step {start}", flush=True)

    sink = MetricSink(out_dir / "metrics.jsonl")
    tokens_per_step = spec.micro_batch_size * spec.grad_accum_steps * world * cfg.block_size
    watch = GradWatch(engine.module)
    t0, last_t, last_step = time.time(), time.time(), start
    train_loss = val_loss = float("nan")
    for step in range(start, spec.max_steps):
        loss_acc = 0.0
        for micro in range(spec.grad_accum_steps):
            x, y = batches.get(step * spec.grad_accum_steps + micro, device)
            _, loss = engine(x, y)
            engine.backward(loss)
            loss_acc += float(loss.detach()) / spec.grad_accum_steps
            if micro == spec.grad_accum_steps - 1:
                gnorm = grad_norm(engine.module)
                lr = engine.get_lr()[0]
                if not (math.isfinite(gnorm) and math.isfinite(loss_acc)):
                    # Stop before the optimizer applies it; keep the last good state to inspect.
                    where = (f"first non-finite output in {first_nonfinite_module(engine.module, x)}"
                             if not math.isfinite(loss_acc) else f"first non-finite gradient in {watch.first}")
                    engine.save_checkpoint(str(ckpt_dir), tag=f"nonfinite-step-{step}", client_state={"step": step})
                    raise FloatingPointError(
                        f"step {step}: loss {loss_acc:.4g}, {where}; checkpoint saved as "
                        f"{ckpt_dir}/nonfinite-step-{step}. Lower pretrain.lr or raise warmup_steps"
                    )
            engine.step()
        watch.reset()
        train_loss, done = loss_acc, step + 1
        if done % spec.log_every == 0 or done == spec.max_steps:
            now = time.time()
            metrics = {"train_loss": train_loss, "lr": lr, "grad_norm": gnorm,
                       "tokens_per_s": tokens_per_step * (done - last_step) / max(now - last_t, 1e-9)}
            if done % spec.eval_every == 0 or done == spec.max_steps:
                val_loss = evaluate_loss(engine.module, val_rows, spec.micro_batch_size, spec.eval_batches, device)
                metrics |= {"val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50))}
            if rank == 0:
                sink.log(done, metrics)
            last_t, last_step = time.time(), done
        if done % spec.checkpoint_every == 0 and done < spec.max_steps:
            engine.save_checkpoint(str(ckpt_dir), tag=f"step-{done}", client_state={"step": done})
            if rank == 0:
                prune_checkpoints(ckpt_dir, spec.keep_checkpoints)

    summary = {"steps": spec.max_steps, "resumed_from": start, "train_loss": train_loss, "val_loss": val_loss,
               "tokens": tokens_per_step * (spec.max_steps - start), "seconds": time.time() - t0,
               "params": model.num_params()}
    if rank == 0:
        from model.generate import save_folder

        save_folder(engine.module, Path(spec.tokenizer), out_dir)
        (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m model.train SPEC.json", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    spec = TrainSpec(**json.loads(Path(argv[0]).read_text()))
    train(spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
