"""What a training run reports besides its loss: MFU, memory, per-layer gradients, samples,
whether a model fits the device before any time is spent on it, and the metrics.jsonl curve
that survives crashes (a torn last line is repaired, a resume cuts it back to its step)."""
from __future__ import annotations

import json
import math
import os
import resource
import time
from collections import defaultdict
from pathlib import Path

import torch

from model.config import ModelConfig

# Dense bf16 tensor-core peaks (FLOP/s) by device name; other GPUs are measured.
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
                 "L40S": 362e12, "L4": 121e12, "A10G": 70e12, "RTX 4090": 165e12}


def measured_matmul_peak(device: str, dtype: torch.dtype, size: int = 1024, seconds: float = 0.5) -> float:
    """FLOP/s of square matmuls on this device with the current thread count."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
        if device == "cuda":
            torch.cuda.synchronize()
    return 2 * size**3 * n / (time.perf_counter() - t0)


PEAK_ENV = "FORJA_PEAK_FLOPS"


def peak_flops(device: str, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s of one rank's device, where the figure comes from): FORJA_PEAK_FLOPS when set (a
    datasheet figure, or one measured once on a quiet machine: a matmul measured at start reads low
    while other work shares the machine, and MFU then reads high), else the datasheet bf16 peak of
    a known GPU, else a matmul measured now."""
    if fixed := os.environ.get(PEAK_ENV):
        try:
            value = float(fixed)
        except ValueError:
            value = 0.0
        if not (value > 0 and value != float("inf")):
            raise ValueError(f"{PEAK_ENV}={fixed!r} is not a positive number of FLOP/s per rank (e.g. 3.9e11); "
                             "fix it, or unset it to measure the peak when training starts")
        return value, PEAK_ENV
    if device == "cuda":
        name = torch.cuda.get_device_name()
        for key, peak in GPU_PEAK_BF16.items():
            if key in name and dtype == torch.bfloat16:
                return peak, f"{name} datasheet bf16 dense"
        return measured_matmul_peak(device, dtype, 4096), f"{name} measured {dtype} matmul"
    kind = "bf16" if dtype == torch.bfloat16 else "fp32"
    return measured_matmul_peak(device, dtype), f"CPU measured {kind} matmul, {torch.get_num_threads()} threads"


def memory_metrics(device: str) -> dict:
    """Peak memory of this process: CUDA allocations on a GPU, resident set on the CPU."""
    if device == "cuda":
        return {"memory_peak_gb": torch.cuda.max_memory_allocated() / 2**30}
    return {"memory_peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB on Linux


def layer_of(name: str) -> str:
    """Group a parameter name by layer: blocks.3.attn.q.weight -> blocks.3."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "blocks" else parts[0]


def layer_grad_norms(model: torch.nn.Module) -> dict[str, float]:
    """L2 norm of the gradient of each layer (block, embedding, final norm), at any ZeRO stage
    (collective under ZeRO: every rank calls it). Between backward and the optimizer step."""
    return GradNorms.of(model).by_layer()


def _local_grad(p: torch.nn.Parameter) -> tuple[torch.Tensor | None, bool]:
    """(this rank's part of p's gradient, whether that part is a partition). Without ZeRO it is
    p.grad, the same on every rank; ZeRO 1 and 2 keep each rank's fragment of the reduced
    gradient in the optimizer and clear p.grad (a rank may hold none of p: None, a partition);
    ZeRO 3 keeps a flat partition per parameter."""
    if p.grad is not None:
        return p.grad, False
    if hasattr(p, "ds_id"):  # ZeRO 3
        from deepspeed.utils import safe_get_local_grad

        return safe_get_local_grad(p), True
    if hasattr(p, "_hp_mapping"):  # ZeRO 1 and 2: DeepSpeed links every parameter, None if not held here
        if p._hp_mapping is None:
            return None, True
        frag = p._hp_mapping.get_lp_grad_fragment(p._index_in_param_group).reshape(-1)
        numel = p._hp_mapping.lp_fragment_address.numel
        if frag.numel() != numel:  # a whole-parameter buffer: this rank owns only its fragment
            frag = frag.narrow(0, p._hp_mapping.lp_fragment_address.start, numel)
        return frag, True
    return None, False


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """t summed over the data-parallel ranks (a collective: every rank calls it), on t's device.
    NCCL reduces GPU tensors only and gloo CPU ones, so the sum is taken on the device the
    process group's backend serves: this rank's GPU under NCCL, else the CPU."""
    if torch.distributed.get_backend() == "nccl":
        on = torch.device("cuda", torch.cuda.current_device())
    else:
        on = torch.device("cpu")
    work = t.to(on)
    torch.distributed.all_reduce(work)
    return work.to(t.device)


def mean_over_ranks(value: float, world: int) -> float:
    """The mean of value over the data-parallel ranks (collective; value itself on one rank)."""
    if world == 1:
        return value
    return float(sum_over_ranks(torch.tensor([value], dtype=torch.float64))[0]) / world


class GradNorms:
    """Squared L2 norm of each parameter's whole gradient, found from what this rank holds: one
    multi-tensor kernel over the local gradients and, where ZeRO partitions them, one all-reduce
    of a vector with one number per parameter. Cheap enough for every step: the non-finite guard
    and the logged norm read it; the per-layer norms are a sum over it."""

    def __init__(self, names: list[str], sq: torch.Tensor):
        self.names, self.sq = names, sq  # float64: a large finite norm does not square to inf

    @classmethod
    @torch.no_grad()
    def of(cls, model: torch.nn.Module) -> "GradNorms":
        names, pieces, partitioned = [], [], False
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            g, part = _local_grad(p)
            partitioned |= part
            names.append(name)
            pieces.append(g)
        held = [g for g in pieces if g is not None and g.numel()]
        norms = iter(torch._foreach_norm(held, 2, dtype=torch.float32) if held else [])
        on = held[0].device if held else torch.device("cpu")  # stacked where the gradients are: one copy out, not one a tensor
        sq = torch.stack([next(norms).to(on, torch.float64) if g is not None and g.numel()
                          else torch.zeros((), dtype=torch.float64, device=on) for g in pieces]).pow(2) \
            if pieces else torch.zeros(0, dtype=torch.float64)
        if partitioned and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            sq = sum_over_ranks(sq)  # disjoint partitions: the squares add up
        return cls(names, sq.cpu())

    def total(self) -> float:
        return float(self.sq.sum().sqrt())

    def first_nonfinite(self) -> str | None:
        """The parameter, in backward order (output end first), whose gradient is NaN or inf first."""
        bad = (~torch.isfinite(self.sq)).nonzero().flatten().tolist()
        return self.names[bad[-1]] if bad else None

    def by_layer(self) -> dict[str, float]:
        sq: dict[str, float] = defaultdict(float)
        for name, v in zip(self.names, self.sq.tolist()):
            sq[layer_of(name)] += v
        return {f"grad_norm.{k}": math.sqrt(v) for k, v in sq.items()}


def bytes_per_param(zero_stage: int, world: int, mixed: bool) -> float:
    """Weights, gradients and AdamW state per parameter on one rank, after ZeRO partitioning."""
    weights, grads = (2, 2) if mixed else (4, 4)
    optim = 12 if mixed else 8  # fp32 master copy (mixed only) + two Adam moments
    if zero_stage >= 1:
        optim /= world
    if zero_stage >= 2:
        grads /= world
    if zero_stage >= 3:
        weights /= world
    return weights + grads + optim


def memory_estimate(cfg: ModelConfig, micro_batch: int, zero_stage: int, world: int, mixed: bool) -> dict:
    """Rough bytes one rank needs to train: states plus activations kept for backward."""
    n = (cfg.vocab_size * cfg.n_embd * (1 if cfg.tie_embeddings else 2)
         + cfg.n_layer * (2 * cfg.n_embd * cfg.n_embd + 2 * cfg.n_embd * cfg.n_kv_head * cfg.head_dim
                          + 3 * cfg.n_embd * cfg.mlp_hidden))
    states = n * bytes_per_param(zero_stage, world, mixed)
    act_bytes = 2 if mixed else 4
    tokens = micro_batch * cfg.block_size
    # per layer and token: ~16 saved hidden-size tensors plus the MLP's hidden ones; logits in fp32.
    acts = tokens * (cfg.n_layer * (16 * cfg.n_embd + 3 * cfg.mlp_hidden) * act_bytes + 3 * cfg.vocab_size * 4)
    return {"params": n, "states_bytes": states, "activation_bytes": acts, "total_bytes": states + acts}


def device_memory(device: str) -> int:
    if device == "cuda":
        return torch.cuda.mem_get_info()[1]
    import psutil

    return psutil.virtual_memory().available


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


def _write_lines(path: Path, lines: list[str]) -> None:
    """Replace path's content with lines, atomically (a crash leaves the old file or the new)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(x + "\n" for x in lines))
    os.replace(tmp, path)


def read_metrics(path: Path) -> list[tuple[str, dict]]:
    """metrics.jsonl's lines with their rows. A torn last line (a crash in the middle of writing
    it) is dropped with a warning and the file repaired; a bad line before it was not made by a
    crash, so it is an error naming the file and the line."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    out = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not a metrics row")
        except ValueError:
            if number == len(lines):
                print(f"warning: {path} line {number} is torn (training stopped while writing it): dropped "
                      f"{line[:60]!r}", flush=True)
                _write_lines(path, [x for x, _ in out])
                break
            raise ValueError(f"{path} line {number} is not JSON: {line[:80]!r}. A crash tears only the last line; "
                             "fix or delete this one (or the whole file, losing the curve) and run again") from None
        out.append((line, row))
    return out


def restart_metrics(path: Path, start: int) -> list[dict]:
    """Cut metrics.jsonl back to the rows up to step start, where training resumes, so a killed and
    resumed run still has one curve. Starting over (start 0) keeps an existing curve beside it as
    metrics-before-restart-<time>.jsonl rather than overwriting it. Returns the rows kept."""
    path = Path(path)
    lines = read_metrics(path)
    if start == 0 and lines:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        old = path.with_name(f"metrics-before-restart-{stamp}.jsonl")
        n = 1
        while old.exists():
            n += 1
            old = path.with_name(f"metrics-before-restart-{stamp}-{n}.jsonl")
        os.replace(path, old)
        print(f"training starts from step 0: the previous curve ({len(lines)} rows) is kept as {old}", flush=True)
        lines = []
    kept = [(x, row) for x, row in lines if row["step"] <= start]
    _write_lines(path, [x for x, _ in kept])
    return [row for _, row in kept]
