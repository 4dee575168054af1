"""A stage's units of work (one input file, one shard) as Prefect tasks mapped on the run's runner.

A stage task calls map_units(unit_task, jobs) with one tuple of arguments per unit; each unit
writes its own files into the stage's temp folder (atomically, through stage.partial) and
returns small counts. Inside a flow run every unit is a task run of its own, so the Prefect UI
shows them; outside one (plain function calls, tests) the units run here one after another.

Which runner executes them (processes on this machine, or a Dask cluster) is chosen per run:
the flow opens it once (flows.runners.open_runner) and installs it here with use_runner(), so
the stage tasks themselves stay in the flow process and only their units travel. Without an
installed runner the flow's own task runner is used.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Any, Iterator, Sequence

def unit_options() -> dict:
    """The keyword arguments of every unit's @task: `@task(name="normalize-shard", **unit_options())`.

    A unit is never a cache hit (it must write its files into this build's temp folder) and its
    result, a few counts, travels back with the task run, so nothing is hashed or persisted for
    it: less work per unit on every worker."""
    from prefect.cache_policies import NO_CACHE

    return {"cache_policy": NO_CACHE, "persist_result": False}


_RUNNER: contextvars.ContextVar = contextvars.ContextVar("forja_unit_runner", default=None)
_IN_PLACE: contextvars.ContextVar = contextvars.ContextVar("forja_units_in_place", default=False)


@contextlib.contextmanager
def use_runner(runner) -> Iterator[None]:
    """Send every map_units call made inside this block to `runner` (a started Prefect TaskRunner)."""
    token = _RUNNER.set(runner)
    try:
        yield
    finally:
        _RUNNER.reset(token)


def current_runner():
    """The runner installed by use_runner, or None."""
    return _RUNNER.get()


def map_units(unit, jobs: Sequence[tuple]) -> list[Any]:
    """Run the Prefect task `unit` once per job (a tuple of its positional arguments) and return
    the results in job order; the first failed unit's error is raised."""
    if not jobs:
        return []
    from prefect.context import FlowRunContext, TaskRunContext

    flow_ctx = FlowRunContext.get()
    if flow_ctx is None and TaskRunContext.get() is None:
        with _in_place():
            return [unit.fn(*job) for job in jobs]
    runner = _RUNNER.get() or getattr(flow_ctx, "task_runner", None)
    if runner is None:  # inside a task run that has no flow (e.g. a background task): in place
        with _in_place():
            return [unit.fn(*job) for job in jobs]
    if len(jobs) == 1 and _local(runner):  # a pool process would only add its start-up: a task run here
        with _in_place():
            return [unit(*jobs[0])]
    parameters = {name: list(column) for name, column in zip(_positional_names(unit), zip(*jobs))}
    with contextlib.nullcontext() if _local(runner) else _context_once():
        futures = runner.map(unit, parameters)
    return [f.result() for f in futures]


def unit_threads() -> int:
    """The threads one unit of work may use for its own parallel parts (batch encoding, say).

    One where units run side by side in a pool (a process per core, a single-threaded Dask
    worker): the pool is the parallelism, and a unit spreading over every core would only
    fight its neighbours for them. Every core of this machine where map_units runs the units
    here, one after another."""
    if not _IN_PLACE.get():
        return 1
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@contextlib.contextmanager
def _in_place() -> Iterator[None]:
    token = _IN_PLACE.set(True)
    try:
        yield
    finally:
        _IN_PLACE.reset(token)


_MAP_CONTEXT: contextvars.ContextVar = contextvars.ContextVar("forja_map_context", default=None)


@contextlib.contextmanager
def _context_once() -> Iterator[None]:
    """Serialize the run's context once for all the units of one map, not once per unit.

    prefect-dask's client ships the caller's whole Prefect context (flow run, parent task run,
    tags, every setting) with each task it submits, serializing it anew each time: about 50 ms of
    the flow process per unit, which is most of what a map of thousands of shards costs before any
    runs. Within one map_units call that context is the same for every unit (only the per-unit
    asset context, keyed by the new task run id, differs), so it is computed once here and reused.
    The memo lives in a context variable, so another flow mapping in another thread of this
    process (or outside any map) still gets prefect-dask's own serialization."""
    try:
        import prefect_dask.client as dask_client
        from prefect.context import AssetContext
    except ImportError:  # no prefect-dask: only the local runners, which submit no context
        yield
        return
    original = getattr(dask_client.serialize_context, "__wrapped__", dask_client.serialize_context)

    def serialize_context(asset_ctx_kwargs=None):
        base = _MAP_CONTEXT.get()
        if base is None:
            return original(asset_ctx_kwargs=asset_ctx_kwargs)
        out = dict(base)
        if asset_ctx_kwargs:
            out["asset_context"] = AssetContext.from_task_and_inputs(**asset_ctx_kwargs).serialize()
        return out

    serialize_context.__wrapped__ = original
    dask_client.serialize_context = serialize_context  # idempotent: always wraps prefect-dask's own
    token = _MAP_CONTEXT.set(original())
    try:
        yield
    finally:
        _MAP_CONTEXT.reset(token)


def _local(runner) -> bool:
    """Whether the runner's workers are this machine's threads or processes (not a cluster)."""
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

    return isinstance(runner, (ProcessPoolTaskRunner, ThreadPoolTaskRunner))


def _positional_names(unit) -> list[str]:
    import inspect

    return list(inspect.signature(unit.fn).parameters)
