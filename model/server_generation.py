"""One prompt's generation as the async handlers see it: a Job handed to the engine thread, its
tokens coming back through an asyncio queue, turned into text deltas (stop strings applied)."""
from __future__ import annotations

import asyncio
import time

from model.batcher import Engine, Job
from model.generate import Sampling
from model.server_text import TextStream


class Deadline(Exception):
    """The request's time ran out before its answer was complete."""


class GenerationFailed(RuntimeError):
    pass


class Generation:
    """Decodes one prompt on the engine; iterate `deltas()` for its text, then read finish and tokens."""

    def __init__(self, engine: Engine, served, prompt: list[int], sampling: Sampling, stop_ids: frozenset[int],
                 stops: list[str], deadline: float, incremental: bool = True):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.text = TextStream(served.tokenizer, stops, incremental)
        self.deadline = deadline
        self.finish: str | None = None
        self.tokens = 0
        self.job = Job(served, prompt, sampling, stop_ids, deadline, self._emit)
        engine.submit(self.job)

    def _emit(self, kind: str, value) -> None:  # on the engine thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: the server is stopping
            self.job.cancel()

    async def deltas(self):
        """Text as it is produced; raises Deadline when the time runs out (the job is then cancelled)."""
        try:
            while True:
                left = self.deadline - time.monotonic()
                try:  # the engine reports a deadline itself; this covers a request stuck waiting for a batch slot
                    kind, value = await asyncio.wait_for(self.queue.get(), timeout=max(left, 0) + 0.5)
                except asyncio.TimeoutError:
                    raise Deadline() from None
                if kind == "token":
                    self.tokens += 1
                    delta = self.text.push(value)
                    if delta:
                        yield delta
                    if self.text.stopped:
                        self.finish = "stop"
                        return
                elif kind == "done":
                    delta = self.text.finish()
                    if delta:
                        yield delta
                    self.finish = value
                    return
                elif value == "deadline":
                    raise Deadline()
                else:
                    raise GenerationFailed(value)
        finally:
            if self.finish is None or self.text.stopped:
                self.job.cancel()  # nobody reads the rest: stop decoding it

    async def collect(self) -> str:
        return "".join([d async for d in self.deltas()])
