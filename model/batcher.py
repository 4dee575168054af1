"""The batching engine of `forja serve`: one thread owns the model and decodes every request's
sequence in shared steps (continuous batching over one KV cache).

A new sequence is prefilled on its own (its prompt through the model once), then joins the running
batch between two decoding steps: its keys and values are copied into the batch's cache, left-padded
to the batch's length (GPT.forward's `pad` gives every row its own positions and hides the padding).
A finished sequence leaves the batch at once, and the columns no row needs any more are trimmed off
the left, so the cache never outgrows the model's context. Each step decodes one token for every
running sequence (up to max_batch), so 8 clients share the cost of one forward pass.

The async HTTP handlers never touch the model: they `submit` a Job and receive its tokens through
the Job's `emit` callback (called on the engine thread; the server turns it into an asyncio queue).
Requests bound to another model version (the alias moved) wait until the running batch drains, so a
sequence always finishes on the version it started with.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from model.generate import KVCache, Sampling, pick

log = logging.getLogger("forja.serve")


@dataclass
class Job:
    """One sequence to decode. emit(kind, value) is called on the engine thread with
    ("token", id), then ("done", "stop" | "length") or ("error", message)."""

    served: Any  # a model.server_model.ServedModel (anything with .model)
    prompt: list[int]
    sampling: Sampling
    stop_ids: frozenset[int]
    deadline: float  # time.monotonic() value
    emit: Callable[[str, Any], None]
    cancelled: bool = False

    def cancel(self) -> None:
        """Stop decoding this sequence at the next step (the client left, or a stop string matched)."""
        self.cancelled = True


@dataclass
class _Row:
    job: Job
    last: int  # the token fed at the next step
    made: int = 1
    generator: torch.Generator | None = None


@dataclass
class Stats:
    """What the engine did: decoding steps and the batch size of each (tests and benchmarks read it)."""

    steps: int = 0
    prefills: int = 0
    sequences: int = 0
    tokens: int = 0
    batch_sizes: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {"steps": self.steps, "prefills": self.prefills, "sequences": self.sequences, "tokens": self.tokens,
                "max_batch_seen": max(self.batch_sizes, default=0),
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())}}


class BatchCache(KVCache):
    """A KVCache whose rows come and go: each row is left-padded by pad[row] columns."""

    def __init__(self, cfg, capacity: int, device, dtype):
        super().__init__(cfg, 0, capacity, device, dtype)
        self.pad = torch.zeros(0, dtype=torch.long, device=device)

    @property
    def rows(self) -> int:
        return self.k.shape[1]

    def join(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Add a prefilled row (keys and values (n_layer, heads, L, head_dim)) at the bottom."""
        n = k.shape[2]
        if n > self.length:  # the newcomer is longer: every row shifts right
            shift = n - self.length
            self.k[:, :, :, shift:n] = self.k[:, :, :, : self.length].clone()
            self.v[:, :, :, shift:n] = self.v[:, :, :, : self.length].clone()
            self.pad += shift
            self.length = n
        shape = (self.k.shape[0], 1, *self.k.shape[2:])
        row_k = self.k.new_zeros(shape)
        row_v = self.v.new_zeros(shape)
        row_k[:, 0, :, self.length - n : self.length] = k
        row_v[:, 0, :, self.length - n : self.length] = v
        self.k, self.v = torch.cat((self.k, row_k), 1), torch.cat((self.v, row_v), 1)
        self.pad = torch.cat((self.pad, self.pad.new_tensor([self.length - n])))

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows, then drop the left columns that are padding for every row left."""
        index = torch.tensor(rows, dtype=torch.long, device=self.k.device)
        self.k, self.v, self.pad = self.k.index_select(1, index), self.v.index_select(1, index), self.pad[index]
        cut = int(self.pad.min()) if rows else self.length
        if cut:
            span = self.length - cut
            self.k[:, :, :, :span] = self.k[:, :, :, cut : self.length].clone()
            self.v[:, :, :, :span] = self.v[:, :, :, cut : self.length].clone()
            self.pad -= cut
            self.length = span


class Engine:
    """The decoding thread and its inbox (see the module docstring)."""

    def __init__(self, max_batch: int = 8, batch_wait_ms: float = 5.0):
        if max_batch < 1:
            raise ValueError(f"serve.max_batch ({max_batch}) must be >= 1")
        self.max_batch, self.batch_wait_s = max_batch, batch_wait_ms / 1000
        self.inbox: queue.Queue[Job | None] = queue.Queue()
        self.stats = Stats()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="forja-decoder", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        self.inbox.put(job)

    # the engine thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        waiting: deque[Job] = deque()
        rows: list[_Row] = []
        cache: BatchCache | None = None
        served = None
        while not self._stop.is_set():
            if not rows and not waiting:  # idle: block, then give a forming batch batch_wait_ms to fill
                job = self.inbox.get()
                if job is None:
                    continue
                waiting.append(job)
                until = time.monotonic() + self.batch_wait_s
                while len(waiting) < self.max_batch and (left := until - time.monotonic()) > 0:
                    try:
                        job = self.inbox.get(timeout=left)
                    except queue.Empty:
                        break
                    if job is not None:
                        waiting.append(job)
            while True:  # newcomers join between steps
                try:
                    job = self.inbox.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    waiting.append(job)
            joining = None
            try:
                if not rows:
                    served, cache = None, None
                while waiting and len(rows) < self.max_batch:
                    job = waiting[0]
                    if job.cancelled:
                        waiting.popleft()
                        continue
                    if served is not None and job.served is not served:
                        break  # another version: wait until this batch drains
                    joining = waiting.popleft()
                    if served is None:
                        served = job.served
                        p = next(served.model.parameters())
                        cache = BatchCache(served.model.cfg, served.model.cfg.block_size, p.device, p.dtype)
                    self._prefill(served.model, job, rows, cache)
                joining = None
                if rows:
                    self._step(served.model, rows, cache)
            except Exception as e:  # noqa: BLE001 - a failed step fails its requests, never the server
                failed = [r.job for r in rows] + ([joining] if joining is not None else [])
                log.exception("decoding failed; %d request(s) answered with an error", len(failed))
                for job in failed:
                    job.emit("error", f"decoding failed: {type(e).__name__}: {e}")
                rows, cache, served = [], None, None

    @torch.inference_mode()
    def _prefill(self, model, job: Job, rows: list[_Row], cache: BatchCache) -> None:
        """Run the prompt, pick the first token, and add the row to the batch (unless it is already done)."""
        if time.monotonic() > job.deadline:
            job.emit("error", "deadline")
            return
        device = cache.k.device
        own = KVCache(model.cfg, 1, len(job.prompt), device, cache.k.dtype)
        logits = model(torch.tensor([job.prompt], device=device), cache=own)[:, -1, :]
        self.stats.prefills += 1
        self.stats.sequences += 1
        s = job.sampling
        generator = torch.Generator(device=device).manual_seed(s.seed) if s.temperature > 0 else None
        token = int(pick(logits, s, [generator] if generator else None)[0])
        row = _Row(job, token, 1, generator)
        if self._emit_token(row, token):
            return
        cache.join(own.k[:, 0], own.v[:, 0])
        rows.append(row)

    def _emit_token(self, row: _Row, token: int) -> bool:
        """Hand a new token to its request; True when the sequence is finished."""
        job = row.job
        if token in job.stop_ids:
            job.emit("done", "stop")
            return True
        self.stats.tokens += 1
        job.emit("token", token)
        if row.made >= job.sampling.max_new_tokens:
            job.emit("done", "length")
            return True
        return False

    @staticmethod
    def _pick(logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        """Next token of every row: rows that sample alike go through `pick` together (each with
        its own generator, so a row's sample does not depend on its batch)."""
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(rows):
            s = r.job.sampling
            groups.setdefault((s.temperature, s.top_k, s.top_p) if s.temperature > 0 else (0.0,), []).append(i)
        tokens = [0] * len(rows)
        for members in groups.values():
            s = rows[members[0]].job.sampling
            index = torch.tensor(members, device=logits.device)
            part = logits.index_select(0, index) if len(members) < len(rows) else logits
            picked = pick(part, s, [rows[i].generator for i in members] if s.temperature > 0 else None).tolist()
            for i, t in zip(members, picked):
                tokens[i] = t
        return tokens

    @torch.inference_mode()
    def _step(self, model, rows: list[_Row], cache: BatchCache) -> None:
        """One token for every running row; finished, cancelled and late rows leave the batch."""
        now = time.monotonic()
        keep = []
        for i, row in enumerate(rows):
            if row.job.cancelled:
                continue
            if now > row.job.deadline:
                row.job.emit("error", "deadline")
                continue
            keep.append(i)
        if len(keep) < len(rows):
            cache.keep(keep)
            rows[:] = [rows[i] for i in keep]
            if not rows:
                return
        x = torch.tensor([[r.last] for r in rows], device=cache.k.device)
        pad = cache.pad if bool(cache.pad.any()) else None
        logits = model(x, cache=cache, pad=pad)[:, -1, :]
        self.stats.steps += 1
        self.stats.batch_sizes[len(rows)] += 1
        tokens = self._pick(logits, rows)
        done = []
        for i, (row, token) in enumerate(zip(rows, tokens)):
            row.made += 1
            row.last = token
            if self._emit_token(row, token):
                done.append(i)
        if done:
            left = [i for i in range(len(rows)) if i not in done]
            cache.keep(left)
            rows[:] = [rows[i] for i in left]
