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

from model import checkpoint, kernels, monitor, optim
from model.records import write_rank_record
from model.faults import fault_point
from model.config import ModelConfig
from model.data import Batches, eval_batches, open_mask, open_rows
from model.gpt import GPT
from model.precision import check_precision, device_and_dtype, precision_name

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
    precision: str = "auto"  # "fp32", "bf16", or "auto": bf16 on a GPU that supports it, else fp32
    optimizer: str = "adamw"  # or "muon": Muon on the blocks' 2-D matrices, AdamW on the rest
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 8
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    seed: int = 1337
    threads: int = 0
    zero_stage: int = 0
    schedule: str = "cosine"  # or "wsd": warmup, stable, then a linear decay over decay_fraction
    decay_fraction: float = 0.2
    data_key: str = ""  # the tokenize stage's key: a checkpoint only resumes on the same data
    sample_every: int = 0  # generations from sample_prompts every this many steps (0: never)
    sample_prompts: list[str] = field(default_factory=list)
    sample_tokens: int = 32
    grad_norms_every: int = 0  # per-layer gradient norms every this many steps (0: never)
    init_from: str = ""  # a model folder whose weights training starts from (fine-tuning)
    lora_rank: int = 0  # > 0: train low-rank adapters on lora_targets only, merged at the end
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: ["qkv", "o_proj", "gate_up", "down"])
    extra: dict = field(default_factory=dict)


def lr_factor(step: int, warmup: int, max_steps: int, min_ratio: float, schedule: str = "cosine",
              decay_fraction: float = 0.2) -> float:
    """Linear warmup to 1, then to min_ratio at max_steps: a cosine ("cosine"), or flat until
    the last decay_fraction of the steps and a linear decay there ("wsd", warmup-stable-decay)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "wsd":
        decay_start = max(warmup, max_steps - round(decay_fraction * max_steps))
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
        return 1.0 - (1 - min_ratio) * progress
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def free_port() -> int:
    """A TCP port free on loopback right now (for torch.distributed's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_allocator_env() -> dict[str, str]:
    """glibc malloc settings for training on a CPU: keep freed memory in the process.

    By default glibc serves each large tensor from a fresh mmap and unmaps it when freed, so
    every activation of every step faults its pages in again: about an eighth of a tiny
    model's step here. With mmap off and trimming out of reach, freed blocks are reused
    and the process keeps its peak resident memory, which a training process reaches every
    step anyway. (CPU tuning guides give the same advice with jemalloc or tcmalloc.) Read by
    glibc at process start, so the launcher sets them for its ranks.
    """
    return {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}


def ensure_dist_env() -> None:
    """DeepSpeed needs the torch.distributed variables even for a single process. On a GPU machine
    each rank then takes its own GPU (LOCAL_RANK) before anything touches one: else every rank's
    first CUDA work (the bf16 probe, NCCL's set-up, the model) lands on GPU 0."""
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(k, v)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))


def import_deepspeed():
    """deepspeed, imported without MLflow in a rank that logs nothing to MLflow (MetricSink: rank 0
    of a run with MLFLOW_RUN_ID). DeepSpeed's autotuner imports mlflow when it can, for its own
    runs, which forja never starts: 1.6 s of a tiny run's 7 here. A None in sys.modules makes that
    optional import fail as if MLflow were absent; it is taken out again once DeepSpeed is in."""
    if "deepspeed" in sys.modules or "mlflow" in sys.modules or (
            os.environ.get("MLFLOW_RUN_ID") and os.environ.get("RANK", "0") == "0"):
        import deepspeed

        return deepspeed
    sys.modules["mlflow"] = None
    try:
        import deepspeed
    finally:
        if sys.modules.get("mlflow", 0) is None:
            del sys.modules["mlflow"]
    return deepspeed


SHM_COMM = "deepspeed_shm_comm"


def without_shm_comm(deepspeed) -> None:
    """Tell DeepSpeed its shared-memory all-reduce op is unavailable before it sets up its comm
    backend. That op serves DeepSpeed's inference all-reduce only; training's collectives go through
    torch.distributed (gloo, nccl). Building it cost every fresh machine a minute of compiling at
    its first training run, and each run left one buffer a rank in /dev/shm (drop_shm_buffers).
    DeepSpeed keeps the compatibility table it consults in its ops module, once a process."""
    deepspeed.ops.__compatible_ops__[SHM_COMM] = False


def build_engine(model: GPT, spec: TrainSpec):
    """Wrap model in a DeepSpeed engine with AdamW (or Muon plus AdamW, model/optim.py), the
    warmup-cosine or wsd LR schedule and clipping."""
    # DeepSpeed picks its accelerator at import; say it rather than let it guess.
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    kernels.own_build_tools()  # DeepSpeed builds its ops with the same ninja as the kernels
    deepspeed = import_deepspeed()
    ensure_dist_env()
    device, dtype = device_and_dtype(spec.precision)
    if not torch.distributed.is_initialized():
        without_shm_comm(deepspeed)
        deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo", verbose=False)
    schedule = lambda s: lr_factor(  # noqa: E731
        s, spec.warmup_steps, spec.max_steps, spec.min_lr_ratio, spec.schedule, spec.decay_fraction)
    if spec.optimizer == "muon":
        if why := optim.refusal(spec.optimizer, spec.zero_stage, spec.lora_rank, spec.grad_clip):
            raise ValueError(why)
        # DeepSpeed builds Muon from its config; the schedule scales every group, so both halves.
        engine, _, _, _ = deepspeed.initialize(
            model=model.to(device), model_parameters=optim.param_groups(model, spec.weight_decay),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
            config=deepspeed_config(spec, dtype))
        optim.check_halves(engine.module)
        checkpoint.use_safe_loading(engine)
        return engine, device
    trained = [p for p in model.parameters() if p.requires_grad]  # LoRA freezes the base weights
    decay = [p for p in trained if p.dim() >= 2]
    no_decay = [p for p in trained if p.dim() < 2]
    groups = [g for g in ({"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0})
              if g["params"]]  # DeepSpeed drops empty groups (LoRA leaves no trainable norm weights)
    # fused: one kernel over all parameters (CUDA, and fp32/bf16 on a CPU: ~4x faster than foreach here)
    opt = torch.optim.AdamW(groups, lr=spec.lr, betas=tuple(spec.betas), fused=device in ("cuda", "cpu"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    engine, opt, _, sched = deepspeed.initialize(
        model=model.to(device), optimizer=opt, lr_scheduler=sched, config=deepspeed_config(spec, dtype)
    )
    checkpoint.use_safe_loading(engine)
    return engine, device


def deepspeed_config(spec: TrainSpec, dtype: torch.dtype) -> dict:
    """DeepSpeed's JSON config, from forja's pretrain settings (with Muon, its optimizer too)."""
    config = {
        "train_micro_batch_size_per_gpu": spec.micro_batch_size,
        "gradient_accumulation_steps": spec.grad_accum_steps,
        "gradient_clipping": spec.grad_clip,
        "zero_optimization": {"stage": spec.zero_stage},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if spec.optimizer == "muon":
        config["optimizer"] = optim.optimizer_config(spec.lr, spec.betas, spec.muon_lr, spec.muon_momentum)
        if spec.zero_stage == 3:  # DeepSpeed's ZeRO-3 Muon gathers whole gradients itself
            config["zero_optimization"]["reduce_scatter"] = False
    return config


@torch.no_grad()
def first_nonfinite_grad(model: torch.nn.Module) -> str | None:
    """The parameter, in backward order, whose gradient is NaN or inf first. Backward visits the
    layers last to first and a non-finite gradient spreads to everything before it, so the
    first one met from the output end is where it started. Read only once the global norm says
    something went wrong: a check per parameter per step would cost a pass over every gradient."""
    for name, p in reversed(list(model.named_parameters())):
        if p.grad is not None and not torch.isfinite(p.grad).all():
            return name
    return None


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


@torch.no_grad()
def evaluate_loss(model: GPT, rows: np.ndarray, batch_size: int, max_batches: int, device, mask=None,
                  rank: int = 0, world: int = 1) -> float:
    """Mean next-token loss over the first batch_size x max_batches held-out rows, weighted by the
    targets each row counts (a fine-tuning mask's prompt tokens count nothing). With several ranks
    the rows are shared out among them in batches of batch_size and the sums reduced: every rank
    gets the same number, for the same rows however a training run splits its batch. Every rank
    runs the same number of forward passes, since ZeRO 3 gathers weights in each: one whose share
    ran out repeats a batch that counts nothing."""
    n = min(len(rows), batch_size * max_batches)
    share = -(-n // world)
    lo, hi = min(rank * share, n), min((rank + 1) * share, n)
    sums = torch.zeros(2, dtype=torch.float64)  # loss x targets, targets
    passes = 0
    model.eval()
    for x, y in eval_batches(rows[lo:hi], batch_size, share, device, None if mask is None else mask[lo:hi]):
        counted = int((y != -100).sum())
        loss = float(model(x, y)[1])
        if counted:  # a batch with no target to learn has a NaN mean: it adds nothing
            sums += torch.tensor([loss * counted, counted], dtype=torch.float64)
        passes += 1
    for x, y in eval_batches(rows, batch_size, -(-share // batch_size) - passes, device, mask):
        model(x, y)  # this rank's share ran out: keep step with the others' gathers
    model.train()
    if world > 1:
        sums = monitor.sum_over_ranks(sums)
    return float(sums[0] / sums[1]) if sums[1] else float("nan")


def fault(point: str, step: int) -> None:
    """Fault injection for the resume tests: FORJA_FAULT=point:step kills this process there."""
    fault_point(f"{point}:{step}")


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def save(engine, ckpt_dir: Path, step: int, fingerprint: dict, rank: int, keep: int) -> None:
    """DeepSpeed's checkpoint of every rank, then the commit marker, then pruning (rank 0)."""
    state = {"step": step, "rng_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["rng_cuda"] = torch.cuda.get_rng_state()
    tag_dir = ckpt_dir / f"step-{step}"
    with checkpoint.saving(tag_dir):  # a full disk: a clear error, and no half checkpoint left
        engine.save_checkpoint(str(ckpt_dir), tag=tag_dir.name, client_state=state, save_latest=False)
        fault("checkpoint-files-written", step)
        barrier()
        if rank == 0:
            checkpoint.commit(tag_dir, step, fingerprint)
    if rank == 0:
        checkpoint.prune(ckpt_dir, keep)
    barrier()


def run_fingerprint(spec: TrainSpec, world: int, dtype: torch.dtype = torch.float32) -> dict:
    """What a checkpoint must share with the run resuming it: the model, tokenizer and data, and
    what decides which rows each step draws (batch shape, world size, seed) and how the checkpoint
    is laid out (ZeRO stage, and the dtype when not fp32). Fine-tuning adds its base and LoRA rank.
    Another world size with the same global batch resumes (checkpoint.refuse_mismatch, model/reshard.py)."""
    fp = {"model": spec.model, "tokenizer_sha256": checkpoint.file_sha256(spec.tokenizer), "data_key": spec.data_key,
          "batch": {"micro_batch_size": spec.micro_batch_size, "grad_accum_steps": spec.grad_accum_steps,
                    "seq_len": spec.model.get("block_size"), "world_size": world},
          "seed": spec.seed, "zero_stage": spec.zero_stage}
    if spec.init_from or spec.lora_rank:  # not in a pretraining fingerprint: its checkpoints still resume
        fp |= {"init_from": spec.init_from, "lora_rank": spec.lora_rank}
    if spec.optimizer != "adamw":  # AdamW's checkpoints keep their fingerprint; Muon's state does not load there
        fp["optimizer"] = spec.optimizer
    if dtype != torch.float32:  # fp32 checkpoints keep their fingerprint
        fp["precision"] = precision_name(dtype)
    return fp


def memory_estimate(cfg: ModelConfig, spec: TrainSpec, dtype: torch.dtype, world: int) -> dict:
    """monitor.memory_estimate for this run's optimizer: Muon keeps one momentum buffer on the
    blocks' matrices where AdamW keeps two moments."""
    est = monitor.memory_estimate(cfg, spec.micro_batch_size, spec.zero_stage, world, dtype != torch.float32)
    if spec.optimizer == "muon":
        saved = optim.muon_saving_bytes(cfg, spec.zero_stage, world)
        est = est | {"states_bytes": est["states_bytes"] - saved, "total_bytes": est["total_bytes"] - saved}
    return est


def check_memory(cfg: ModelConfig, spec: TrainSpec, device: str, dtype: torch.dtype, world: int, preset: str) -> None:
    """Fail before training when the model cannot fit, with the estimate and what to change."""
    est = memory_estimate(cfg, spec, dtype, world)
    have = monitor.device_memory(device)
    if est["total_bytes"] > 0.9 * have:
        gib = 2**30
        raise MemoryError(
            f"{preset} ({est['params'] / 1e6:.0f}M parameters) needs about {est['total_bytes'] / gib:.1f} GiB per "
            f"rank on {device} (weights, gradients and {spec.optimizer} state {est['states_bytes'] / gib:.1f} GiB "
            f"with ZeRO stage {spec.zero_stage} over {world} rank(s), activations "
            f"{est['activation_bytes'] / gib:.1f} GiB at micro-batch {spec.micro_batch_size}) but {have / gib:.1f} GiB is available. Choose a smaller pretrain.preset, raise "
            "pretrain.zero_stage and the number of GPUs, or lower pretrain.micro_batch_size (raising "
            "grad_accum_steps to keep the batch)")


def train(spec: TrainSpec) -> dict:
    """Train to spec.max_steps, resuming from the newest complete checkpoint; returns a summary."""
    if why := optim.refusal(spec.optimizer, spec.zero_stage, spec.lora_rank, spec.grad_clip):
        raise ValueError(why)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    cfg = ModelConfig(**spec.model)
    ensure_dist_env()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # Refused before an engine is built: another run's checkpoints, a corrupt metrics curve.
    ckpt_dir, out_dir = Path(spec.checkpoint_dir), Path(spec.out_dir)
    device, dtype = device_and_dtype(spec.precision)  # bf16 where the device lacks it: refused here
    fingerprint = run_fingerprint(spec, world, dtype)
    check_precision(ckpt_dir, dtype)
    checkpoint.check_newest(ckpt_dir, fingerprint)
    metrics_file = ckpt_dir / "metrics.jsonl"  # beside the checkpoints: the curve of the run they belong to
    if rank == 0:
        monitor.read_metrics(metrics_file)
    check_memory(cfg, spec, device, dtype, world, spec.extra.get("preset", "this model"))
    model = GPT(cfg)
    if spec.init_from:
        from safetensors.torch import load_model

        from model.generate import WEIGHTS

        load_model(model, str(Path(spec.init_from) / WEIGHTS))
    if spec.lora_rank:
        from model import lora

        n = lora.apply(model, spec.lora_rank, spec.lora_alpha, tuple(spec.lora_targets))
        print(f"LoRA rank {spec.lora_rank} on {', '.join(spec.lora_targets)}: {n / 1e3:.1f}K trainable parameters",
              flush=True)
    if dtype != torch.float32:  # DeepSpeed casts the parameters; the RoPE tables are buffers
        model = model.to(dtype)
    fused = device == "cpu" and dtype == torch.float32 and model.use_fused_kernels()  # fp32-only kernels
    engine, device = build_engine(model, spec)
    peak, peak_source = monitor.peak_flops(device, dtype)
    print(f"model: {model.num_params() / 1e6:.2f}M parameters, {model.flops_per_token() / 1e6:.1f} MFLOPs/token, "
          f"device {device} ({dtype}{', fused CPU kernels' if fused else ''}), world {world}, ZeRO stage {spec.zero_stage}; "
          f"peak {peak / 1e9:.0f} GFLOP/s per rank ({peak_source})", flush=True)

    train_rows, val_rows = open_rows(spec.train_files), open_rows(spec.val_files)
    val_mask = open_mask(spec.val_files)  # fine-tuning data: learn the responses only
    batches = Batches(train_rows, spec.micro_batch_size, spec.seed, rank, world, mask=open_mask(spec.train_files),
                      accum=spec.grad_accum_steps)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = checkpoint.resume(engine, ckpt_dir, fingerprint)

    sink = None
    if rank == 0:  # cut back to the resumed step: a killed and resumed run has one curve from step 1
        monitor.restart_metrics(metrics_file, start)
        sink = monitor.MetricSink(metrics_file)
    tokenizer = None
    if rank == 0 and spec.sample_every and spec.sample_prompts and spec.zero_stage < 3:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(spec.tokenizer)

    tokens_per_step = spec.micro_batch_size * spec.grad_accum_steps * world * cfg.block_size
    flops_per_step = model.flops_per_token() * tokens_per_step
    t0, last_t, last_step = time.time(), time.time(), start
    train_loss = val_loss = float("nan")
    for step in range(start, spec.max_steps):
        done = step + 1
        loss_acc, layer_norms = 0.0, {}
        for micro in range(spec.grad_accum_steps):
            x, y = batches.get(step * spec.grad_accum_steps + micro, device)
            last = micro == spec.grad_accum_steps - 1
            poisoned = poison_gradient(engine.module, done) if last else None
            _, loss = engine(x, y)
            engine.backward(loss)
            loss_acc += float(loss.detach()) / spec.grad_accum_steps
            if last:
                if poisoned is not None:
                    poisoned.remove()
                # Each rank's part of the gradients (whole, or its ZeRO partition), reduced: every stage.
                norms = monitor.GradNorms.of(engine.module)
                gnorm = norms.total()
                if spec.grad_norms_every and done % spec.grad_norms_every == 0:
                    layer_norms = norms.by_layer()
                lrs = {"lr": engine.get_lr()[0], **muon_lr(engine, spec)}  # with Muon, "lr" is its AdamW half's
                if not (math.isfinite(gnorm) and math.isfinite(loss_acc)):
                    # Stop before the optimizer applies it; keep the last good state to inspect.
                    where = (f"first non-finite output in {first_nonfinite_module(engine.module, x)}"
                             if not math.isfinite(loss_acc) else f"first non-finite gradient in {norms.first_nonfinite()}")
                    engine.save_checkpoint(str(ckpt_dir), tag=f"nonfinite-step-{step}",
                                           client_state={"step": step}, save_latest=False)
                    raise FloatingPointError(
                        f"step {step}: loss {loss_acc:.4g}, {where}; checkpoint saved as "
                        f"{ckpt_dir}/nonfinite-step-{step}. Lower pretrain.lr or raise warmup_steps"
                    )
            engine.step()
            fault("step", done)
        train_loss = loss_acc
        if done % spec.log_every == 0 or done == spec.max_steps:
            train_loss = monitor.mean_over_ranks(loss_acc, world)  # the global batch's loss, not rank 0's share
            now = time.time()
            tok_s = tokens_per_step * (done - last_step) / max(now - last_t, 1e-9)
            metrics = {"train_loss": train_loss, **lrs, "grad_norm": gnorm, "tokens_per_s": tok_s,
                       "mfu": flops_per_step * (done - last_step) / max(now - last_t, 1e-9) / (peak * world),
                       **monitor.memory_metrics(device), **layer_norms}
            if done % spec.eval_every == 0 or done == spec.max_steps:
                # eval_batches global batches of rows, shared out over the ranks: the same rows on any layout
                val_loss = evaluate_loss(engine.module, val_rows, spec.micro_batch_size,
                                         spec.eval_batches * spec.grad_accum_steps * world, device, val_mask, rank, world)
                metrics |= {"val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50))}
            if sink is not None:
                sink.log(done, metrics)
            last_t, last_step = time.time(), done
        if tokenizer is not None and (done % spec.sample_every == 0 or done == spec.max_steps):
            write_samples(engine.module, tokenizer, spec, done, out_dir, sink)
        if done % spec.checkpoint_every == 0 and done < spec.max_steps:
            save(engine, ckpt_dir, done, fingerprint, rank, spec.keep_checkpoints)

    summary = {"steps": spec.max_steps, "resumed_from": start, "train_loss": train_loss, "val_loss": val_loss,
               "tokens": tokens_per_step * (spec.max_steps - start), "seconds": time.time() - t0,
               "params": model.num_params(), "world_size": world, "zero_stage": spec.zero_stage,
               "precision": precision_name(dtype)}
    write_rank_record(engine.module, batches, start * spec.grad_accum_steps, out_dir, rank)
    from model.generate import save_folder

    with gathered(engine.module, spec.zero_stage):  # ZeRO-3: every rank helps rebuild the full weights
        if rank == 0:
            if spec.lora_rank:  # the adapters alone, then folded in: the folder is a plain model
                from safetensors.torch import save_file

                from model import lora

                save_file(lora.adapter_state(engine.module), str(out_dir / "adapter.safetensors"))
                lora.merge(engine.module)
            save_folder(engine.module, Path(spec.tokenizer), out_dir)
        (out_dir / "metrics.jsonl").write_text(metrics_file.read_text())
        (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    barrier()
    return summary


NAN_TARGET = "blocks.0.mlp.down.weight"


def poison_gradient(module: torch.nn.Module, step: int):
    """Fault injection for the non-finite guard's tests: FORJA_FAULT=nan-grad:N makes step N's
    gradient of NAN_TARGET NaN while the loss stays finite. A hook handle to remove, or None."""
    from model.faults import armed

    if not armed(f"nan-grad:{step}"):
        return None
    return dict(module.named_parameters())[NAN_TARGET].register_hook(lambda g: torch.full_like(g, float("nan")))


def muon_lr(engine, spec: TrainSpec) -> dict:
    """{"muon_lr": the Muon half's scheduled rate} when training with Muon, else {}."""
    if spec.optimizer != "muon":
        return {}
    return {"muon_lr": next(g["lr"] for g in engine.basic_optimizer.param_groups if g.get("use_muon"))}


def gathered(module: torch.nn.Module, zero_stage: int):
    """A context in which the module's parameters are whole: ZeRO-3 partitions them."""
    import contextlib

    if zero_stage < 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)


def write_samples(model: GPT, tokenizer, spec: TrainSpec, step: int, out_dir: Path, sink: "monitor.MetricSink | None") -> None:
    """Greedy continuations of the fixed prompts, appended to samples.txt and logged to MLflow."""
    from model.generate import Sampling, generate_text

    n = min(spec.sample_tokens, model.cfg.block_size // 2)  # leave the prompt room in the context
    try:
        texts = generate_text(model, tokenizer, spec.sample_prompts, Sampling(max_new_tokens=n, temperature=0.0))
    except Exception as e:  # a view of the model; never stop training over it
        print(f"samples at step {step} failed: {type(e).__name__}: {e}", flush=True)
        return
    finally:
        model.train()
    block = f"## step {step}\n\n" + "".join(f"{p!r} -> {t!r}\n" for p, t in zip(spec.sample_prompts, texts)) + "\n"
    with open(out_dir / "samples.txt", "a", encoding="utf-8") as f:
        f.write(block)
    print(f"samples at step {step}: {texts[0][:80]!r}", flush=True)
    if sink is not None and sink.mlflow is not None:
        sink.mlflow.log_text(sink.run_id, block, f"samples/step-{step:06d}.txt")


PARENT_ENV = "FORJA_PARENT_PID"  # set by the pretrain task to its own pid


def watch_parent(interval_s: float = 0.5) -> None:
    """Die with the process that started training: once the process FORJA_PARENT_PID names is gone
    (or a zombie), this one SIGKILLs itself; unset, nothing is watched.

    The pretrain task's direct child dies with it by PR_SET_PDEATHSIG, but under the deepspeed
    launcher a rank's parent is the launcher's per-node agent, which would outlive a killed task
    and keep its ranks training unattended. The last committed checkpoint stays, so a rerun resumes.
    """
    pid = os.environ.get(PARENT_ENV)
    if not pid:
        return
    import signal
    import threading

    import psutil

    try:
        parent = psutil.Process(int(pid))
    except psutil.NoSuchProcess:
        parent = None

    def gone() -> bool:
        try:  # is_running also compares the start time: a reused pid is not the parent
            return parent is None or not parent.is_running() or parent.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    def watch() -> None:
        while not gone():
            time.sleep(interval_s)
        os.kill(os.getpid(), signal.SIGKILL)  # nobody reads this process's output any more

    threading.Thread(target=watch, name="forja-parent-watchdog", daemon=True).start()


SHM = Path("/dev/shm")


def drop_shm_buffers(port: int | None, root: Path = SHM) -> list[Path]:
    """Remove the shared-memory buffers DeepSpeed's CPU collectives made for the run on `port`
    (deepspeed_allreduce_buffer_<rank>_<addr>_<port>[_<n>], one set per rank on this machine).
    DeepSpeed never unlinks them, and /dev/shm is memory: a few hundred runs filled 17 GB of it
    here. Removing a name another rank still maps is harmless: the memory goes when the last one unmaps it.
    Since without_shm_comm, forja's runs make none; this still clears what a run of an older forja,
    or a DeepSpeed that builds the op regardless, left on the port."""
    if port is None:
        return []
    gone = []
    for f in root.glob("deepspeed_allreduce_buffer_*"):
        parts = f.name.split("_")
        if str(port) in parts[-2:]:
            f.unlink(missing_ok=True)
            gone.append(f)
    return gone


def main(argv: list[str] | None = None) -> int:
    """`python -m model.train [--master_port P] SPEC.json`: one rank, under the deepspeed launcher
    (which sets RANK, WORLD_SIZE ...) or, with --master_port, alone: the whole world, rank 0 of 1."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 3 and argv[0] == "--master_port" and argv[1].isdigit():
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=argv[1])
        argv = argv[2:]
    if len(argv) != 1:
        print("usage: python -m model.train [--master_port PORT] SPEC.json", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    watch_parent()
    spec = TrainSpec(**json.loads(Path(argv[0]).read_text()))
    train(spec)
    if os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("MASTER_PORT"):
        drop_shm_buffers(int(os.environ["MASTER_PORT"]))  # this machine's, after a run that ended well
    return 0


if __name__ == "__main__":
    sys.exit(main())
