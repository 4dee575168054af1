"""Fused CPU kernels for fp32 training: RMSNorm, SwiGLU, rotary q/k, cross-entropy.

On a CPU, eager PyTorch runs each of these as a chain of elementwise kernels, several passes
over memory where one would do; together they made forja's decoder ~15% slower per step than
a GPT-2 block of the same FLOPs. model/kernels.cpp does each in one pass on torch's own
thread pool. It is compiled once per machine (about 40 s, with the C++ compiler DeepSpeed
already needs on a CPU) into TORCH_EXTENSIONS_DIR, like DeepSpeed's own ops.

The trainer turns them on (GPT.use_fused_kernels); the model's plain PyTorch code stays the
reference, and is what runs on a GPU, in inference, and wherever the build fails (with one
warning). FORJA_FUSED_KERNELS=0 turns them off.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger("forja.kernels")
SOURCE = Path(__file__).with_name("kernels.cpp")  # part of the pretrain stage's code version
_ops = None
_failed: str | None = None


def _flags() -> list[str]:
    # -ffast-math lets the compiler vectorise exp (glibc's vector maths) and reorder sums; it is
    # passed when compiling only, so no flush-to-zero start-up code is linked into the process.
    # -fopenmp: at::parallel_for is OpenMP code in torch's headers; the kernels then share the
    # libgomp torch has loaded, and with it torch's thread count.
    flags = ["-O3", "-ffast-math", "-fopenmp"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    return flags


def own_build_tools() -> None:
    """Put this interpreter's bin folder first on PATH, so that every process builds and loads
    compiled ops (these kernels, DeepSpeed's) with the same ninja, the one pip installs beside
    DeepSpeed. A system ninja of another version keeps its build log in another format: each
    switch between the two (a shell without the venv on PATH, then a worker with it) rebuilt
    every op from scratch, about a minute each time."""
    bin_dir = str(Path(sys.executable).parent)
    parts = os.environ.get("PATH", "").split(os.pathsep)
    if parts[:1] != [bin_dir]:
        os.environ["PATH"] = os.pathsep.join([bin_dir] + [p for p in parts if p and p != bin_dir])


STALE_LOCK_S = 600  # a build takes about a minute; a build lock this old belongs to a killed build


def clear_stale_build_locks(root: Path, older_than_s: float = STALE_LOCK_S) -> list[Path]:
    """Remove the build locks of compiled ops (these kernels, DeepSpeed's) that a killed build left
    under root (TORCH_EXTENSIONS_DIR's per-Python folder). torch waits for such a lock to go away
    forever, so one interrupted build would hang every later training run on the machine. A lock is
    stale when it is older than older_than_s, checked again just before it is removed (a build that
    has just started holds a fresh one)."""
    removed = []
    for lock in Path(root).glob("*/lock"):
        try:
            if time.time() - lock.stat().st_mtime > older_than_s:
                lock.unlink()
                removed.append(lock)
                log.warning("removed %s: left by a build that was killed (older than %d s)", lock, older_than_s)
        except FileNotFoundError:
            pass
    return removed


def load():
    """The compiled kernels, building them on first use; None where they cannot be built."""
    global _ops, _failed
    if _ops is not None or _failed is not None:
        return _ops
    if os.environ.get("FORJA_FUSED_KERNELS", "1") == "0":
        _failed = "FORJA_FUSED_KERNELS=0"
        return None
    from torch.utils.cpp_extension import _get_build_directory, load as build

    own_build_tools()

    # The name carries the instruction set, so a shared extensions folder never hands an AVX2
    # build to a machine without AVX2.
    name = f"forja_kernels_{torch.backends.cpu.get_cpu_capability().lower()}"
    where = Path(_get_build_directory(name, verbose=False))
    clear_stale_build_locks(where.parent)
    if not (where / f"{name}.so").exists():
        print(f"building forja's fused CPU kernels in {where} (once per machine, about a minute)", flush=True)
    try:
        _ops = build(name=name, sources=[str(SOURCE)], extra_cflags=_flags(), extra_ldflags=["-fopenmp"],
                     verbose=False)
    except Exception as e:  # no compiler, no ninja, a failed build: the eager code still trains
        _failed = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        log.warning("fused CPU kernels could not be built (%s); training uses plain PyTorch, which is "
                    "slower on a CPU. Install a C++ compiler and ninja to get them.", _failed)
    return _ops


def usable(x: torch.Tensor) -> bool:
    """Whether a training op on x can take the fused path (fp32 on a CPU, with the kernels built)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and torch.is_grad_enabled() and load() is not None


class RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        y, rstd = _ops.rms_norm_fwd(rows, weight.contiguous(), eps)
        ctx.save_for_backward(rows, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, grad):
        rows, weight, rstd = ctx.saved_tensors
        dx, dw = _ops.rms_norm_bwd(grad.reshape(rows.shape).contiguous(), rows, weight.contiguous(), rstd)
        return dx.view(grad.shape), dw, None


class SwiGLU(torch.autograd.Function):
    """silu(gate) * up from one (..., 2H) projection laid out [gate | up]."""

    @staticmethod
    def forward(ctx, gate_up):
        rows = gate_up.reshape(-1, gate_up.shape[-1]).contiguous()
        ctx.save_for_backward(rows)
        return _ops.swiglu_fwd(rows).view(*gate_up.shape[:-1], gate_up.shape[-1] // 2)

    @staticmethod
    def backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        dgu = _ops.swiglu_bwd(grad.reshape(rows.shape[0], -1).contiguous(), rows)
        return dgu.view(*grad.shape[:-1], rows.shape[-1])


class QKVRotary(torch.autograd.Function):
    """q, k, v (B, H, T, D) from the fused projection's output (B, T, n_head + 2 n_kv_head, D),
    q and k rotated by (T, D) cos/sin tables; the backward writes the projection's gradient."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, n_head, n_kv_head):
        cos, sin = cos.contiguous(), sin.contiguous()
        ctx.save_for_backward(cos, sin)
        return tuple(_ops.qkv_rope_fwd(qkv.contiguous(), cos, sin, n_head, n_kv_head))

    @staticmethod
    def backward(ctx, dq, dk, dv):
        cos, sin = ctx.saved_tensors
        grads = [g if g.stride(-1) == 1 else g.contiguous() for g in (dq, dk, dv)]
        return _ops.qkv_rope_bwd(*grads, cos, sin), None, None, None, None


class CrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits (N, V) against targets (N,), skipping ignore_index; keeps only
    each row's log-sum-exp for the backward, which writes softmax - onehot in one pass."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index):
        logits, targets = logits.contiguous(), targets.contiguous()
        loss, lse, count = _ops.cross_entropy_fwd(logits, targets, ignore_index)
        ctx.save_for_backward(logits, targets, lse)
        ctx.count, ctx.ignore_index = int(count), ignore_index
        return loss

    @staticmethod
    def backward(ctx, grad):
        logits, targets, lse = ctx.saved_tensors
        if ctx.count == 0:  # every target ignored: the loss is nan and nothing is learned
            return torch.zeros_like(logits), None, None
        return _ops.cross_entropy_bwd(grad, logits, targets, lse, ctx.count, ctx.ignore_index), None, None
